"""Population forward of the EGGROLL path vs plain (unperturbed) batched inference of the same MLP.

Both variants run the 64-256-256-8 tanh MLP on the same ``(N, 64)`` inputs (one observation per
member): ``plain`` is ``model(x)``; ``eggroll`` is ``pop(x)`` with ``pop`` built by
``EGGROLLTrainer.make_population`` (the real code path: the model's own forward with the batched
low-rank layers installed). Calls are interleaved in a random order per round and each variant's
median over all rounds is reported. Where the compiled CPU kernels exist, a third variant,
``fused``, runs the same architecture as a `Policy` (``make_policy``, no observation normaliser),
whose population forward is one fused C call (``kernels.MLPKernel``) instead of layer by layer.

    python benchmarks/bench_population.py --threads 2
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time

import torch
from gymnasium import spaces
from torch import nn

from eggroll_rl import EGGROLLTrainer, batched_fitness, kernels, make_policy


def mlp(seed: int = 0) -> nn.Module:
    """The benchmark MLP: 64-256-256-8 with tanh."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8))


def policy(seed: int = 0) -> nn.Module:
    """The same architecture as a Policy, which the population runs in the fused kernel."""
    torch.manual_seed(seed)
    obs = spaces.Box(-float("inf"), float("inf"), (64,))
    return make_policy(obs, spaces.Discrete(8), (256, 256), "tanh", normalize_obs=False)


@batched_fitness
def _unused_fitness(population):  # the benchmark calls the population itself
    return torch.zeros(len(population))


def make_population(model: nn.Module, n: int, rank: int, seed: int = 0):
    """Build generation 0's population of an EGGROLL trainer through the public path."""
    trainer = EGGROLLTrainer(model, _unused_fitness, population_size=n, sigma=0.1, rank=rank, seed=seed)
    perturbations = trainer.sample_perturbations(n)
    return trainer.make_population(perturbations, torch.arange(n))


def interleaved(fns: dict[str, callable], rounds: int, warmup: int = 5) -> dict[str, float]:
    """Return each function's median wall time (ms), calls interleaved in a shuffled order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def grid_args(doc: str, rounds: int) -> argparse.Namespace:
    """Parse the (sizes x ranks) grid options, set the threads and the shuffle seed, print the header."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, MLP 64-256-256-8 tanh\n")
    return args


def rounds_for(n: int, budget_s: float) -> int:
    """Rounds so that each (N, rank) row takes about ``budget_s`` seconds."""
    return max(30, int(budget_s / (n * 2.5e-6 + 2e-4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per (N, rank) row")
    parser.add_argument("--repeats", type=int, default=3, help="independent interleaved runs (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    model = mlp()
    fused = kernels.available()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, MLP 64-256-256-8 tanh\n")
    extra = " fused ms | fused / plain throughput |" if fused else ""
    print("| N | rank | plain ms | eggroll ms | eggroll / plain throughput |" + extra)
    print("|---:|---:|---:|---:|---:|" + ("---:|---:|" if fused else ""))
    for n in args.sizes:
        x = torch.randn(n, 64)
        for rank in args.ranks:
            pop = make_population(model, n, rank)
            fns = {"plain": functools.partial(model, x), "eggroll": functools.partial(pop, x)}
            if fused:
                fns["fused"] = functools.partial(make_population(policy(), n, rank), x)
            rounds = rounds_for(n, args.budget / args.repeats)
            with torch.no_grad():
                runs = [interleaved(fns, rounds) for _ in range(args.repeats)]
            ms = {name: statistics.median(r[name] for r in runs) for name in fns}
            plain, egg = ms["plain"], ms["eggroll"]
            row = f"| {n} | {rank} | {plain:.3f} | {egg:.3f} | {plain / egg:.2f} |"
            if fused:
                row += f" {ms['fused']:.3f} | {plain / ms['fused']:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
