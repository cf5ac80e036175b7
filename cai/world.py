"""Which process of a launch this is, and the collectives data-parallel stages use between ranks.

    accelerate launch --num_processes 8 -m cai generate sl -c my.yaml

torchrun (and `accelerate launch`, which uses it) tells each process its place through the
environment: `RANK` (0..WORLD_SIZE-1), `WORLD_SIZE`, `LOCAL_RANK` (its index on this machine,
hence its GPU). Without them a process is rank 0 of 1 and nothing here starts a process group.

`Comm` is what the generation stages need from `torch.distributed`, on a gloo group of their own
whatever the training backend is (nccl on GPUs): broadcast a decision from rank 0, gather small
per-rank figures, and barriers. The default group is started through accelerate's `PartialState`,
exactly as the training stages start it, so a `cai run` that labels and then trains shares one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

RANK_TIMEOUT_ENV = "CAI_RANK_TIMEOUT"
RANK_TIMEOUT_DEFAULT = 1800.0


@dataclass(frozen=True)
class World:
    """This process's place in the launch: rank `rank` of `size`, `local_rank` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def world() -> World:
    """The launch as torchrun / accelerate describe it in the environment (rank 0 of 1 without)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} do not describe a launch")
    return World(rank=rank, size=size, local_rank=local)


def rank_timeout() -> float:
    """Seconds a rank waits for the others without seeing any progress (`CAI_RANK_TIMEOUT`)."""
    raw = os.environ.get(RANK_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else RANK_TIMEOUT_DEFAULT
    except ValueError:
        raise ValueError(f"{RANK_TIMEOUT_ENV}={raw!r} must be a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{RANK_TIMEOUT_ENV}={raw!r} must be positive")
    return value


def local_cuda_device() -> str:
    """`cuda:<LOCAL_RANK>`: under a launch each rank takes its own GPU ('cuda' = the first one)."""
    return f"cuda:{world().local_rank}"


class Comm:
    """Collectives between the ranks of this launch; in a one-process run each is the identity."""

    def __init__(self, here: World) -> None:
        self.world = here
        self._group: Any = None
        if here.size > 1:
            import torch.distributed as dist
            from accelerate import PartialState

            PartialState()  # the default group, as the training stages start it (nccl or gloo)
            # object collectives and barriers on CPU tensors, with our own timeout, whatever the default
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=rank_timeout()))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if self._group is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self._group is None:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world.size
        dist.all_gather_object(values, value, group=self._group)
        return values

    def barrier(self) -> None:
        if self._group is not None:
            import torch.distributed as dist

            dist.barrier(group=self._group)


@cache
def comm() -> Comm:
    """This process's `Comm` (one per process: a process group is made once, by every rank)."""
    return Comm(world())
