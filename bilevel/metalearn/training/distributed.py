"""Data-parallel meta-training over ``torch.distributed`` ranks (``torchrun --nproc_per_node=N``).

Rank r computes tasks ``range(r, B, N)`` of every meta-batch of B tasks; the per-task gradient sums
are all-reduced (`allreduce_`) and every rank takes the same Adam step from the same state
(`broadcast_` of the initial parameters), so the parameters stay identical.  The backend is
``nccl`` on CUDA and ``gloo`` otherwise.  With ``WORLD_SIZE`` unset or 1 every function here is a
no-op, so the training loop has one code path.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ... import BilevelError
from ...tree import ravel, unravel_like
from .config import ConfigError

__all__ = ["Dist", "allreduce_", "broadcast_", "finish", "init_distributed", "rank_device", "training_device"]


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the process group.

    Attributes:
        rank: this process's rank (0 without ``torch.distributed``).
        world: number of ranks (1 without ``torch.distributed``).
        owned: the process group was created by `init_distributed`, which `finish` then destroys.
    """

    rank: int = 0
    world: int = 1
    owned: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the rank that writes files and evaluates."""
        return self.rank == 0


def training_device(requested: str | None) -> torch.device:
    """The training device: ``requested`` (a `TrainConfig`'s ``device``), else CUDA where there is one.

    Raises:
        ConfigError: ``requested`` names CUDA, or a GPU, that this machine does not have.
    """
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device",
                requested,
                "CUDA is not available here (torch.cuda.is_available() is False): use cpu",
            )
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise ConfigError("device", requested, f"this machine has {n} GPU(s): cuda:0 to cuda:{n - 1}")
    return device


def init_distributed(device: torch.device) -> Dist:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1), creating it if needed.

    Args:
        device: the training device; a CUDA device selects the ``nccl`` backend, anything else ``gloo``.

    Returns:
        `Dist` of this process; ``Dist()`` (one rank) where ``WORLD_SIZE`` is unset or 1.

    Raises:
        BilevelError: on CUDA, this node runs more ranks than it has GPUs (``nccl`` needs a GPU
            per rank; two ranks cannot share one).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if device.type == "cuda":
        _check_gpus_per_rank()
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), owned)


def _check_gpus_per_rank() -> None:
    """Refuse more ranks on this node than GPUs, before ``nccl`` fails with 'invalid device ordinal'."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    n = torch.cuda.device_count()
    if local_rank >= n or local_world > n:
        raise BilevelError(
            f"torchrun started {local_world} ranks on this node (this is local rank {local_rank}) but it has "
            f"{n} GPU(s); nccl needs one GPU per rank: use --nproc_per_node={max(n, 1)} or fewer, or train "
            "on the CPU with --device cpu (gloo)"
        )


def rank_device(device: torch.device, d: Dist) -> torch.device:
    """``device``, or this rank's GPU (``LOCAL_RANK``) where several ranks train on CUDA.

    Raises:
        BilevelError: ``LOCAL_RANK`` names a GPU this node does not have.
    """
    if d.world > 1 and device.type == "cuda":
        _check_gpus_per_rank()
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def allreduce_(tensors: list[torch.Tensor], d: Dist) -> None:
    """Sum ``tensors`` over the ranks, in place, in one all-reduce of their concatenation."""
    if d.world > 1:
        import torch.distributed as dist

        tree = tuple(tensors)
        flat = ravel(tree)
        dist.all_reduce(flat)
        for t, c in zip(tensors, unravel_like(flat, tree)):
            t.copy_(c)


def broadcast_(tensors: list[torch.Tensor], d: Dist) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values, in place."""
    if d.world > 1:
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t, src=0)


def finish(d: Dist) -> None:
    """Wait for every rank, then destroy the process group if `init_distributed` created it.

    The other ranks wait here while rank 0 evaluates: a rank that exits while its peers still hold
    gloo connections can abort in the teardown ("terminate called without an active exception").
    """
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
        if d.owned:
            dist.destroy_process_group()
