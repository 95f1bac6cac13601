"""A meta-training run: its configuration, the loop, checkpoints, evaluation of saved runs, reports.

- `config`: `TrainConfig` and the presets and recipes.
- `experiment`: `build_experiment` (a run's data, samplers, model and algorithms) and `load_run`.
- `train`: the meta-training loop.
- `checkpoint`: writing and reading ``checkpoint.pt``.
- `distributed`: the data-parallel seam (one process per device).
- `console`: progress lines and the run log.
- `report`: the run report and its command; `runlog` reads run folders and writes their table,
  `figures` draws them.
- `cli`: ``python -m bilevel.metalearn {train,eval,report}``.
"""
