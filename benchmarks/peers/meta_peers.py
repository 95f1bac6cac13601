"""The meta-learning peers (learn2learn, betty, higher) and our training step, on one problem.

Shared by ``metastep.py`` (one meta-step, timed side by side) and ``peer_train.py`` (training a peer
for a CPU-time budget).  Every side gets the same problem, built by our training code
(`bilevel.metalearn.build_experiment` of a `TrainConfig`): our Omniglot copy, our class split and
task sampler (the peers read our `Task` tensors, not their own data pipelines), our Conv4
(`bilevel.metalearn.models.ConvNet`: 4 x [3x3 conv, 64 filters, stride 2 -> batch norm with batch
statistics -> ReLU] -> linear) as an ``nn.Module`` for the peers and as its functional form for us,
and the same initial parameters (``exp.theta``, copied into the peers' modules).

Each peer follows its published example:

* learn2learn ``examples/vision/maml_omniglot.py``: ``l2l.algorithms.MAML(model, lr=fast_lr,
  first_order=...)``; per task ``maml.clone()``, ``adapt`` on the support loss, ``backward`` of the
  query loss (its ``.item()`` and the accuracy read as in the example); the gradients are divided by
  the meta-batch and Adam steps.  The example's per-task meta-validation forward is left out (it is
  monitoring, not the meta-step).
* betty ``examples/implicit_maml/main.py``: an ``Engine`` of two ``ImplicitProblem``s: the inner
  (``SGD(lr=base_lr)``, ``unroll_steps=inner_steps``, ``type="cg"``, ``cg_iterations``, ``cg_alpha=1``)
  minimizes CE + reg * ||phi - theta||^2 from the outer's weights (``load_state_dict`` at each inner
  loop's start); the outer accumulates ``gradient_accumulation=meta_batch`` hypergradients and steps
  ``AdamW(lr=meta_lr, weight_decay=1e-4)`` (as ``Adam(decoupled_weight_decay=True)``, the same
  update; see `BettyIMAML`) with its cosine schedule.  A meta-step is ``meta_batch * inner_steps``
  engine steps.  Its hypergradient is iMAML's with lam = 2 * reg: CG
  solves (H + 2 reg I) x = v, and -d(grad_phi G)/d(theta) x = 2 reg x = (I + H / lam)^-1 v.
  Logging is off (``log_step=-1``); the example logs every 10 meta-steps.  The released betty-ml
  0.2.1 updates CG's direction from the previous residual (``p_new = r + beta p``, where CG takes
  the new one; fixed on betty's main branch by commit 25bcb02, after the release), so beyond its
  first step its "CG" is not CG: its meta-gradient equals ours only at one CG step (``metastep.py
  agree`` checks both).  The cost per step is CG's (one HVP per step).
* higher ``examples/maml-omniglot.py``: per task ``higher.innerloop_ctx(net, SGD(lr), copy_initial_
  weights=False)``, ``diffopt.step`` on the support loss, ``backward`` of the query loss (summed over
  the tasks, not averaged, as in the example), then Adam.

torchvision: ``import learn2learn`` imports ``learn2learn.vision``, which imports torchvision names at
module level (datasets and transforms, never used here).  The registry's torchvision wheels are CUDA
builds that fail to load beside the CPU torch build, so `install_torchvision_placeholder` puts a
placeholder ``torchvision`` into ``sys.modules`` before learn2learn is imported, where no torchvision
is installed: every name it is asked for is a class whose construction raises ``ModuleNotFoundError``,
so nothing that would need the real torchvision can run silently.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bilevel.metalearn import TrainConfig, build_experiment
from bilevel.metalearn.algorithms import meta_gradient
from bilevel.metalearn.tasks import Task
from bilevel.metalearn.training.distributed import Dist
from bilevel.metalearn.training.experiment import Experiment
from bilevel.metalearn.training.step import MetaStep, TrainState

Grads = dict[str, torch.Tensor]

#: The torchvision modules learn2learn 0.2.0 imports from at import time.
_TORCHVISION_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.datasets",
    "torchvision.datasets.folder",
    "torchvision.datasets.omniglot",
)


class _Placeholder(types.ModuleType):
    """A stand-in torchvision module: each public name is a class that refuses to be built."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        qualname = f"{self.__name__}.{name}"

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise ModuleNotFoundError(
                f"{qualname}: torchvision is not installed in this environment (a placeholder from "
                "benchmarks/peers/meta_peers.py stands in for learn2learn's import of it)"
            )

        cls = type(name, (), {"__init__": refuse, "__module__": self.__name__})
        setattr(self, name, cls)
        return cls


def install_torchvision_placeholder() -> bool:
    """Register placeholder torchvision modules unless a torchvision is installed.

    Returns:
        Whether the placeholder was installed (False: a real torchvision is importable).
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return False
    for name in _TORCHVISION_MODULES:
        mod = _Placeholder(name)
        mod.__path__ = []  # a package, so that its submodules resolve from sys.modules
        sys.modules[name] = mod
    for name in _TORCHVISION_MODULES[1:]:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    return True


def import_learn2learn() -> Any:
    """``import learn2learn`` with the torchvision placeholder where torchvision is missing."""
    install_torchvision_placeholder()
    import learn2learn

    return learn2learn


# ------------------------------------------------------------------------------------- the problem
def experiment(
    algo: str,
    *,
    ways: int,
    shots: int,
    queries: int,
    meta_batch: int,
    inner_steps: int,
    inner_lr: float,
    meta_lr: float,
    lam: float = 2.0,
    cg_iters: int = 5,
    dtype: str = "float32",
    seed: int = 0,
    data_root: str | None = None,
    task_chunk: int | None = None,
) -> Experiment:
    """Our training code's problem for these settings (what ``python -m bilevel.metalearn train`` builds).

    The data are the Omniglot of ``data_root`` (or ``BILEVEL_DATA_ROOT``) with our training CLI's
    split (vinyals, no validation characters); ``init="torch"`` as in our measured presets.  The
    inner solver is plain GD with a fixed number of steps (no backtracking), as in every peer.
    """
    cfg = TrainConfig(
        algo=algo,
        dataset="omniglot",
        ways=ways,
        shots=shots,
        queries=queries,
        meta_batch=meta_batch,
        meta_lr=meta_lr,
        meta_steps=10**9,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        lam=lam,
        cg_iters=cg_iters,
        task_chunk=task_chunk,
        init="torch",
        seed=seed,
        dtype=dtype,
        device="cpu",
        threads=1,
        log_every=10**9,  # diagnostics on the first step only (a warm-up step here)
        data_root=data_root,
    )
    return build_experiment(cfg)


def module_like(exp: Experiment) -> nn.Module:
    """A fresh copy of the experiment's model holding its initial parameters ``exp.theta``."""
    model = copy.deepcopy(exp.model).to(exp.dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(exp.theta[name])
    return model


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


# -------------------------------------------------------------------------------------------- ours
class Ours:
    """Our training loop's meta-step (`MetaStep` on a `TrainState`): meta-gradient, Adam step."""

    name = "ours"

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        d = Dist()
        self.state = TrainState.start(exp.config, exp, d)
        self.meta_step = MetaStep(exp.config, exp, d, exp.config.meta_batch, lambda: 0.0, lambda: False)

    def step(self, batch: Task) -> None:
        self.meta_step(self.state, batch)

    def meta_grad(self, batch: Task) -> Grads:
        """The meta-gradient the step hands Adam (mean over the tasks), by `meta_gradient`."""
        exp = self.exp
        g, _, _ = meta_gradient(
            exp.algorithm,
            exp.model_fn,
            exp.loss,
            self.state.theta,
            batch,
            lam=self.state.lam,
            classification=True,
            vectorize=exp.config.vectorize,
            batched=exp.batched,
            diagnostics=False,
        )
        return {k: v.detach() for k, v in g.items()}


# ------------------------------------------------------------------------------------- learn2learn
class L2LMAML:
    """learn2learn's ``MAML`` wrapper as its ``examples/vision/maml_omniglot.py`` trains it."""

    def __init__(
        self, exp: Experiment, *, fast_lr: float, steps: int, first_order: bool, meta_lr: float
    ) -> None:
        l2l = import_learn2learn()
        self.name = "l2l-fomaml" if first_order else "l2l-maml"
        self.module = module_like(exp)
        self.maml = l2l.algorithms.MAML(self.module, lr=fast_lr, first_order=first_order)
        self.opt = torch.optim.Adam(self.maml.parameters(), meta_lr)
        self.steps = steps
        self.first_order = first_order

    def _accumulate(self, batch: Task) -> None:
        self.opt.zero_grad()
        error, acc = 0.0, 0.0
        B = batch.support_x.shape[0]
        for i in range(B):
            learner = self.maml.clone()
            for _ in range(self.steps):
                learner.adapt(F.cross_entropy(learner(batch.support_x[i]), batch.support_y[i]))
            predictions = learner(batch.query_x[i])
            evaluation_error = F.cross_entropy(predictions, batch.query_y[i])
            evaluation_error.backward()
            error += evaluation_error.item()
            acc += (predictions.argmax(dim=1) == batch.query_y[i]).sum().float().item() / len(
                batch.query_y[i]
            )
        for p in self.maml.parameters():
            p.grad.data.mul_(1.0 / B)

    def step(self, batch: Task) -> None:
        self._accumulate(batch)
        self.opt.step()

    def meta_grad(self, batch: Task) -> Grads:
        self._accumulate(batch)
        return {n: p.grad.detach().clone() for n, p in self.module.named_parameters()}

    def predict(self, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        """Query logits after the example's adaptation (its ``fast_adapt``) on one task's support set."""
        learner = self.maml.clone()
        for _ in range(self.steps):
            learner.adapt(F.cross_entropy(learner(x), y))
        with torch.no_grad():
            return learner(xq)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.module.named_parameters()}


# ------------------------------------------------------------------------------------------ higher
class HigherMAML:
    """higher's MAML as its ``examples/maml-omniglot.py`` trains it (query losses summed over tasks)."""

    name = "higher-maml"

    def __init__(self, exp: Experiment, *, lr: float, steps: int, meta_lr: float) -> None:
        import higher

        self.higher = higher
        self.net = module_like(exp)
        self.inner_opt = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.meta_opt = torch.optim.Adam(self.net.parameters(), lr=meta_lr)
        self.steps = steps

    def _accumulate(self, batch: Task) -> None:
        self.meta_opt.zero_grad()
        B = batch.support_x.shape[0]
        for i in range(B):
            with self.higher.innerloop_ctx(self.net, self.inner_opt, copy_initial_weights=False) as (
                fnet,
                diffopt,
            ):
                for _ in range(self.steps):
                    diffopt.step(F.cross_entropy(fnet(batch.support_x[i]), batch.support_y[i]))
                qry_logits = fnet(batch.query_x[i])
                qry_loss = F.cross_entropy(qry_logits, batch.query_y[i])
                _ = (qry_logits.argmax(dim=1) == batch.query_y[i]).sum().item()
                qry_loss.backward()

    def step(self, batch: Task) -> None:
        self._accumulate(batch)
        self.meta_opt.step()

    def meta_grad(self, batch: Task) -> Grads:
        """The mean over the tasks (the example's step sums them; Adam is nearly blind to the scale)."""
        self._accumulate(batch)
        B = batch.support_x.shape[0]
        return {n: p.grad.detach() / B for n, p in self.net.named_parameters()}

    def predict(self, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        with self.higher.innerloop_ctx(
            self.net, self.inner_opt, copy_initial_weights=True, track_higher_grads=False
        ) as (fnet, diffopt):
            for _ in range(self.steps):
                diffopt.step(F.cross_entropy(fnet(x), y))
            with torch.no_grad():
                return fnet(xq)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.net.named_parameters()}


# ------------------------------------------------------------------------------------------- betty
class BettyIMAML:
    """betty's iMAML (``examples/implicit_maml/main.py``): an Engine of an outer and an inner problem.

    The tasks come from an ``Env`` that hands out the tasks of the current meta-batch one by one (the
    example's env draws one from learn2learn's ``TaskDataset`` at each inner loop's start).
    """

    name = "betty-imaml"

    def __init__(
        self,
        exp: Experiment,
        *,
        base_lr: float,
        steps: int,
        reg: float,
        cg_iters: int,
        meta_lr: float,
        meta_batch: int,
    ) -> None:
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.envs import Env
        from betty.problems import ImplicitProblem

        self.steps = steps
        self.meta_batch = meta_batch
        self.base_lr = base_lr
        parent_module = module_like(exp)
        child_module = module_like(exp)
        # The example's AdamW(lr, weight_decay=1e-4), written as the Adam it is in this torch
        # (decoupled_weight_decay=True): betty rebuilds the optimizer as
        # ``type(opt)(params, **opt.defaults)``, and AdamW's defaults hold a key its constructor refuses.
        parent_optimizer = torch.optim.Adam(
            parent_module.parameters(), lr=meta_lr, weight_decay=1e-4, decoupled_weight_decay=True
        )
        parent_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            parent_optimizer, T_max=meta_batch * 7500
        )
        child_optimizer = torch.optim.SGD(child_module.parameters(), lr=base_lr)

        def reg_loss(parameters: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> Any:
            loss: Any = 0
            for p1, p2 in zip(parameters, reference):
                loss += torch.sum(torch.pow((p1 - p2), 2))
            return reg * loss

        class Outer(ImplicitProblem):  # type: ignore[misc]
            def training_step(self, batch: Any) -> Any:
                inputs, labels = batch
                out = self.inner(inputs)
                loss = F.cross_entropy(out, labels)
                acc = 100.0 * (out.argmax(dim=1) == labels).float().mean().item()
                return {"loss": loss, "acc": acc}

            def get_batch(self) -> Any:
                return self.env.batch["test"]

        class Inner(ImplicitProblem):  # type: ignore[misc]
            def training_step(self, batch: Any) -> Any:
                inputs, labels = batch
                out = self.module(inputs)
                loss = F.cross_entropy(out, labels)
                return loss + reg_loss(self.parameters(), self.outer.parameters())

            def get_batch(self) -> Any:
                return self.env.batch["train"]

            def on_inner_loop_start(self) -> None:
                self.module.load_state_dict(self.outer.module.state_dict())

        class TaskEnv(Env):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.batch: dict[str, Any] = {"train": None, "test": None}
                self.tasks: Task | None = None
                self.next = 0

            def step(self) -> None:
                assert self.tasks is not None
                i = self.next
                self.next += 1
                self.batch["train"] = (self.tasks.support_x[i], self.tasks.support_y[i])
                self.batch["test"] = (self.tasks.query_x[i], self.tasks.query_y[i])

        outer = Outer(
            name="outer",
            module=parent_module,
            optimizer=parent_optimizer,
            scheduler=parent_scheduler,
            config=Config(log_step=-1, retain_graph=True, gradient_accumulation=meta_batch),
        )
        inner = Inner(
            name="inner",
            module=child_module,
            optimizer=child_optimizer,
            config=Config(type="cg", cg_iterations=cg_iters, cg_alpha=1.0, unroll_steps=steps),
        )
        self.env = TaskEnv()
        self.outer, self.inner = outer, inner
        n_iters = 10**9
        self.engine = Engine(
            config=EngineConfig(valid_step=n_iters, train_iters=n_iters),
            problems=[outer, inner],
            dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
            env=self.env,
        )
        self.engine.train()

    def _engine_steps(self, batch: Task) -> None:
        """``meta_batch * steps`` engine steps, as the example's ``MAMLEngine.train_step`` takes them."""
        if batch.support_x.shape[0] != self.meta_batch:
            raise ValueError(
                f"betty: meta-batch of {batch.support_x.shape[0]} tasks, configured for {self.meta_batch}"
            )
        engine, steps = self.engine, self.steps
        self.env.tasks, self.env.next = batch, 0
        for _ in range(self.meta_batch * steps):
            engine.global_step += 1
            if engine.global_step % steps == 1 or steps == 1:
                engine.env.step()
            for leaf in engine.leaves:
                leaf.step(global_step=engine.global_step)

    def step(self, batch: Task) -> None:
        self._engine_steps(batch)

    def meta_grad(self, batch: Task) -> Grads:
        """The accumulated hypergradient at the outer's optimizer step (which is skipped)."""
        captured: list[Grads] = []

        def capture(*args: Any, **kwargs: Any) -> None:
            captured.append({n: p.grad.detach().clone() for n, p in self.outer.module.named_parameters()})

        self.outer.optimizer_step = capture
        try:
            self._engine_steps(batch)
        finally:
            del self.outer.optimizer_step
        if len(captured) != 1:
            raise RuntimeError(f"betty: {len(captured)} outer optimizer steps in one meta-step, expected 1")
        return captured[0]

    def predict(self, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        """The example's validation: SGD on the support loss alone from the outer's weights."""
        net = copy.deepcopy(self.outer.module)
        opt = torch.optim.SGD(net.parameters(), lr=self.base_lr)
        for _ in range(self.steps):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return net(xq)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.outer.module.named_parameters()}


# -------------------------------------------------------------------------------------- the pairs
#: A peer against our algorithm: the peer's settings from its example, and ours to match.
PAIRS: dict[str, dict[str, Any]] = {
    # learn2learn examples/vision/maml_omniglot.py: fast_lr 0.5, Adam 0.003, 32 tasks, 1 step
    "l2l-maml": dict(ours="maml", inner_lr=0.5, meta_lr=0.003, inner_steps=1),
    "l2l-fomaml": dict(ours="fomaml", inner_lr=0.5, meta_lr=0.003, inner_steps=1),
    # betty examples/implicit_maml: base_lr 0.1, 5 steps, 3 CG steps, reg 0.01 (5-way) / 0.003 (20-way)
    "betty-imaml": dict(ours="imaml-gd", inner_lr=0.1, meta_lr=5e-4, inner_steps=5, cg_iters=3),
    # higher examples/maml-omniglot.py: SGD 0.1, 5 steps, Adam 1e-3, 32 tasks
    "higher-maml": dict(ours="maml", inner_lr=0.1, meta_lr=1e-3, inner_steps=5),
}


def betty_reg(ways: int) -> float:
    """The example's ``--reg`` (its omniglot.sh): 0.01 at 5-way, 0.003 at 20-way."""
    return 0.01 if ways <= 5 else 0.003


def make_peer(pair: str, exp: Experiment, *, inner_steps: int, inner_lr: float, meta_lr: float) -> Any:
    """The peer of ``pair`` on ``exp``'s model and initial parameters."""
    cfg = exp.config
    if pair in ("l2l-maml", "l2l-fomaml"):
        return L2LMAML(
            exp, fast_lr=inner_lr, steps=inner_steps, first_order=pair == "l2l-fomaml", meta_lr=meta_lr
        )
    if pair == "higher-maml":
        return HigherMAML(exp, lr=inner_lr, steps=inner_steps, meta_lr=meta_lr)
    if pair == "betty-imaml":
        return BettyIMAML(
            exp,
            base_lr=inner_lr,
            steps=inner_steps,
            reg=cfg.lam / 2,
            cg_iters=cfg.cg_iters,
            meta_lr=meta_lr,
            meta_batch=cfg.meta_batch,
        )
    raise ValueError(f"unknown pair {pair!r}: one of {', '.join(PAIRS)}")


def pair_experiment(
    pair: str,
    *,
    ways: int,
    shots: int,
    queries: int,
    meta_batch: int,
    inner_steps: int | None = None,
    cg_iters: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    data_root: str | None = None,
    task_chunk: int | None = None,
) -> tuple[Experiment, dict[str, Any]]:
    """Our experiment for ``pair`` (its peer's example settings, or the given inner and CG steps)
    and those settings."""
    s = dict(PAIRS[pair])
    if inner_steps is not None:
        s["inner_steps"] = inner_steps
    if cg_iters is not None:
        s["cg_iters"] = cg_iters
    lam = 2 * betty_reg(ways) if pair == "betty-imaml" else 2.0
    exp = experiment(
        s["ours"],
        ways=ways,
        shots=shots,
        queries=queries,
        meta_batch=meta_batch,
        inner_steps=s["inner_steps"],
        inner_lr=s["inner_lr"],
        meta_lr=s["meta_lr"],
        lam=lam,
        cg_iters=s.get("cg_iters", 5),
        dtype=dtype,
        seed=seed,
        data_root=data_root,
        task_chunk=task_chunk,
    )
    return exp, {**s, "lam": lam}


def evaluate_peer(
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], tasks: Task
) -> list[float]:
    """Query accuracy (fraction) of each task of a meta-batch after the peer's own adaptation."""
    return [
        accuracy(predict(tasks.support_x[i], tasks.support_y[i], tasks.query_x[i]), tasks.query_y[i])
        for i in range(tasks.support_x.shape[0])
    ]


def ci95(xs: Sequence[float]) -> float:
    """Half-width of the normal 95% interval of the mean of ``xs``."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return 1.96 * math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
