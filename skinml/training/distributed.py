"""DistributedDataParallel plumbing (torchrun): process setup and the loop helpers.

Under `torchrun` every process trains on its own shard of each epoch's sample order;
evaluation predictions are gathered so metrics cover the full split; only rank 0 logs,
checkpoints and logs the model. Without torchrun everything here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from skinml.core.errors import SkinmlError, first_line

T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Cluster()


def init_cluster() -> Cluster:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Cluster(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def close_cluster(cluster: Cluster) -> None:
    if cluster.distributed and dist.is_initialized():
        dist.destroy_process_group()


def device_for(cluster: Cluster, requested: torch.device) -> torch.device:
    """One GPU per process: cuda -> cuda:LOCAL_RANK under torchrun."""
    if cluster.distributed and requested.type == "cuda" and requested.index is None:
        return torch.device("cuda", cluster.local_rank)
    return requested


def shard(order: np.ndarray, cluster: Cluster) -> np.ndarray:
    """This rank's share of a global epoch order: every rank the same number of samples.

    All ranks draw the same order (same seed), so the balanced distribution of the
    sampling strategy holds over the union; the last len % world_size samples are dropped.
    """
    usable = len(order) - len(order) % cluster.world_size
    return order[cluster.rank:usable:cluster.world_size]


def wrap(model: nn.Module, cluster: Cluster, device: torch.device) -> nn.Module:
    if not cluster.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def gather(value: Any, cluster: Cluster) -> list[Any]:
    """Every rank's `value`, in rank order (just [value] without torchrun)."""
    if not cluster.distributed:
        return [value]
    values: list[Any] = [None] * cluster.world_size
    dist.all_gather_object(values, value)
    return values


def sync_buffers(model: nn.Module, cluster: Cluster) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats).

    Each rank updates its BatchNorm statistics on its own shard after DDP's broadcast, so
    without this the ranks would evaluate (and checkpoint) slightly different models.
    """
    if cluster.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def barrier(cluster: Cluster) -> None:
    if cluster.distributed:
        dist.barrier()


def main_first(action: Callable[[], T], cluster: Cluster) -> T:
    """`action()` on rank 0, then on the other ranks (what rank 0 builds, they find).

    When rank 0's action fails, the others raise its one-line reason (a SkinmlError as a
    SkinmlError) instead of waiting for rank 0 for ever at a barrier, or dying on a closed
    connection with a traceback.
    """
    if not cluster.distributed:
        return action()
    if cluster.is_main:
        try:
            result = action()
        except BaseException as exc:
            gather((isinstance(exc, SkinmlError), first_line(exc)), cluster)
            raise
        gather(None, cluster)
        return result
    failure = gather(None, cluster)[0]
    if failure is not None:
        bad_input, reason = failure
        raise (SkinmlError if bad_input else RuntimeError)(f"rank 0 stopped: {reason}")
    return action()
