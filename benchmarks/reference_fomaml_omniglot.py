"""An independent first-order MAML on Omniglot 5-way 1-shot, to cross-check `bilevel`'s curves.

Nothing here imports `bilevel`: the images are decoded from the official zips with Pillow, the
split, the tasks, the Conv4 (stride 2, batch statistics, PyTorch's default initialization, conv
biases), the inner SGD and the Adam outer loop are written out in plain torch, one task at a
time.  If `python -m bilevel.metalearn train --algo fomaml` learns slower or plateaus lower than
this script on the same protocol, the difference is a bug in the library, not in the protocol.

Protocol (the library's Omniglot protocol): 1200 / 423 characters (sorted ids, ``default_rng(seed)``
permutation), a random quarter-turn per drawn class, 15 queries per class, meta-batch 16, 5 inner
steps of 0.4 (10 at test), Adam 1e-3; accuracy on 100 fixed test tasks every 250 meta-steps,
against this process's CPU time (evaluation included), one intra-op thread.

Measured on a 2-core CPU (one process beside another): 85.7 / 89.1 / 90.3 %
after 250 / 500 / 750 meta-steps (4.9 / 10.0 / 14.8 CPU-minutes); the library's run with
``--init torch`` and the same settings gave 84.2 / 88.1 / 88.3 % (the 95% half-width on 100
tasks is about 1.3 points).

Run: ``python benchmarks/reference_fomaml_omniglot.py --data-root ../shared/data/omniglot --minutes 15``
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def load(root: Path) -> np.ndarray:
    """``(1623, 20, 28, 28)`` uint8, strokes 255, characters in sorted id order."""
    chars: dict[str, list[np.ndarray]] = {}
    for name in ("images_background", "images_evaluation"):
        path = root / f"{name}.zip"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass --data-root, the folder with Omniglot's zips")
        with zipfile.ZipFile(path) as zf:
            for n in sorted(zf.namelist()):
                if n.endswith(".png"):
                    im = Image.open(io.BytesIO(zf.read(n))).convert("L").resize((28, 28), Image.LANCZOS)
                    chars.setdefault("/".join(n.split("/")[:3]), []).append(255 - np.asarray(im, np.uint8))
    return np.stack([np.stack(chars[k]) for k in sorted(chars)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=15.0, help="CPU-minutes of meta-training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x_all = torch.tensor(load(args.data_root), dtype=torch.float32) / 255.0
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(x_all))
    train_chars, test_chars = perm[:1200], perm[1200:]

    def task(chars: np.ndarray, g: np.random.Generator, queries: int = 15) -> tuple[torch.Tensor, ...]:
        drawn, rots = g.choice(chars, 5, replace=False), g.integers(0, 4, 5)
        sup, qry = [], []
        for c, r in zip(drawn, rots):
            x = torch.rot90(x_all[c, g.permutation(20)[: 1 + queries]], int(r), (1, 2))
            sup.append(x[:1])
            qry.append(x[1:])
        return (
            torch.cat(sup)[:, None],
            torch.arange(5),
            torch.cat(qry)[:, None],
            torch.arange(5).repeat_interleave(queries),
        )

    torch.manual_seed(args.seed)
    params: list[torch.Tensor] = []
    c_in = 1
    for _ in range(4):
        conv = torch.nn.Conv2d(c_in, 64, 3, 2, 1)
        params += [conv.weight.data, conv.bias.data, torch.ones(64), torch.zeros(64)]
        c_in = 64
    head = torch.nn.Linear(256, 5)
    theta = [t.clone().requires_grad_() for t in [*params, head.weight.data, head.bias.data]]

    def forward(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            w, b, gamma, beta = p[4 * i : 4 * i + 4]
            x = F.relu(F.batch_norm(F.conv2d(x, w, b, 2, 1), None, None, gamma, beta, training=True))
        return F.linear(x.flatten(1), p[16], p[17])

    def adapt(xs: torch.Tensor, ys: torch.Tensor, steps: int) -> list[torch.Tensor]:
        phi = [t.detach().clone().requires_grad_() for t in theta]
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), phi)
            phi = [(a - 0.4 * b).detach().requires_grad_() for a, b in zip(phi, grads)]
        return phi

    eval_rng = np.random.default_rng(args.seed + 123)
    eval_tasks = [task(test_chars, eval_rng) for _ in range(100)]

    def accuracy() -> float:
        acc = []
        for xs, ys, xq, yq in eval_tasks:
            phi = adapt(xs, ys, 10)
            with torch.no_grad():
                acc.append((forward(phi, xq).argmax(1) == yq).float().mean().item())
        return 100 * float(np.mean(acc))

    opt = torch.optim.Adam(theta, args.meta_lr)
    step, c0 = 0, time.process_time()
    while True:
        cpu = time.process_time() - c0
        if step % 250 == 0:
            print(
                json.dumps({"step": step, "cpu_min": round(cpu / 60, 2), "accuracy": round(accuracy(), 2)}),
                flush=True,
            )
        if cpu > args.minutes * 60:
            break
        total = [torch.zeros_like(t) for t in theta]
        for _ in range(16):
            xs, ys, xq, yq = task(train_chars, rng)
            phi = adapt(xs, ys, 5)
            for acc_g, g in zip(total, torch.autograd.grad(F.cross_entropy(forward(phi, xq), yq), phi)):
                acc_g += g / 16
        for t, g in zip(theta, total):
            t.grad = g
        opt.step()
        step += 1


if __name__ == "__main__":
    main()
