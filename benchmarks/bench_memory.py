"""Peak resident memory of one EGGROLL generation (64-256-256-8 tanh MLP) vs its analytic size.

Each (N, rank) runs in a fresh subprocess: import torch, build the model and trainer, measure the
resident set (baseline), then run one full generation (noise, population, a batched fitness that
calls the population forward 4 times on (N, 64) observations, shaping, update) and read the peak
RSS (``ru_maxrss``). The growth is compared with

* params    the model's own parameters (bytes)
* N r (m+n) the low-rank noise of all members, summed over the matrices (plus N * bias noise)
* N m n     what materialised per-member weight matrices would take

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import torch
from torch import nn
sys.path.insert(0, {bench_dir!r})
from bench_population import mlp
from eggroll_rl import EGGROLLTrainer, batched_fitness

n, rank = {n}, {rank}
torch.set_num_threads(1)
model = mlp()
x = torch.randn(n, 64)

@batched_fitness
def fitness(pop):
    out = 0
    for _ in range(4):
        out = out + pop(x).sum(dim=1)
    return out

trainer = EGGROLLTrainer(model, fitness, population_size=n, sigma=0.1, rank=rank)
with torch.no_grad():
    model(x)  # warm the allocator / kernels with plain inference first
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
trainer.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"base": base, "peak": peak}}))
"""

DIMS = [(256, 64), (256, 256), (8, 256)]  # (m, n) of the three Linear weights
F32 = 4


def analytic(n: int, rank: int) -> dict[str, int]:
    """Bytes of the parameters, the low-rank noise and dense per-member matrices."""
    params = sum(m * k + m for m, k in DIMS) * F32
    lowrank = sum(n * rank * (m + k) + n * m for m, k in DIMS) * F32
    dense = sum(n * m * k for m, k in DIMS) * F32
    return {"params": params, "lowrank": lowrank, "dense": dense}


def measure(n: int, rank: int) -> dict[str, int]:
    """Run one generation in a fresh interpreter and return its baseline and peak RSS (bytes)."""
    import os

    code = CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), n=n, rank=rank)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    mib = 2**20
    print(
        "| N | rank | params MiB | RSS growth MiB | N r (m+n) + N bias MiB | growth / N r (m+n) | N m n MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        for rank in args.ranks:
            rss = measure(n, rank)
            a = analytic(n, rank)
            growth = rss["peak"] - rss["base"]
            print(
                f"| {n} | {rank} | {a['params'] / mib:.2f} | {growth / mib:.1f} | "
                f"{a['lowrank'] / mib:.1f} | {growth / a['lowrank']:.1f} | {a['dense'] / mib:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
