"""What `megaslm train` and `megaslm score` set up alike before they build anything: the stop-signal handlers,
the process group, the data/tensor-parallel groups, the dtype and the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megaslm.parallel import dist as mdist
from megaslm.parallel.groups import ParallelGroups
from megaslm.precision import training_dtype


@dataclass
class Run:
    preemption: object  # megaslm.preempt.Preemption
    rank: int
    world: int
    groups: ParallelGroups
    dtype: torch.dtype
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_run(cfg, check_world: Callable[[int], None] | None = None) -> Run:
    """Every rank: signal handlers first (a stop signal that arrives while the engines are built is honoured
    after the first step or round), then the process group; `check_world(world_size)` runs before the groups."""
    from megaslm.preempt import Preemption

    preemption = Preemption()
    mdist.init_distributed()
    world = dist.get_world_size()
    if check_world is not None:
        check_world(world)
    groups = ParallelGroups(cfg.parallel.tensor)
    return Run(preemption, dist.get_rank(), world, groups, training_dtype(cfg), mdist.device())
