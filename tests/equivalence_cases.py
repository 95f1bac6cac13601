"""Numbers the meta-learning package must keep across refactors: meta-gradients, a 20-step run, the CLI.

Each case uses only public names that every version of the package has (``make_algorithm``,
``meta_gradient``, ``batched_model``, ``make_functional``, ``models.omniglot_cnn``,
``models.sinusoid_mlp``, ``Task``, ``load_checkpoint`` and the command line), so one version can
write its numbers and another compare against them::

    PYTHONPATH=/path/to/reference/checkout python tests/equivalence_cases.py --write tests/data

writes ``tests/data/equivalence.json.gz`` (every number, float64 as JSON's exact repr) and
``tests/data/equivalence-checkpoint.pt`` (a checkpoint of the reference's 20-step run).
``tests/test_equivalence.py`` recomputes every case with the installed code and compares.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

#: (algorithm, make_algorithm keywords, meta_gradient's lam, engine) of each meta-gradient case.
ALGOS: dict[str, dict[str, Any]] = {
    "imaml-gd": dict(inner_steps=4, inner_lr=0.1, lam=2.0, cg_iters=4),
    "imaml-gd-warm": dict(
        algo="imaml-gd", inner_steps=4, inner_lr=0.1, lam=2.0, cg_iters=4, cg_warm_start=True
    ),
    "imaml-gd-backtrack": dict(
        algo="imaml-gd", inner_steps=4, inner_lr=0.5, lam=0.5, cg_iters=4, backtrack=True
    ),
    "imaml-gd-nesterov": dict(algo="imaml-gd", inner_steps=4, inner_lr=0.1, lam=2.0, inner_solver="nesterov"),
    "imaml-hf": dict(inner_steps=4, lam=2.0, cg_iters=4, newton_iters=2),
    "imaml-hf-trust-region": dict(
        algo="imaml-hf", lam=2.0, cg_iters=4, newton_iters=2, inner_solver="trust-region"
    ),
    "maml": dict(inner_steps=2, inner_lr=0.4),
    "fomaml": dict(inner_steps=3, inner_lr=0.4),
    "reptile": dict(inner_steps=3, inner_lr=0.4),
    "imaml-released": dict(inner_steps=4, inner_lr=0.1, lam=2.0, cg_iters=4, damping=1.0),
}
#: meta_gradient's ``lam`` override: learned lambdas (a scalar, one per tensor), with the batched engine.
LAMS = ("none", "scalar", "per-tensor")
#: the engines: the batched model, torch.func.vmap, a Python loop over tasks.
ENGINES = ("batched", "vmap", "loop")
#: the 20-step command-line runs (sinusoid, float64).
_GD = ["--inner-steps", "3", "--inner-lr", "0.01"]
RUNS: dict[str, list[str]] = {
    "imaml-gd-learned-lam": ["--algo", "imaml-gd", "--learn-lam", "scalar", *_GD],
    "imaml-gd-per-tensor": ["--algo", "imaml-gd", "--learn-lam", "per-tensor", "--backtrack", *_GD],
    "imaml-hf": ["--algo", "imaml-hf", "--newton-iters", "2"],
    "maml": ["--algo", "maml", *_GD],
    "fomaml": ["--algo", "fomaml", "--lr-schedule", "cosine", "--clip-grad-norm", "0.5", *_GD],
    "reptile": ["--algo", "reptile", "--inner-solver", "nesterov", *_GD],
    "imaml-released": ["--recipe", "released", "--dataset", "sinusoid", "--meta-batch", "4", *_GD],
    # refusals: the exit code and the message are the outcome
    "refuse-maml-backtrack": ["--algo", "maml", "--backtrack", *_GD],
    "refuse-fomaml-learn-lam": ["--algo", "fomaml", "--learn-lam", "scalar", *_GD],
    "refuse-hf-inner-steps": ["--algo", "imaml-hf", *_GD],
    "refuse-trust-region-gd": ["--algo", "imaml-gd", "--inner-solver", "trust-region", *_GD],
}
_RUN_FLAGS = [
    "train", "--dataset", "sinusoid", "--shots", "5", "--queries", "10", "--meta-steps", "20",
    "--meta-batch", "4", "--dtype", "float64",
    "--test-tasks", "20", "--log-every", "5", "--checkpoint-every", "10", "--threads", "1",
]  # fmt: skip
# a time in the console's output ("[0 s, 0.01 s/step]"), which no two runs share
_TIMES = re.compile(r"\[[^\]]*\bs(/step|/task)?\]")
_STATS = ("query_loss", "query_acc", "support_loss", "inner_grad_norm", "cg_residual", "cg_iters", "distance")
_VOLATILE = ("train_seconds", "wall_seconds", "environment", "wall_time", "time", "out")


def _tensors(tree: Any) -> Any:
    """Nested dicts and sequences of tensors as nested lists of floats (NaN as the string 'nan')."""
    if isinstance(tree, torch.Tensor):
        return _floats(tree.detach().double().flatten().tolist())
    if isinstance(tree, dict):
        return {str(k): _tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_tensors(v) for v in tree]
    if isinstance(tree, float):
        return _floats([tree])[0]
    return tree


def _floats(xs: list[float]) -> list[Any]:
    return [x if math.isfinite(x) else repr(x) for x in xs]


def _meta_batch(kind: str, B: int, gen: torch.Generator) -> Any:
    from bilevel.metalearn import Task

    if kind == "sinusoid":
        amp = 0.5 + 4.5 * torch.rand(B, 1, 1, generator=gen, dtype=torch.float64)
        phase = math.pi * torch.rand(B, 1, 1, generator=gen, dtype=torch.float64)
        xs = 10 * torch.rand(B, 5, 1, generator=gen, dtype=torch.float64) - 5
        xq = 10 * torch.rand(B, 7, 1, generator=gen, dtype=torch.float64) - 5
        return Task(xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase))
    ways, size = 3, 12
    protos = torch.rand(B, ways, 1, 1, size, size, generator=gen, dtype=torch.float64)

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.3 * torch.randn(B, ways, k, 1, size, size, generator=gen, dtype=torch.float64)
        x = (protos + noise).clamp(0, 1).reshape(B, ways * k, 1, size, size)
        return x, torch.arange(ways).repeat_interleave(k).expand(B, -1).contiguous()

    return Task(*draw(1), *draw(2))


def _lam(kind: str, theta: dict[str, torch.Tensor]) -> Any:
    if kind == "none":
        return None
    if kind == "scalar":
        return torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    return {
        n: torch.tensor(1.0 + 0.1 * i, dtype=torch.float64, requires_grad=True) for i, n in enumerate(theta)
    }


def meta_gradient_cases() -> dict[str, Any]:
    """Every algorithm x learned-lambda x engine on a float64 Omniglot CNN and a sinusoid MLP.

    Returns:
        ``{case: {"grad": ..., "lam_grad": ..., "stats": ...}}`` as nested float lists; a case the
        algorithm refuses records its error's type.
    """
    import torch.nn.functional as F

    from bilevel.metalearn import batched_model, make_algorithm, make_functional, meta_gradient
    from bilevel.metalearn.models import omniglot_cnn, sinusoid_mlp

    out: dict[str, Any] = {}
    for problem in ("omniglot", "sinusoid"):
        model = omniglot_cnn(3, hidden=4, image_size=12) if problem == "omniglot" else sinusoid_mlp((8, 8))
        model = model.double()
        fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=torch.float64)
        batch = _meta_batch(problem, 3, torch.Generator().manual_seed(1))
        loss = F.cross_entropy if problem == "omniglot" else F.mse_loss
        for name, spec in ALGOS.items():
            spec = dict(spec)
            algo = make_algorithm(str(spec.pop("algo", name)), **spec)
            for lam_kind, engine in [("none", e) for e in ENGINES] + [(k, "batched") for k in LAMS[1:]]:
                key = f"{problem}/{name}/lam-{lam_kind}/{engine}"
                th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
                try:
                    grad, lam_grad, stats = meta_gradient(
                        algo, fn, loss, th, batch,
                        lam=_lam(lam_kind, th),
                        classification=problem == "omniglot",
                        vectorize=engine != "loop",
                        batched=batched_model(model) if engine == "batched" else None,
                        diagnostics=True,
                    )  # fmt: skip
                except Exception as err:
                    out[key] = {"error": type(err).__name__}
                    continue
                fields = {f: getattr(stats, f) for f in _STATS}
                out[key] = {"grad": _tensors(grad), "lam_grad": _tensors(lam_grad), "stats": _tensors(fields)}
    return out


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``python -m bilevel.metalearn ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    from bilevel.metalearn.__main__ import main

    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return int(code or 0), so.getvalue(), se.getvalue()


def _scrub(text: str, folder: str) -> str:
    return _TIMES.sub("[TIME]", text.replace(folder, "OUT"))


def _scrub_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _scrub_json(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_scrub_json(v) for v in obj]
    if isinstance(obj, float):
        return _floats([obj])[0]
    return obj


def run_cases(checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Each 20-step run of `RUNS` and an ``eval`` of its checkpoint, through the command line.

    Args:
        checkpoint_dir: where to copy the first run's ``checkpoint.pt`` (as
            ``equivalence-checkpoint.pt``); None: nowhere.

    Returns:
        ``{run: {...}}``: exit codes, console output and metrics with times and paths taken out,
        the trained theta and the learned lambda from the checkpoint, the ``eval`` output.
    """
    from bilevel.metalearn import load_checkpoint

    out: dict[str, Any] = {}
    for i, (name, flags) in enumerate(RUNS.items()):
        with tempfile.TemporaryDirectory() as tmp:
            folder = str(Path(tmp) / "run")
            code, so, se = run_cli([*_RUN_FLAGS, *flags, "--out", folder])
            if code != 0:
                out[name] = {"code": code, "stdout": _scrub(so, folder), "stderr": _scrub(se, folder)}
                continue
            ck = load_checkpoint(Path(folder) / "checkpoint.pt")
            if i == 0 and checkpoint_dir is not None:
                shutil.copy(Path(folder) / "checkpoint.pt", checkpoint_dir / "equivalence-checkpoint.pt")
            metrics = json.loads((Path(folder) / "metrics.json").read_text())
            log = [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]
            ecode, eso, ese = run_cli(
                ["eval", "--checkpoint", f"{folder}/checkpoint.pt", "--test-tasks", "10"]
            )
            out[name] = {
                "code": code,
                "stdout": _scrub(so, folder),
                "stderr": _scrub(se, folder),
                "metrics": _scrub_json(metrics),
                "log": _scrub_json(log),
                "theta": _tensors(ck["theta"]),
                "log_lam": _tensors(ck.get("log_lam")),
                "eval": [ecode, _scrub(eso, folder), _scrub(ese, folder)],
            }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", type=Path, required=True, help="folder for equivalence.json and the checkpoint")
    args = p.parse_args()
    torch.set_num_threads(1)
    args.write.mkdir(parents=True, exist_ok=True)
    data = {"meta_gradient": meta_gradient_cases(), "runs": run_cases(args.write)}
    with gzip.open(args.write / "equivalence.json.gz", "wt") as f:
        json.dump(data, f, sort_keys=True)
    print(f"wrote {args.write / 'equivalence.json.gz'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
