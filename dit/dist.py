"""Collectives: the one helper every all-reduce in dit/ goes through.

NCCL (the backend Ray Train and torchrun create on GPUs) refuses CPU tensors, even at world
size 1, while gloo takes CPU tensors. :func:`all_reduce_sum` moves a tensor to the process
group's device, reduces it and hands it back on the caller's device, so callers never think
about the backend. Without a process group (one process, tests) it returns its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def collective_device(backend: str, tensor_device: torch.device, cuda_index: int | None = None) -> torch.device:
    """Where a tensor must live for ``backend``'s collectives: NCCL wants CUDA, gloo takes any."""
    if backend == "nccl" and tensor_device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
    return tensor_device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (a no-op without a process group); the result is on ``t``'s device."""
    if not initialized() or dist.get_world_size() == 1:
        return t
    device = t.device
    work = t.to(collective_device(dist.get_backend(), device))
    dist.all_reduce(work)
    return work.to(device)
