"""Time CartPole-v1 solved from scratch: training + periodic 100-episode evaluations, 10 seeds.

Solved = the center policy's mean return over 100 fresh evaluation episodes >= 475. The clock
starts before the trainer is built (policy, vector env and noise table included) and stops when an
evaluation passes; only process start-up and imports are outside it. The settings are the
shipped preset ``envs/CartPole-v1.toml`` (what ``eggroll-rl train CartPole-v1`` uses), with its
evaluation rule: the center policy plays 100 fresh episodes every ``eval.every`` generations and
every generation whose mean training return reaches ``eval.from_fitness``.

    python benchmarks/bench_cartpole.py --seeds 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from eggroll_rl.presets import apply_overrides, load_preset
from eggroll_rl.rollout import derive_seed, evaluate, make_vec_env
from eggroll_rl.run import build_trainer, evaluation_due


def solve(seed: int, max_generations: int, overrides: list[str]) -> dict[str, float]:
    """Train one seed until solved; return time, generations and env steps."""
    preset = apply_overrides(load_preset("CartPole-v1"), [f"trainer.seed={seed}", *overrides])
    target = preset.target if preset.target is not None else 475.0
    t0 = time.perf_counter()
    trainer = build_trainer(preset)
    eval_env = make_vec_env("CartPole-v1", preset.eval.episodes)
    evals, eval_steps, result = 0, 0, None
    while trainer.generation < max_generations:
        stats = trainer.step()
        gen = trainer.generation
        if evaluation_due(preset, gen, stats["mean_fitness"]):
            result = evaluate(
                trainer.model, eval_env, episodes=preset.eval.episodes, seed=derive_seed(7, seed, gen)
            )
            evals += 1
            eval_steps += int(result.lengths.sum())
            if result.mean >= target:
                break
    seconds = time.perf_counter() - t0
    eval_env.close()
    solved = result is not None and result.mean >= target
    return {
        "seed": seed,
        "solved": solved,
        "seconds": seconds,
        "generations": trainer.generation,
        "train_steps": trainer.fitness_fn.total_env_steps,
        "eval_steps": eval_steps,
        "evaluations": evals,
        "eval_mean": result.mean if result is not None else float("nan"),
    }


def main() -> None:
    """Run the seeds and print a markdown table and the median."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-generations", type=int, default=200)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    solve(100, 2, args.overrides)  # warm-up: first-call costs of torch and numpy
    rows = [solve(s, args.max_generations, args.overrides) for s in range(args.seeds)]
    print("| seed | solved | seconds | generations | train env steps | eval env steps | evals | eval mean |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seed']} | {'yes' if r['solved'] else 'NO'} | {r['seconds']:.3f} | {r['generations']} | "
            f"{r['train_steps']:,} | {r['eval_steps']:,} | {r['evaluations']} | {r['eval_mean']:.1f} |"
        )
    solved = sum(r["solved"] for r in rows)
    median = statistics.median(r["seconds"] for r in rows)
    print(
        f"\nsolved {solved}/{len(rows)} seeds; median {median:.3f} s; "
        f"max {max(r['seconds'] for r in rows):.3f} s (torch threads: {args.threads})"
    )


if __name__ == "__main__":
    main()
