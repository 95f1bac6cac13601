"""What every image loader returns (`FewShotData`), and the errors of the data pipeline.

The pipeline, one module per step:

* `splits`: which classes are for meta-training, validation and testing (`ClassSplit`);
* `sources`: a dataset's image list, its file or zip readers, and decoding one image with Pillow;
* `locations`: where the data root and the cache directory are;
* `cache`: every image decoded once into one ``uint8`` array ``(N, C, H, W)`` in a ``.npy`` file,
  memory-mapped on every later load, so task sampling never decodes an image;
* `images`: the decoded `ImageCollection` and the `ClassPool` of one part of a split;
* this module: `FewShotData`, the bundle a loader (`omniglot`, `miniimagenet`, `folder`) returns.

Quick start (what a training loop needs)::

    from bilevel.metalearn.data.omniglot import load_omniglot
    from bilevel.metalearn.data.samplers import TaskSampler
    from bilevel.metalearn.models import default_model, make_functional

    data = load_omniglot(data_root, split="vinyals", seed=0, n_val=100)  # FewShotData
    data.split.save_json(run_dir / "split.json")                         # saved with the run
    train = TaskSampler(data.train, ways=5, shots=1, queries=15, seed=0)
    # (a) a meta-batch as stacked tensors on a device: support_x (B, ways*shots, 1, 28, 28) ...
    batch = train.meta_batch(step, range(16), device="cuda")
    #     rank r of R takes disjoint task indices and sees the tasks one process would see:
    batch = train.meta_batch(step, range(r, 16, R))
    # (b) the fixed evaluation tasks (task i depends only on (eval seed, i)):
    test = TaskSampler(data.test, ways=5, shots=1, queries=15, seed=0)
    for chunk in test.fixed_batches(600, batch_size=50, device="cuda"): ...
    # (c) the model's functional form and its parameters:
    fn, params = make_functional(default_model(data.image_shape, ways=5), torch.Generator().manual_seed(0))
    logits = torch.func.vmap(fn)(batched_params, batch.support_x)
    # sinusoid regression has the same sampler interface (support_x, support_y: (B, K, 1)):
    sine = SinusoidTasks(shots=10, queries=10, seed=0)           # bilevel.metalearn.tasks
    fn, params = make_functional(sinusoid_mlp(), torch.Generator().manual_seed(0))
    loss = mse(fn(params, x), y)   # models.mse, not F.mse_loss, under jvp(grad(...)) (torch #123996)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import numpy as np

from ... import BilevelError
from .images import ClassPool, ImageCollection
from .splits import ClassSplit

__all__ = [
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FewShotData",
    "SplitMismatchError",
    "make_few_shot_data",
]


class DatasetError(BilevelError):
    """Base class of the data errors: the dataset is missing, malformed or too small for a request."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset's files are not where they were looked for.  The message says where to get them."""


class DatasetFormatError(DatasetError, ValueError):
    """The dataset's files exist but are corrupt, unreadable, laid out wrongly or too small."""


class SplitMismatchError(DatasetFormatError):
    """A given (saved) class split names classes the data does not hold.

    A saved split is never recomputed to fit the data: a recomputed split could put a class that
    was meta-trained on into the test part.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class FewShotData:
    """What every image loader returns.

    Attributes:
        name: dataset name (``"omniglot"``, ``"miniimagenet"``, ``"folder"``).
        collection: all decoded images.
        split: the class split (save it with the run: ``split.save_json(path)``).
        train: meta-training pool.
        val: validation pool, or ``None`` where the split has no validation classes.
        test: meta-test pool.
    """

    name: str
    collection: ImageCollection
    split: ClassSplit
    train: ClassPool
    val: ClassPool | None
    test: ClassPool

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images tasks are made of."""
        return self.collection.image_shape

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the data listing: every class id with its number of images, in collection order.

        Equal fingerprints mean the same classes with as many images each; decoding settings and
        file times do not enter it (a copied dataset keeps its fingerprint).
        """
        counts = np.diff(np.asarray(self.collection.offsets, dtype=np.int64)).tolist()
        listing = json.dumps([list(self.collection.class_ids), counts], separators=(",", ":"))
        return hashlib.sha256(listing.encode()).hexdigest()

    @property
    def unused_classes(self) -> tuple[str, ...]:
        """Class ids of the data outside every part of the split (sorted), e.g. classes added later."""
        return tuple(sorted(set(self.collection.class_ids) - set(self.split.all_classes)))

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        val = f"{self.val.n_classes:,}" if self.val is not None else "no"
        return (
            f"FewShotData({self.name!r}, {self.collection.images.shape[0]:,} images {c}x{h}x{w}, "
            f"split {self.split.name!r}: {self.train.n_classes:,} train / {val} val / "
            f"{self.test.n_classes:,} test classes)"
        )


def make_few_shot_data(
    name: str,
    collection: ImageCollection,
    split: ClassSplit,
    *,
    train_rotations: Sequence[int] = (0,),
    test_rotations: Sequence[int] = (0,),
) -> FewShotData:
    """Build the three pools of ``split`` over ``collection`` (val and test use ``test_rotations``).

    Raises:
        SplitMismatchError: classes of the split are not in the collection (the message lists them
            by part).
    """
    held = set(collection.class_ids)
    missing = {
        part: [c for c in ids if c not in held]
        for part, ids in (
            ("train", split.train_classes),
            ("val", split.val_classes),
            ("test", split.test_classes),
        )
    }
    if any(missing.values()):
        n = sum(len(v) for v in missing.values())
        listed = "; ".join(
            f"{part}: {', '.join(repr(c) for c in ids[:3])}{', ...' if len(ids) > 3 else ''}"
            for part, ids in missing.items()
            if ids
        )
        raise SplitMismatchError(
            f"{name}: the data does not hold {n} class(es) of the split {split.name!r} ({listed}); a "
            "saved split is never recomputed (a meta-trained class could become a test class): restore "
            "those classes, or point --data-root at the data the run was trained on"
        )
    try:
        train = ClassPool.from_ids(collection, split.train_classes, train_rotations, "train")
        val = (
            ClassPool.from_ids(collection, split.val_classes, test_rotations, "val")
            if split.val_classes
            else None
        )
        test = ClassPool.from_ids(collection, split.test_classes, test_rotations, "test")
    except KeyError as e:
        raise DatasetFormatError(
            f"{name}: the split {split.name!r} does not match the data: {e.args[0]}"
        ) from None
    return FewShotData(name, collection, split, train, val, test)
