"""Time split of one EGGROLL generation on the 64-256-256-8 tanh MLP, in ms and in plain forwards.

Parts (each the real trainer code path, interleaved in a shuffled order per round, medians):

* ``sample``   ``trainer.sample_perturbations(N)`` (the counter-based noise: Philox + inverse CDF)
* ``prepare``  ``trainer.make_population(...)`` (signed, scaled per-member factors and biases)
* ``forward``  one ``pop(x)`` on ``(N, 64)`` inputs; ``plain`` is ``model(x)`` for comparison
* ``shaping``  ``trainer.shaper(fitness)`` (z-score)
* ``update``   ``trainer.compute_update(perturbations, fitness)`` + applying it to the center

``overhead = sample + prepare + shaping + update`` is what a generation costs beyond its forwards;
the last column gives it in plain batched forwards (target: <= 5 at N = 1024, rank 1).

    python benchmarks/bench_generation.py --threads 2
"""

from __future__ import annotations

import functools
import statistics

import torch
from bench_population import _unused_fitness, grid_args, interleaved, mlp

from eggroll_rl import EGGROLLTrainer


def main() -> None:
    args = grid_args(__doc__, rounds=60)
    model = mlp()
    print(
        "| N | rank | sample ms | prepare ms | forward ms | plain fwd ms | shaping ms | update ms "
        "| overhead ms | overhead / plain fwd |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        x = torch.randn(n, 64)
        for rank in args.ranks:
            trainer = EGGROLLTrainer(model, _unused_fitness, population_size=n, sigma=0.1, rank=rank)
            trainer.learning_rate = 1e-12  # keep the center (and so the inputs' scale) fixed
            idx = torch.arange(n)
            pert = trainer.sample_perturbations(n)
            pop = trainer.make_population(pert, idx)
            fitness = torch.randn(n, dtype=torch.float64)

            def update(pert=pert, fitness=fitness, trainer=trainer) -> None:
                trainer._apply(trainer.compute_update(pert, fitness))

            fns = {
                "sample": functools.partial(trainer.sample_perturbations, n),
                "prepare": functools.partial(trainer.make_population, pert, idx),
                "forward": functools.partial(pop, x),
                "plain": functools.partial(model, x),
                "shaping": functools.partial(trainer.shaper, fitness),
                "update": update,
            }
            with torch.no_grad():
                runs = [interleaved(fns, args.rounds) for _ in range(args.repeats)]
            t = {k: statistics.median(r[k] for r in runs) for k in fns}
            over = t["sample"] + t["prepare"] + t["shaping"] + t["update"]
            print(
                f"| {n} | {rank} | {t['sample']:.3f} | {t['prepare']:.3f} | {t['forward']:.3f} | "
                f"{t['plain']:.3f} | {t['shaping']:.3f} | {t['update']:.3f} | {over:.3f} | "
                f"{over / t['plain']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
