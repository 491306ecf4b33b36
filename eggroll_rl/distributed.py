"""torch.distributed plumbing: which members a process evaluates, and the fitness all-gather."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """The processes sharing one population (a single process when torch.distributed is off)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        """Describe the running process group, or a world of one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints progress."""
        return self.rank == 0

    def member_slice(self, population_size: int) -> slice:
        """Return the contiguous block of members this process evaluates."""
        per, extra = divmod(population_size, self.size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (1 if self.rank < extra else 0))

    def all_gather(self, local: torch.Tensor, population_size: int) -> torch.Tensor:
        """Assemble the full fitness vector from every process's block (in member order)."""
        if self.size == 1:
            return local
        # Blocks may differ by one member: pad to the largest, gather, then trim.
        longest = -(-population_size // self.size)
        padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        blocks = []
        for r, part in enumerate(parts):
            s = World(r, self.size).member_slice(population_size)
            blocks.append(part[: s.stop - s.start])
        return torch.cat(blocks)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (unchanged in a world of one)."""
        if self.size == 1:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out)
        return out
