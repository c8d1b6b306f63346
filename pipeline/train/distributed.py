"""This training process among its torchrun peers: rank, device, and what the processes share
(loss sums, a problem found by rank 0, RNG states, barriers). Without torchrun: one process."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .device import pick_device


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the DDP processes (in place)."""
    dist.all_reduce(t)
    return t


@dataclass(frozen=True)
class Process:
    """rank of world processes; device this one trains on."""

    rank: int
    world: int
    device: torch.device

    def raise_together(self, problem: Exception | None) -> None:
        """Raise rank 0's ``problem`` in every process (so that no rank waits for the others forever)."""
        if self.world > 1:
            flag = [None if problem is None else str(problem)]
            dist.broadcast_object_list(flag, src=0)
            if flag[0] is not None and problem is None:
                problem = ValueError(flag[0])
        if problem is not None:
            raise problem

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def start(device: str) -> Process:
    """Pick this process's device (``train.device``; 'auto' = its local GPU, else the CPU) and join
    torchrun's process group (NCCL on a GPU, gloo on the CPU)."""
    rank, world, local_rank = dist_env()
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before NCCL starts, so its barriers use this process's GPU
        torch.cuda.reset_peak_memory_stats(dev)
    if world > 1 and not dist.is_initialized():
        # the backend of the device the process computes on: NCCL reduces no CPU tensors (train.device=cpu
        # on a machine with GPUs)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Process(rank, world, dev)
