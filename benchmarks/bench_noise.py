"""One generation's noise: the counter-based generator against the float16 table it replaced, side by side.

For the 64-256-256-8 tanh MLP of bench_generation.py (EGGROLL layout: A and B per matrix, biases),
each round times, in a shuffled order (medians of rounds, then of repeats):

* ``table``    what sampling cost before: gather ``(draws, width)`` windows of a float16 table of
               N(0, 1) numbers at splitmix64-hashed offsets, upcast to float32 (the old
               ``NoiseTable.windows(offsets).to(float32)``, rebuilt here)
* ``compiled`` ``NoiseGenerator.sample`` on CPU with the compiled kernel (float16 and float32 rows)
* ``torch``    the same numbers from the PyTorch-ops reference (the path without a C compiler and
               on CUDA), timed on fewer rounds
* ``plain``    one plain batched forward ``model(x)``, x ``(N, 64)``, the unit of bench_generation

    python benchmarks/bench_noise.py --threads 1
"""

from __future__ import annotations

import functools
import statistics

import numpy as np
import torch
from bench_population import _unused_fitness, grid_args, interleaved, mlp

from eggroll_rl import EGGROLLTrainer, noise

_MASK = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class OldTable:
    """The noise before the counter-based generator: windows of a seeded float16 table."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.size = 1 << max(18, min(24, int(np.ceil(np.log2(max(256 * width, 1))))))
        self.table = torch.randn(self.size, generator=torch.Generator().manual_seed(0)).half().float()

    def sample(self, generation: int, draws: int) -> torch.Tensor:
        base = _splitmix64(np.asarray(np.uint64(generation)))
        h = _splitmix64(np.arange(draws, dtype=np.uint64) ^ base)
        offsets = torch.from_numpy((h % np.uint64(self.size - self.width + 1)).astype(np.int64))
        return self.table.unfold(0, self.width, 1).index_select(0, offsets).to(torch.float32)


def main() -> None:
    args = grid_args(__doc__, rounds=30)
    model = mlp()
    print(
        "| N | rank | numbers | table ms | compiled ms | torch ms | plain fwd ms | compiled / table "
        "| (compiled - table) / plain fwd |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        x = torch.randn(n, 64)
        for rank in args.ranks:
            trainer = EGGROLLTrainer(model, _unused_fitness, population_size=n, sigma=0.1, rank=rank)
            old = OldTable(trainer.layout.width)
            fns = {
                "table": functools.partial(old.sample, 3, n),
                "compiled": functools.partial(trainer.noise.sample, 3, n),
                "plain": functools.partial(model, x),
            }
            reference = [
                functools.partial(noise.reference_noise, 0, 3, b, 0, size, 0, n)
                for b, size in enumerate(trainer.layout.sizes)
            ]
            fns_torch = {"torch": lambda reference=reference: [f() for f in reference]}
            with torch.no_grad():
                runs = [interleaved(fns, args.rounds) for _ in range(args.repeats)]
                slow = interleaved(fns_torch, max(3, args.rounds // 10), warmup=1)
            t = {k: statistics.median(r[k] for r in runs) for k in fns}
            numbers = n * trainer.layout.width
            print(
                f"| {n} | {rank} | {numbers:,} | {t['table']:.3f} | {t['compiled']:.3f} | "
                f"{slow['torch']:.1f} | "
                f"{t['plain']:.3f} | {t['compiled'] / t['table']:.1f} | "
                f"{(t['compiled'] - t['table']) / t['plain']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
