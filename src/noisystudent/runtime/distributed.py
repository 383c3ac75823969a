"""Distribution as a thin layer: torchrun environment -> process group, device, rank helpers.

Works unchanged on one process (no torchrun), on many CPU processes (gloo) and on GPUs (NCCL),
on one node or many. Every helper is a no-op on a single process, so training code calls them
unconditionally instead of branching on ``ctx.distributed``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ConfigError, DistributedError, error_reason


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's CUDA device if there is one, else the CPU.

    A CUDA device that does not exist is a one-line :class:`ConfigError` rather than CUDA's
    "invalid device ordinal" at the first allocation (the usual cause: torchrun started more
    processes per node than the node has GPUs).
    """
    if preference == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(preference)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"device={preference!r} but no CUDA device is available; use device=cpu or auto")
        if device.index >= count:
            raise ConfigError(f"this process needs {device} (local rank {local_rank}) but the node has {count} "
                              f"CUDA device(s); start torchrun with --nproc-per-node {count} or use device=cpu")
    return device


def launch_rank() -> int:
    """The rank the launcher (torchrun) gave this process, 0 without one: whether it speaks for
    the job, also before or after its process group exists."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join the torchrun process group if launched by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


# ------------------------------------------------------------------------------ collectives

RESUME_HINT = "noisystudent run --resume RUN_DIR"


class RankFailure(DistributedError):
    """A collective failed because another process of the job died (killed, out of memory, or
    stopped by its own error). ``run_dir`` fills in the resume command when the caller knows it."""

    def __init__(self, op: str, rank: int, reason: str, run_dir: str | None = None):
        super().__init__(op, rank, reason, run_dir)
        self.op, self.rank, self.reason, self.run_dir = op, rank, reason, run_dir

    def __str__(self) -> str:
        resume = RESUME_HINT.replace("RUN_DIR", str(self.run_dir)) if self.run_dir else RESUME_HINT
        return (f"rank {self.rank}: another process of this job died during {self.op} ({self.reason}); "
                f"see its log for why, then continue with: {resume}")


# Words in the errors gloo and NCCL raise when a peer process goes away.
_PEER_GONE = ("peer", "broken pipe", "timed out", "remote worker", "nccl", "gloo")


def collective_failure(e: BaseException, op: str = "a collective operation") -> RankFailure | None:
    """The one-line :class:`RankFailure` for an error raised by a collective (our helpers, or DDP's
    gradient all-reduce inside ``backward``), or None if ``e`` is not one."""
    if isinstance(e, RankFailure):
        return e
    is_dist = isinstance(e, getattr(dist, "DistError", ())) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _PEER_GONE))
    if not is_dist:
        return None
    reason = error_reason(e)
    if reason.startswith("[") and "] " in reason:  # drop gloo's "[/path/to/pair.cc:561] " prefix
        reason = reason.split("] ", 1)[1]
    reason = reason.split(". ")[0].rstrip(".")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return RankFailure(op, rank, reason)


def _collective(fn):
    """Run a collective helper; a peer's death becomes one :class:`RankFailure` line instead of
    gloo's "Connection reset by peer" traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            failure = collective_failure(e, fn.__name__)
            if failure is None:  # any RuntimeError out of a collective is a communication failure
                failure = RankFailure(fn.__name__, dist.get_rank() if dist.is_initialized() else 0,
                                      error_reason(e))
            raise failure from None

    return wrapper


@_collective
def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here."""
    if ctx.distributed:
        dist.barrier()


@_collective
def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``t`` over ranks, in place."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@_collective
def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks take the same branch)."""
    if not ctx.distributed:
        return flag
    # NCCL only reduces device tensors; gloo reduces CPU tensors. ctx.device matches the backend.
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@_collective
def all_gather_object(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


@_collective
def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """Send a picklable object from ``src`` to every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_indices(n: int, ctx: DistContext) -> range:
    """This rank's contiguous share of ``n`` items (shares differ in size by at most one)."""
    per, extra = divmod(n, ctx.world_size)
    start = ctx.rank * per + min(ctx.rank, extra)
    return range(start, start + per + (1 if ctx.rank < extra else 0))


def local_batch_size(global_batch: int, ctx: DistContext, what: str = "train.batch_size") -> int:
    """This rank's share of a global batch. Shares must be equal: DDP averages gradients over
    ranks, which equals the mean over the global batch only when every rank holds as many images."""
    if global_batch % ctx.world_size:
        raise ConfigError(f"{what}: the global batch of {global_batch} images does not split evenly "
                          f"over {ctx.world_size} processes; use a multiple of {ctx.world_size}")
    return global_batch // ctx.world_size


def convert_sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """BatchNorm layers that compute their batch statistics over all ranks' images (CUDA only).

    Uses timm's converter, which also handles timm's fused BatchNorm+activation layers (torch's
    own would drop their activation). A no-op on one process, where there is nothing to sync.
    """
    if not ctx.distributed:
        return model
    if ctx.device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA: torch's SyncBatchNorm does not run on CPU "
                          "processes; set train.sync_bn=false")
    from timm.layers import convert_sync_batchnorm as timm_convert  # lazy: timm costs ~3 s to import

    return timm_convert(model)


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several processes, else ``model``.

    DDP broadcasts rank 0's weights and buffers at construction (so ranks start identical) and
    averages gradients in ``backward``.
    """
    if not ctx.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group. Never raises: it runs in ``finally`` blocks, where an error of
    its own (the group is broken because a peer died) would hide the error that got there."""
    if ctx.distributed and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - see the docstring
            pass
