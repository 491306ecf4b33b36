"""Env steps per second of the training rollout on the MuJoCo tasks: gymnasium (v5) vs envpool (v4).

    python benchmarks/bench_mujoco.py                       # all five tasks, population 64
    python benchmarks/bench_mujoco.py --env Hopper-v5 --population 32 --repeats 5

One EGGROLL generation of a linear policy (the presets' policy) is one batched rollout of
``population`` members, one episode each, capped at ``--steps`` env steps; the rate is the
rollout's env steps over its seconds (``RolloutFitness.stats``), median over ``--repeats``
generations, measured side by side per task. envpool 1.2.5 has no -v5 tasks: its rate is for the
-v4 task of the same robot (envpool's own MuJoCo build and v4 dynamics, so returns differ from
v5; see the README's MuJoCo section).
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from eggroll_rl import EGGROLLTrainer, make_policy
from eggroll_rl.rollout import RolloutFitness, make_vec_env

TASKS = ("Swimmer-v5", "Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Ant-v5")


def rate(env_id: str, backend: str, population: int, steps: int, repeats: int) -> float:
    """Median env steps/s of one generation's rollout of ``env_id`` on ``backend``."""
    spec_id = env_id if backend != "envpool" else env_id.replace("-v5", "-v4")
    # The policy fits the env actually stepped: envpool's -v4 tasks can observe less than the
    # -v5 ones (Ant: 27 dims vs 105).
    env = make_vec_env(spec_id, population, backend=backend, max_episode_steps=steps, seed=0)
    policy = make_policy(env.single_observation_space, env.single_action_space, hidden_sizes=(), seed=0)
    fitness = RolloutFitness(env, max_episode_steps=steps, seed=0, num_envs=population)
    trainer = EGGROLLTrainer(policy, fitness, population, 0.02, 0.05, noise_reuse=2, optimizer="adam")
    rates = []
    try:
        for _ in range(repeats):
            trainer.step()
            rates.append(fitness.stats["steps_per_second"])
    finally:
        env.close()
    return statistics.median(rates)


def main() -> None:
    """Print a markdown table: task, backend, env steps/s, and envpool's ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", action="append", help="a task (repeatable); default: all five")
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000, help="episode cap (env steps)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print(f"population {args.population}, episode cap {args.steps}, median of {args.repeats} generations")
    print("| task | gymnasium v5 (sync) steps/s | envpool v4 steps/s | envpool / gymnasium |")
    print("|---|---|---|---|")
    for env_id in args.env or TASKS:
        sync = rate(env_id, "sync", args.population, args.steps, args.repeats)
        try:
            pool = rate(env_id, "envpool", args.population, args.steps, args.repeats)
        except ImportError:
            print(f"| {env_id} | {sync:,.0f} | (envpool not installed) | - |")
            continue
        print(f"| {env_id} | {sync:,.0f} | {pool:,.0f} | {pool / sync:.2f} |")


if __name__ == "__main__":
    main()
