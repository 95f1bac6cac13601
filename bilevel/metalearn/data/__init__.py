"""The data layer of meta-learning: image sources, class splits, the decoded-image cache, the dataset
loaders and the task samplers.

- `datasets`: `FewShotData` (train / validation / test class pools) and the dataset errors.
- `sources`, `images`, `cache`, `locations`: where images come from (a folder, a zip), how they are
  decoded into one `uint8` array per class, and the cache that keeps the decoded arrays.
- `splits`: `ClassSplit`, the saved partition of classes into meta-train / validation / test.
- `omniglot`, `miniimagenet`, `folder`: the loaders (`load_omniglot`, `load_miniimagenet`,
  `load_image_folder`).
- `samplers`: `TaskSampler`, `SinusoidTasks`, `TaskPool`: reproducible streams of `Task` s.
- `prefetch`: `Prefetcher`, which draws the next meta-batch in a background thread.
"""
