"""Issue 14's GPU benchmarks, side by side in one run; prints one markdown table per part.

1. Population forward of the 64-256-256-8 tanh MLP: perturbed forward (``pop(x)``, the EGGROLL
   PyTorch path) / plain batched inference (``model(x)``) on the same ``(N, 64)`` batch, per rank,
   dtype and N. Timed with CUDA events (wall clock on CPU) after warm-up, interleaved, medians.
   Peak memory of the perturbed forward (population set-up included) above the resident model
   and inputs, against ``N r (m + n)`` summed over the layers (the low-rank factors' numbers).
2. Rollout: generations/s of an EGGROLL training on CartPole-v1 and LunarLander-v3 at
   population N on ``cuda`` and on ``cpu`` (the same seed and settings).

    python benchmarks/bench_gpu.py                      # the device run (see gpu_check.sh)
    python benchmarks/bench_gpu.py --device cpu --tiny  # the CPU dry run of the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time

import torch
from torch import nn

from eggroll_rl import EGGROLLTrainer, batched_fitness

LAYERS = ((64, 256), (256, 256), (256, 8))


def mlp(dtype: torch.dtype, device: str) -> nn.Module:
    """The benchmark MLP, 64-256-256-8 with tanh."""
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for n, m in LAYERS:
        mods += [nn.Linear(n, m), nn.Tanh()]
    return nn.Sequential(*mods[:-1]).to(device, dtype)


@batched_fitness
def _unused(population):
    return torch.zeros(len(population))


class Timer:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock elsewhere."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def forward_row(device: str, dtype: torch.dtype, rank: int, n: int, repeats: int) -> dict:
    """Time plain vs perturbed forward at one (dtype, rank, N); measure the perturbed peak memory."""
    cuda = device.startswith("cuda")
    model = mlp(dtype, device)
    trainer = EGGROLLTrainer(model, _unused, population_size=n, rank=rank, sigma=0.1, seed=0, device=device)
    x = torch.randn(n, LAYERS[0][0], device=device, dtype=dtype)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.no_grad():
        pop = trainer.make_population(trainer.sample_perturbations(n), torch.arange(n, device=device))
        pop(x)
        peak = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
        timer = Timer(device)
        variants = {"plain": lambda: model(x), "eggroll": lambda: pop(x)}
        for fn in variants.values():  # warm-up
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        for _ in range(repeats):
            random.shuffle(order)
            for k in order:
                times[k].append(timer(variants[k]))
    plain, pert = statistics.median(times["plain"]), statistics.median(times["eggroll"])
    factors = n * rank * sum(m + k for k, m in LAYERS)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "rank": rank,
        "N": n,
        "plain_ms": plain,
        "eggroll_ms": pert,
        "ratio": plain / pert,  # perturbed throughput / inference throughput (target >= 0.9)
        "peak_MiB": peak / 2**20,
        "factor_MiB": factors * torch.finfo(dtype).bits / 8 / 2**20,
        "dense_MiB": n * sum(m * k for k, m in LAYERS) * torch.finfo(dtype).bits / 8 / 2**20,
    }


def rollout_row(env_id: str, device: str, n: int, generations: int) -> dict:
    """Generations/s of a short EGGROLL training on ``env_id`` (first generation = warm-up)."""
    import gymnasium as gym

    from eggroll_rl import RolloutFitness, make_policy

    env = gym.make(env_id)
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=(64, 64), seed=0)
    env.close()
    fitness = RolloutFitness(env_id, seed=0)
    trainer = EGGROLLTrainer(
        policy.to(device), fitness, population_size=n, learning_rate=0.1, sigma=0.1, rank=1,
        noise_reuse=2, seed=0, device=device,
    )  # fmt: skip
    quiet = contextlib.redirect_stdout(sys.stderr)  # the training's log lines stay out of the tables
    with quiet:
        trainer.train(num_generations=1, log_every=10**9)  # warm-up: kernels, pinned buffer, envs
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train(num_generations=generations, log_every=10**9)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    steps = sum(trainer.history["env_steps"][-generations:])
    fitness.close()
    return {"env": env_id, "device": device, "N": n, "gen_per_s": generations / seconds,
            "steps_per_s": steps / seconds}  # fmt: skip


def table(rows: list[dict], fmt: dict[str, str]) -> str:
    """Render rows as a markdown table (columns in ``fmt``'s order)."""
    head = "| " + " | ".join(fmt) + " |\n| " + " | ".join("---" for _ in fmt) + " |\n"
    body = "".join("| " + " | ".join(format(r[k], f) for k, f in fmt.items()) + " |\n" for r in rows)
    return head + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the device run) or cpu (dry run)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: check the script, not the GPU")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rollout-n", type=int, default=4096)
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--part", choices=("all", "forward", "rollout"), default="all")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    sizes = (64, 256) if args.tiny else (1024, 16384, 65536)
    repeats = 3 if args.tiny else args.repeats
    rollout_n = 16 if args.tiny else args.rollout_n
    generations = 1 if args.tiny else args.generations
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\n### Issue 14 GPU check on {name} (torch {torch.__version__})\n", flush=True)

    if args.part != "rollout":
        forward_table(args.device, sizes, repeats)
    if args.part != "forward":
        rollout_table(args.device, rollout_n, generations)
    return 0


def forward_table(device: str, sizes: tuple[int, ...], repeats: int) -> None:
    """Print the population-forward table."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for rank in (1, 4):
            for n in sizes:
                rows.append(forward_row(device, dtype, rank, n, repeats))
                print(f"  forward {rows[-1]}", file=sys.stderr, flush=True)
    print("Population forward, MLP 64-256-256-8 (ratio = plain time / perturbed time; target >= 0.9 "
          "at N = 65,536; memory: peak of the perturbed forward vs the factors' N r (m + n))\n")  # fmt: skip
    cols = {"dtype": "s", "rank": "d", "N": "d", "plain_ms": ".3f", "eggroll_ms": ".3f", "ratio": ".2f"}
    print(table(rows, {**cols, "peak_MiB": ".1f", "factor_MiB": ".1f", "dense_MiB": ".0f"}), flush=True)


def rollout_table(device: str, n: int, generations: int) -> None:
    """Print the rollout table, a row as soon as it is measured: each env on ``device`` and on cpu."""
    print(f"Rollout, EGGROLL rank 1, MLP 64-64, N = {n}, {generations} generations "
          "after one warm-up (target: cuda not slower than cpu)\n")  # fmt: skip
    cols = {"env": "s", "device": "s", "N": "d", "gen_per_s": ".3f", "steps_per_s": ".0f"}
    print(table([], cols), end="", flush=True)
    for env_id in ("CartPole-v1", "LunarLander-v3"):
        for dev in dict.fromkeys([device, "cpu"]):
            try:
                row = rollout_row(env_id, dev, n, generations)
            except Exception as exc:  # a missing env package must not hide the other numbers
                print(f"  rollout {env_id} on {dev} failed: {exc!r}", file=sys.stderr)
                continue
            print(table([row], cols).split("\n", 2)[2], end="", flush=True)
    print()


if __name__ == "__main__":
    sys.exit(main())
