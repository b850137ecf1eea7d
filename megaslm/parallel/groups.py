"""Data-parallel x tensor-parallel process groups, and the `mpu` object DeepSpeed reads them from.

Layout: `tp` consecutive ranks form a tensor-parallel group (they share a node when tp <= GPUs per node);
ranks with the same position inside their tensor group form a data-parallel group. ZeRO shards and reduces over
the data-parallel group only, which DeepSpeed learns from the mpu passed to `deepspeed.initialize` (with
tensor parallelism, the groups are DeepSpeed's own: see megaslm/parallel/tensor.py).
"""

from __future__ import annotations

import torch.distributed as dist

from megaslm.errors import UserError


class ParallelGroups:
    def __init__(self, tensor: int = 1):
        world = dist.get_world_size()
        rank = dist.get_rank()
        if world % tensor:
            raise UserError(f"parallel.tensor={tensor} does not divide the world size {world}")
        self.tp_size = tensor
        self.dp_size = world // tensor
        self.tp_rank = rank % tensor
        self.dp_rank = rank // tensor
        if tensor > 1:
            # AutoTP always runs on DeepSpeed's own (dp, tp) groups: use exactly those (checked against this
            # layout), so the loss, the selection and ZeRO all see the same groups.
            from megaslm.parallel.tensor import init_groups

            self.tp_group, self.dp_group = init_groups(tensor)
        else:
            self.tp_group, self.dp_group = None, dist.group.WORLD

    # --- the mpu interface DeepSpeed calls (Megatron naming) ---
    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1
