"""Object collectives of an evaluation (rank 0's result everywhere, every rank's to rank 0);
no-ops in one process. Tensor sums go through :func:`dit.dist.all_reduce_sum`."""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist

from dit import dist as ddist
from dit.errors import ConfigError

__all__ = ["broadcast", "gather", "on_rank0", "world"]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return ddist.rank(), ddist.world_size()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if ddist.world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, on rank 0 (None elsewhere)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_rank0(fn: Callable[[], Any]) -> tuple[Any, bool]:
    """Run ``fn`` on rank 0 only: (its result there / None elsewhere, whether it was not None).
    A ConfigError it raises is raised on every rank, so all ranks fail alike."""
    result, error = None, None
    if ddist.rank() == 0:
        try:
            result = fn()
        except ConfigError as err:
            error = str(err)
    error, found = broadcast((error, result is not None))
    if error is not None:
        raise ConfigError(error)
    return result, found
