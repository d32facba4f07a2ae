"""Data-parallel calibration: each rank runs its share of the calibration samples through the
working layer, and the statistics the methods act on are summed across ranks before they act.

GPTQ's Hessians (``HessianAccumulator.state``: the raw sum ``Σ x xᵀ`` and the token count) and
AWQ's input statistics (``ActivationStats``: ``Σ xᵀx``, ``Σ |x|``, the count) are plain sums, so
one all-reduce (sum) gives every rank the statistics of all the samples, and every rank then
computes the same quantized weights. Launch with ``torchrun`` (NCCL on GPUs) or, on the CPU,
with the gloo backend; a process group must be initialised before ``quantize_model`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the default process group."""

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> DataParallel | None:
        """The initialised default group, or None when running alone."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def shard_samples(samples: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of the calibration samples: one contiguous block each, so with a
    batch size dividing the block the ranks' batches are exactly the single process's batches."""
    return samples.tensor_split(world_size)[rank]
