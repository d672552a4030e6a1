"""Sampling on several processes under ``torchrun``: each rank takes its share of the seeds.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE.  Rank r
samples seeds[r::world] on device LOCAL_RANK and writes its own PNG files;
the ranks meet at a barrier and rank 0 assembles the npz and the grid from
the files.  The process group only exchanges barriers and a few numbers, so
it uses gloo on every machine (no NCCL communicator per GPU is needed).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from lego_model.parsing import parse_int

T = TypeVar("T")
MAX_WORLD = 65536  # processes of one run: far above any cluster a sampling run spans


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_info(env: dict[str, str] | None = None) -> RankInfo:
    """RankInfo from torchrun's environment variables (a single process when they are absent)."""
    env = os.environ if env is None else env
    world = parse_int(env.get("WORLD_SIZE", "1"), "WORLD_SIZE (set by torchrun)", 1, MAX_WORLD)
    local_world = parse_int(env.get("LOCAL_WORLD_SIZE", str(world)), "LOCAL_WORLD_SIZE (set by torchrun)", 1, world)
    return RankInfo(
        rank=parse_int(env.get("RANK", "0"), "RANK (set by torchrun)", 0, world - 1),
        world_size=world,
        local_rank=parse_int(env.get("LOCAL_RANK", "0"), "LOCAL_RANK (set by torchrun)", 0, local_world - 1),
        local_world_size=local_world,
    )


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share: every world_size-th item, so that shares differ in length by at most one."""
    return list(items[rank::world_size])


def init(info: RankInfo) -> None:
    """Join the process group of a torchrun launch (no-op for a single process)."""
    if info.distributed and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=60))


def barrier(info: RankInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def gather(info: RankInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not (info.distributed and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown(info: RankInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
