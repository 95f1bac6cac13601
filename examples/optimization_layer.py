"""A simplex-projection layer trained end to end: predicting the class proportions of a bag of digits.

Task ("learning from label proportions", inverted): a bag holds ``bag_size`` 8x8 images
of scikit-learn's handwritten digits, drawn from 1 to 3 classes; the input is the bag's
mean image (64 features) and the target the vector p of class proportions in the bag, a
point of the probability simplex with at most 3 of 10 entries nonzero.  Images are split
into train and test pools first, so test bags hold unseen images.

Model: a linear map z = W x + c followed by one of

* ``none``      z itself (the same model without a layer);
* ``softmax``   softmax(z) (on the simplex, never sparse);
* ``simplex``   the optimization layer x*(z) = argmin_{x in simplex} 1/2 ||x - z||^2
                (sparsemax), a `bilevel.layers.FixedPointLayer`: the forward pass is a
                black-box solver (the sort-based projection of Held et al. / Duchi et
                al., or cvxpy with ``--solver cvxpy``), the backward pass the implicit
                function theorem on the projected-gradient fixed point
                x = T(x, z) = proj(x - eta (x - z)), eta = 1/2.

All are trained by Adam (batches of 100 bags) on the same squared error
1/2 ||output - p||^2 (mean over bags).  Stage 1 trains the linear model alone; stage 2
trains each head for as many epochs again, starting from stage 1's (W, c), and, as a
control, from scratch for both stages' epochs.  The simplex layer from scratch does
not train: a coordinate outside the support (x_k = 0) gets no gradient (the projection's
Jacobian is zero in its row and column), so a target class pushed out of a bag's support
early cannot come back; started from stage 1, whose projected outputs are already close,
it trains well.
Reported on test bags: the mean absolute error sum_k |output_k - p_k| (twice the total
variation distance), the squared error and the accuracy of the predicted support; for
the unconstrained model also after projecting its outputs onto the simplex at test
time only (to tell training through the layer from projecting afterwards).

Gradient check (float64): the gradient of the training loss with respect to (W, c)
through the layer, against central finite differences of the loss (each a fresh black-box
solve), and `torch.autograd.gradcheck` on the layer itself.

    python examples/optimization_layer.py --out results/layer
    python examples/optimization_layer.py --out /tmp/layer --quick
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import time
from collections.abc import Callable

import numpy as np
import torch

import bilevel as bl
from bilevel.layers import FixedPointLayer

D = torch.float64
K = 10  # classes
ETA = 0.5  # step of the fixed-point map; any eta > 0 gives the same fixed points


def project_simplex(y: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row (last dimension) onto the probability simplex.

    Sort-based (Held, Wolfe & Crowder 1974; Duchi et al. 2008): x = max(y - tau, 0) with
    tau chosen so that x sums to 1.  Piecewise linear in y, so autograd through it gives
    the Jacobian almost everywhere (away from ties y_i = tau).
    """
    u, _ = torch.sort(y, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1.0
    k = torch.arange(1, y.shape[-1] + 1, dtype=y.dtype, device=y.device)
    rho = (u - css / k > 0).sum(dim=-1, keepdim=True)  # >= 1 always: u_1 - (u_1 - 1) = 1 > 0
    tau = css.gather(-1, rho - 1) / rho.to(y.dtype)
    return (y - tau).clamp_min(0.0)


def fixed_point_map(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """T(x, z) = proj(x - eta grad_x 1/2||x - z||^2); its fixed point is proj(z)."""
    return project_simplex(x - ETA * (x - z))


def sort_solver(T: Callable[..., torch.Tensor], init: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The black-box solver: the exact projection (T and init are not needed)."""
    return project_simplex(z)


class CvxpySimplex:
    """The same projection written in cvxpy, one problem per batch size (built on first use)."""

    def __init__(self) -> None:
        self._solvers: dict[int, bl.solvers.Cvxpy] = {}

    def __call__(
        self, T: Callable[..., torch.Tensor], init: torch.Tensor, z: torch.Tensor
    ) -> bl.SolverResult:
        import cvxpy as cp

        B = int(z.shape[0])
        if B not in self._solvers:
            x, zp = cp.Variable((B, K)), cp.Parameter((B, K))
            prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - zp)), [x >= 0, cp.sum(x, axis=1) == 1])
            kwargs = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}
            self._solvers[B] = bl.solvers.Cvxpy(prob, [x], [zp], solver="CLARABEL", solve_kwargs=kwargs)
        return self._solvers[B](T, init, z)


@dataclasses.dataclass(frozen=True)
class Bags:
    x: torch.Tensor  # (n, 64) mean images
    p: torch.Tensor  # (n, 10) class proportions


def make_bags(
    images: np.ndarray, labels: np.ndarray, n: int, bag_size: int, rng: np.random.Generator
) -> Bags:
    """Bags of ``bag_size`` images from 1-3 random classes with random (Dirichlet) proportions."""
    by_class = [np.flatnonzero(labels == c) for c in range(K)]
    xs, ps = [], []
    for _ in range(n):
        n_cls = int(rng.integers(1, 4))
        classes = rng.choice(K, size=n_cls, replace=False)
        counts = rng.multinomial(bag_size, rng.dirichlet(np.ones(n_cls)))
        idx = np.concatenate([rng.choice(by_class[c], size=m) for c, m in zip(classes, counts)])
        xs.append(images[idx].mean(axis=0))
        p = np.zeros(K)
        p[classes] = counts / bag_size
        ps.append(p)
    return Bags(torch.tensor(np.array(xs), dtype=D), torch.tensor(np.array(ps), dtype=D))


class Model(torch.nn.Module):
    """z = W x + c, then the output map (``none``, ``softmax`` or the simplex layer)."""

    def __init__(self, head: str, n_in: int, layer: FixedPointLayer | None) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_in, K, dtype=D)
        self.head = head
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x)
        if self.head == "softmax":
            return torch.softmax(z, dim=-1)
        if self.head == "simplex":
            assert self.layer is not None
            return self.layer(z)
        return z


def loss_fn(out: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - p) ** 2).sum(dim=-1).mean()


def metrics(out: torch.Tensor, p: torch.Tensor) -> dict[str, float]:
    return {
        "mae": float((out - p).abs().sum(dim=-1).mean()),
        "sq_err": float(loss_fn(out, p)),
        "support_acc": float(((out > 1e-6) == (p > 0)).double().mean()),
    }


def train(model: Model, bags: Bags, epochs: int, batch: int, lr: float, seed: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = bags.x.shape[0]
    history = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = loss_fn(model(bags.x[idx]), bags.p[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / n)
    return history


def gradient_check(layer: FixedPointLayer, bags: Bags, seed: int) -> dict[str, float]:
    """The loss gradient w.r.t. (W, c) through ``layer`` vs central differences of the loss.

    Every finite-difference evaluation re-solves with ``sort_solver`` (exact to rounding),
    so that the reference is limited by eps only: O(eps^2) truncation (zero here, the map
    is piecewise linear and no kink is crossed) plus rounding ~1e-16 / eps.  With the cvxpy
    solver, ``layer``'s forward pass has cvxpy's accuracy and the comparison includes it.
    """
    torch.manual_seed(seed)
    model = Model("simplex", bags.x.shape[1], layer)
    x, p = bags.x[:32], bags.p[:32]
    params = [model.linear.weight, model.linear.bias]
    loss = loss_fn(model(x), p)
    grads = torch.autograd.grad(loss, params)
    g = torch.cat([t.reshape(-1) for t in grads])
    exact = FixedPointLayer(fixed_point_map, sort_solver, optimality_tol=1e-10)
    eps = 1e-6
    fd = torch.empty_like(g)
    flat = torch.cat([t.detach().reshape(-1) for t in params])
    n_w = K * x.shape[1]

    def loss_at(v: torch.Tensor) -> float:
        with torch.no_grad():
            return float(loss_fn(exact(x @ v[:n_w].view(K, -1).T + v[n_w:]), p))

    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        fd[i] = (loss_at(flat + e) - loss_at(flat - e)) / (2 * eps)
    err = float((g - fd).abs().max())
    z = (torch.randn(6, K, dtype=D) * 0.5).requires_grad_(True)
    ok = torch.autograd.gradcheck(lambda t: exact(t), (z,), eps=1e-6, atol=1e-8)
    return {
        "n_params": float(flat.numel()),
        "max_abs_err": err,
        "max_rel_err": err / float(g.abs().max()),
        "grad_max": float(g.abs().max()),
        "gradcheck": float(ok),
    }


def evaluate(
    name: str, model: Model, train_bags: Bags, test_bags: Bags, seconds: float, project: bool = False
) -> dict[str, object]:
    with torch.no_grad():
        out_tr, out_te = model(train_bags.x), model(test_bags.x)
        if project:
            out_tr, out_te = project_simplex(out_tr), project_simplex(out_te)
        train_loss = float(loss_fn(out_tr, train_bags.p))
        test = metrics(out_te, test_bags.p)
        return {"model": name, "train_loss": train_loss, **test, "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/layer"))
    ap.add_argument("--quick", action="store_true", help="fewer bags and epochs (seconds)")
    ap.add_argument("--solver", choices=["sort", "cvxpy"], default="sort", help="the layer's forward solver")
    ap.add_argument("--bag-size", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per stage (default 30; quick 8)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n_train, n_test = (500, 500) if args.quick else (2000, 2000)
    epochs = args.epochs if args.epochs is not None else (8 if args.quick else 30)

    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = images / 16.0
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(labels))
    half = len(labels) // 2
    tr_idx, te_idx = order[:half], order[half:]
    train_bags = make_bags(images[tr_idx], labels[tr_idx], n_train, args.bag_size, rng)
    test_bags = make_bags(images[te_idx], labels[te_idx], n_test, args.bag_size, rng)

    solver = sort_solver if args.solver == "sort" else CvxpySimplex()
    # The residual ||T(x) - x|| (over a whole batch) of the sort-based answer is rounding
    # (~1e-16); Clarabel's is ~1e-6 on 100 x 10 unknowns (measured): 1e-5 accepts both
    # and still rejects a wrong answer.
    layer = FixedPointLayer(fixed_point_map, solver, optimality_tol=1e-5)
    n_in = images.shape[1]

    def fit(head: str, start: Model | None, n_epochs: int) -> tuple[Model, float]:
        torch.manual_seed(args.seed)  # the same initial (W, c) for every head trained from scratch
        model = Model(head, n_in, layer if head == "simplex" else None)
        if start is not None:
            model.linear.load_state_dict(start.linear.state_dict())
        t0 = time.perf_counter()
        train(model, train_bags, n_epochs, batch=100, lr=args.lr, seed=args.seed)
        return model, time.perf_counter() - t0

    # Stage 1: the linear model alone (squared error on p), the common starting point.
    pre, t_pre = fit("none", None, epochs)
    rows = []
    # Stage 2: every head trained `epochs` more epochs from there, and from scratch for 2 x epochs.
    cont, t = fit("none", pre, epochs)
    rows.append(evaluate("linear (no layer)", cont, train_bags, test_bags, t_pre + t))
    rows.append(
        evaluate("linear, projected at test time only", cont, train_bags, test_bags, t_pre + t, project=True)
    )
    back = None
    for head, label in (("softmax", "linear + softmax"), ("simplex", "linear + simplex layer")):
        model, t = fit(head, pre, epochs)
        if head == "simplex" and layer.last_info is not None:
            back = layer.last_info.last_backward  # of the last training step
        rows.append(evaluate(f"{label} (from stage 1)", model, train_bags, test_bags, t_pre + t))
        model, t = fit(head, None, 2 * epochs)
        rows.append(evaluate(f"{label} (from scratch)", model, train_bags, test_bags, t))

    check = gradient_check(layer, train_bags, args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "optimization_layer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(args.out / "gradient_check.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(check))
        writer.writeheader()
        writer.writerow(check)
    print(
        f"bags: {n_train} train / {n_test} test, {args.bag_size} images each; {epochs} epochs per stage; "
        f"layer solver: {args.solver}"
    )
    print(f"{'model':45s} {'train loss':>10s} {'test MAE':>9s} {'test sq err':>11s} {'support acc':>11s}")
    for r in rows:
        print(
            f"{r['model']:45s} {r['train_loss']:10.5f} {r['mae']:9.5f} {r['sq_err']:11.6f} "
            f"{r['support_acc']:11.4f}"
        )
    if back is not None:
        print(
            f"last training step's backward solve: {back.status.name}, {back.n_iter} GMRES iterations, "
            f"relative residual {back.relative_residual:.1e}"
        )
    print(
        f"gradient check ({args.solver} solver) over {int(check['n_params'])} parameters "
        f"(float64, central differences, eps=1e-6): max abs err {check['max_abs_err']:.2e}, "
        f"max rel err {check['max_rel_err']:.2e} "
        f"(largest |grad| {check['grad_max']:.2e}); torch.autograd.gradcheck: {bool(check['gradcheck'])}"
    )
    print(f"wrote {args.out / 'optimization_layer.csv'} and {args.out / 'gradient_check.csv'}")


if __name__ == "__main__":
    main()
