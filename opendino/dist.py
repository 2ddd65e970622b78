"""Process-group helpers: one process without `torchrun` is the same code path with world size 1.

Every collective here is a no-op (returning its input) when no process group is initialised, so library code calls
them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as tdist

__all__ = [
    "all_gather_cat",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast_object",
    "cleanup",
    "init_distributed",
    "is_distributed",
    "is_main",
    "local_rank",
    "print0",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a default process group is initialised (even with one process)."""
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0 of the process group; without one, what torchrun's `RANK` says (so also before init and after
    `cleanup`: code that runs after `run_train` returns prints once, not once per process)."""
    if is_distributed():
        return rank() == 0
    return int(os.environ.get("RANK", 0)) == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_distributed(device: torch.device | str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's environment; returns whether one is (now) active.

    Backend: NCCL for CUDA devices, gloo otherwise. Without torchrun's variables nothing happens (world size 1).
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def cleanup() -> None:
    """Tear the process group down once every process got here: none is still in a collective with a peer, and no
    gloo work is pending while the interpreter exits (a SIGABRT "terminate called without an active exception")."""
    if is_distributed():
        tdist.barrier()
        tdist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (`sum`, `mean`, `max`, `min`) across processes; returns `tensor`."""
    if not is_distributed() or world_size() == 1:
        return tensor
    ops = {"sum": tdist.ReduceOp.SUM, "mean": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"unknown reduce op {op!r}; expected one of {sorted(ops)}")
    tdist.all_reduce(tensor, op=ops[op])
    if op == "mean":
        tensor.div_(world_size())
    return tensor


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate `tensor` from every process along `dim` (same shape on every process); no gradient."""
    if not is_distributed() or world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    tdist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def all_gather_object(obj: object) -> list:
    """[obj of process 0, obj of process 1, ...] on every process (pickled); [obj] when not distributed."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """`obj` from process `src` on every process (pickled); the object itself when not distributed."""
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def print0(*args: object, **kwargs) -> None:
    """`print` on the main process only."""
    if is_main():
        print(*args, **kwargs)


@contextmanager
def main_first() -> Iterator[None]:
    """Run the body on the main process first (e.g. to create folders), then on the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
