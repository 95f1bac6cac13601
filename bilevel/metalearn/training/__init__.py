"""A meta-training run: its configuration, the loop, checkpoints, evaluation of saved runs, reports.

- `config`: `TrainConfig` and the presets and recipes.
- `experiment`: `build_experiment` (a run's data, samplers, model and algorithms) and `load_run`.
- `train`: the meta-training loop, a short loop over `step.MetaStep`.
- `step`: `TrainState` (theta, lambda, Adam, the step count) and `MetaStep` (one meta-step: the
  meta-gradient, the ranks' sums, clipping, Adam).
- `recorder`: what a run writes while it trains (banner, ``log.jsonl``, periodic evaluations,
  checkpoints) and its clock; `results`: the final evaluation and ``metrics.json``;
  `signals`: SIGTERM / Ctrl-C as a request to stop after the current step.
- `checkpoint`: writing and reading ``checkpoint.pt``.
- `provenance`: what a run was trained on (its class split, the data listing, the version).
- `runlock`: one run per folder, for the run's lifetime.
- `distributed`: the data-parallel seam (one process per device).
- `console`: progress bars and lines on standard error.
- `report`: the run report and its command; `runlog` reads run folders and writes their table,
  `figures` draws them.
- `cli`: ``python -m bilevel.metalearn {train,eval,report}``.
"""
