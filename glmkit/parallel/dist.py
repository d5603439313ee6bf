"""The torch.distributed setup every multi-process command shares (training's DDP/FSDP, tensor-parallel
inference), and the few collectives tensor parallelism needs.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); init_distributed joins the
process group once: gloo on CPU, NCCL on CUDA (each rank on cuda:LOCAL_RANK).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, timeout_s: Optional[float] = None) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: gloo on CPU, NCCL on CUDA. timeout_s: how long a collective
    may wait (default torch's; an inference follower may wait for the next request for a long time)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group("nccl" if cuda else "gloo", **kw)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_sum(x: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    if dist_info.world > 1:
        import torch.distributed as dist
        dist.all_reduce(x)
    return x


# --- collectives of tensor-parallel layers (the default process group is the tensor-parallel group) --------

def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place (x contiguous)."""
    import torch.distributed as dist
    dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on every rank -> [..., world * n], rank r's part at [r*n, (r+1)*n)."""
    import torch.distributed as dist
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)


def broadcast_object(obj=None, src: int = 0, device=None):
    """obj from rank src to every rank (pickled; tensors travel on the CPU). Returns it on every rank."""
    import torch.distributed as dist
    box = [obj]
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=src, device=dev)
    return box[0]
