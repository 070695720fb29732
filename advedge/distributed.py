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
import logging
import os
import time
from collections.abc import Iterator

import torch
from torch import nn

from advedge.errors import UsageError

__all__ = [
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_buffers",
    "distributed_session",
    "env_world_size",
    "init_distributed",
    "parameters_agree",
    "rank_and_world",
]

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a collective waits for the backend to let go of its tensor (see _settled).
_RELEASE_TIMEOUT_S = 60.0


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
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local)
        # device_id binds the group to this rank's GPU: NCCL connects eagerly and never
        # guesses the device (no warning, no hang from a rank using another rank's GPU)
        dist.init_process_group(backend="nccl", device_id=local)
    else:
        dist.init_process_group(backend="gloo")
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


def all_reduce(tensor: torch.Tensor, op: object = None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over every rank (sum unless ``op`` says otherwise).

    Every collective advedge issues from Python goes through this function or :func:`broadcast`,
    because a plain ``torch.distributed`` call is not safe at the end of a process: it returns
    when the result is ready, but the backend's worker thread (gloo's ``pt_gloo_runloop``) still
    holds its reference to ``tensor`` for a moment. If Python drops the tensor first, that
    worker later frees a tensor that Python owns, which needs the GIL; if the interpreter has
    begun to finalise by then (the rank that finishes first, on a loaded machine), the worker
    is ended inside a destructor and the process aborts with ``terminate called without an
    active exception``. Destroying the process group does not stop those workers, because a
    DDP wrapper keeps the group alive. So this function returns only once the backend has let
    go of ``tensor`` (:func:`_settled`).

    Returns:
        ``tensor`` (reduced in place).
    """
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        with _settled(tensor):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of rank ``src``'s ``tensor`` to every rank (see :func:`all_reduce`).

    Returns:
        ``tensor`` (overwritten with rank ``src``'s values).
    """
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        with _settled(tensor):
            dist.broadcast(tensor, src)
    return tensor


@contextlib.contextmanager
def _settled(tensor: torch.Tensor) -> Iterator[None]:
    """Run a synchronous collective on ``tensor``; exit only when the backend holds no reference.

    The reference count of the tensor's implementation is read before the collective and polled
    after it (sleeping, so the worker thread can run) until it is back; after
    ``_RELEASE_TIMEOUT_S`` a warning is logged and the caller goes on.
    """
    use_count = getattr(tensor, "_use_count", None)
    if use_count is None or tensor.device.type != "cpu":
        # A torch without the counter: nothing to wait on. CUDA tensors go through NCCL, whose
        # watchdog may keep a finished work (and its tensor) until its next poll, and whose
        # process-group shutdown joins that watchdog; the abort was seen with gloo's workers.
        yield
        return
    before = use_count()
    yield
    deadline = time.monotonic() + _RELEASE_TIMEOUT_S
    delay = 1e-4
    while use_count() > before:
        if time.monotonic() > deadline:
            logger.warning(
                "the distributed backend still holds a tensor %.0f s after its collective",
                _RELEASE_TIMEOUT_S,
            )
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


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

    if rank_and_world()[1] <= 1:
        return
    for buf in model.buffers():
        broadcast(buf.data, src)


def parameters_agree(model: nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters and buffers (True in one process).

    Compares a float64 checksum vector across ranks with an all-reduce of its max and min.
    """
    import torch.distributed as dist

    if rank_and_world()[1] <= 1:
        return True
    sums = torch.stack([_checksum(t) for t in (*model.parameters(), *model.buffers())])
    hi, lo = sums.clone(), sums.clone()
    all_reduce(hi, op=dist.ReduceOp.MAX)
    all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted float64 sum: equal tensors give equal sums, a swap changes it."""
    flat = t.detach().reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
    return (flat * weights).sum()
