"""Counter-based Gaussian noise: a seeded table read at offsets hashed from (seed, generation, draw).

Every number a trainer perturbs with is a pure function of ``(seed, generation, draw, parameter,
element)``; no generator state is carried between generations, so any process can rebuild any
member's noise from the seed alone (what checkpoints and ``torch.distributed`` rely on).

How: a table of ``size`` i.i.d. N(0, 1) numbers is drawn once from ``seed`` (on the CPU, so CPU
and CUDA runs see the same numbers) and rounded to float16 (each number moves by < 0.05 %): the
population forward is bound by how many noise bytes it reads, and the CPU kernel
(:mod:`eggroll_rl.kernels`) reads the float16 copy, half the bytes; every other use reads the same
values as float32. Draw ``j`` of generation ``t`` reads the window
``table[o : o + width]`` with ``o = splitmix64(seed, t, j) mod (size - width + 1)``; inside a window
the parameters sit side by side at fixed offsets (see :class:`NoiseLayout`), so two parameters of
one draw never share numbers, whatever their shapes. This is the shared noise table of Salimans et
al. (2017) with a counter-based index: drawing a generation's noise costs one gather instead of
``N * width`` fresh normals (a fresh ``torch.randn`` of 1.6 M numbers takes ~22 ms on the 2-core
reference CPU, the gather < 1 ms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Finalise uint64 counters into well-mixed uint64 hashes (splitmix64)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_key(*keys: int) -> int:
    """Fold integer keys into one 64-bit hash (order matters)."""
    h = np.uint64(0)
    for k in keys:
        h = _splitmix64(np.asarray(h ^ np.uint64(int(k) & _MASK), dtype=np.uint64))
    return int(h)


@dataclass(frozen=True)
class NoiseLayout:
    """Where each perturbed parameter's numbers sit inside one draw's window."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def width(self) -> int:
        """Numbers one draw reads from the table."""
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0

    @classmethod
    def from_sizes(cls, sizes: dict[str, int]) -> NoiseLayout:
        """Lay parameters out back to back in insertion order."""
        offsets, pos = [], 0
        for size in sizes.values():
            offsets.append(pos)
            pos += size
        return cls(tuple(sizes), tuple(offsets), tuple(sizes.values()))


class NoiseTable:
    """A seeded table of standard normals, read in windows at counter-hashed offsets."""

    def __init__(
        self, seed: int, width: int, device: torch.device | str = "cpu", size: int | None = None
    ) -> None:
        if size is None:
            # ~256 windows' worth keeps reused windows rare while the table stays cheap to draw.
            size = 1 << max(18, min(24, int(np.ceil(np.log2(max(256 * width, 1))))))
        if size < width:
            raise ValueError(f"noise table size {size} is smaller than one draw ({width} numbers)")
        self.seed, self.width, self.size = int(seed), int(width), int(size)
        gen = torch.Generator().manual_seed(hash_key(self.seed, 0x7AB1E) & ((1 << 63) - 1))
        half = torch.randn(self.size, generator=gen).to(torch.float16)
        self.table = half.to(device=device, dtype=torch.float32)
        # The copy the CPU kernel reads; None where the kernel cannot run.
        self.table_fp16 = half if self.table.device.type == "cpu" else None

    def offsets(self, generation: int, draws: int) -> torch.Tensor:
        """Return the table offsets of draws ``0..draws-1`` of ``generation``."""
        base = np.uint64(hash_key(self.seed, generation))
        h = _splitmix64(np.arange(draws, dtype=np.uint64) ^ base)
        span = np.uint64(self.size - self.width + 1)
        return torch.from_numpy((h % span).astype(np.int64)).to(self.table.device)

    def windows(self, offsets: torch.Tensor) -> torch.Tensor:
        """Return the ``(len(offsets), width)`` windows that start at ``offsets``."""
        return self.table.unfold(0, self.width, 1).index_select(0, offsets)


def reuse_pattern(
    population_size: int, noise_reuse: int, device: torch.device | str = "cpu"
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Return (draws, member→draw index, member sign) for a noise_reuse setting.

    With ``noise_reuse = k >= 2`` members ``k*j .. k*j+k-1`` share draw ``j`` with signs
    ``+1, -1, +1, ...`` (k = 2 is antithetic sampling); with 0 every member has its own draw.
    """
    k = max(noise_reuse, 1)
    members = torch.arange(population_size, device=device)
    signs = torch.ones(population_size, device=device)
    if k > 1:
        signs[(members % k) % 2 == 1] = -1.0
    return population_size // k, members // k, signs
