"""Multi-process training under ``torchrun``: process-group set-up and the few collectives used.

``torchrun --nproc-per-node N -m advedge train ...`` (or ``distill``) starts N processes that
share one run. Each process finds ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in its environment; :func:`init_distributed` turns them into a process group
(NCCL on CUDA, one GPU per process; gloo on CPU). Without ``torchrun`` (``WORLD_SIZE`` unset or
1) everything here is a no-op, so single-process code paths are unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from advedge.errors import UsageError

__all__ = [
    "barrier",
    "broadcast_buffers",
    "distributed_session",
    "env_world_size",
    "init_distributed",
    "parameters_agree",
    "rank_and_world",
]

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"WORLD_SIZE must be an integer, got {raw!r}") from None


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> bool:
    """Initialise the process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``.

    The backend is NCCL when ``device`` resolves to CUDA (each process then uses the GPU
    ``LOCAL_RANK``) and gloo otherwise.

    Returns:
        True when this call created the process group (the caller should destroy it).

    Raises:
        UsageError: ``WORLD_SIZE > 1`` without the other torchrun variables, or torch built
            without ``torch.distributed``.
    """
    world = env_world_size()
    if world <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if dist.is_initialized():
        return False
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise UsageError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set",
            "launch with torchrun --nproc-per-node N -m advedge ...",
        )
    from advedge.utils import resolve_device

    use_cuda = resolve_device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    # A group left alive at interpreter exit can abort the process from gloo's or NCCL's
    # destructors ("terminate called without an active exception"); callers of the Python API
    # (train() straight under torchrun) rarely destroy it, so do it at exit for them.
    atexit.register(_destroy_if_initialized)
    return True


def _destroy_if_initialized() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # no barrier here: a rank exiting on an error must not wait for peers that may be stuck
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[tuple[int, int]]:
    """Run a block inside the torchrun process group; yields ``(rank, world_size)``.

    The group is destroyed on exit if this block created it.
    """
    created = init_distributed(device)
    try:
        yield rank_and_world()
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP synchronises buffers before each training forward, but each rank's last forward still
    updates its own copy; this makes the state identical before it is scored or saved.
    """
    import torch.distributed as dist

    if rank_and_world()[1] <= 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src)


def parameters_agree(model: nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters and buffers (True in one process).

    Compares a float64 checksum vector across ranks with an all-reduce of its max and min.
    """
    import torch.distributed as dist

    if rank_and_world()[1] <= 1:
        return True
    sums = torch.stack([_checksum(t) for t in (*model.parameters(), *model.buffers())])
    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted float64 sum: equal tensors give equal sums, a swap changes it."""
    flat = t.detach().reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
    return (flat * weights).sum()
