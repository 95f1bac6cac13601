"""Plots of meta-training runs: `read_run` reads a run folder, `write_report` draws its figures.

Command line::

    python -m bilevel.metalearn report runs/fomaml runs/imaml --out runs/report

A run folder is what `bilevel.metalearn.training.train` writes: ``log.jsonl`` (one record per logged
meta-step, one per periodic evaluation; written as training goes, so a running or stopped run can
be read), ``metrics.json`` (the final evaluation, once training has ended) and ``config.json``.
`write_report` draws, for one run or several overlaid (one colour per algorithm, a line style per run
of it, throughout):

* ``test_accuracy.png`` (classification runs): accuracy on the fixed test tasks after adaptation,
  with its 95% interval as a band, against meta-steps and against training time; the final
  evaluation (``--test-tasks`` tasks) as a point with its interval;
* ``test_loss.png``: the same for the test query loss (mean squared error for regression);
* ``train_loss.png``: the meta-batch's query loss and support loss after adaptation, against
  meta-steps (every logged step, and a moving average);
* ``diagnostics.png``: the inner solver's ||grad_phi G|| at its answer, CG's residual (iMAML only)
  and the fraction of tasks where CG met negative curvature, against meta-steps.

Every figure has a title with the final figures, axis labels and a legend.  Plotting needs
matplotlib (``pip install 'bilevel[plot]'``); reading does not.

This module is the report's public surface (the command is `bilevel.metalearn.training.cli`);
reading lives in `.runlog`, drawing in `.figures`.
"""

from __future__ import annotations

from .figures import write_report as write_report
from .runlog import RunFormatError as RunFormatError
from .runlog import RunLog as RunLog
from .runlog import read_run as read_run
from .runlog import read_runs as read_runs
from .runlog import summarize as summarize

__all__ = ["RunFormatError", "RunLog", "read_run", "read_runs", "summarize", "write_report"]
