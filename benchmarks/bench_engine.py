"""Rollout efficiency: counted env steps/s of a whole rollout vs the backend's raw step rate.

LunarLander-v3, N = 256 members, one episode each, the shipped agent's policy perturbed with
sigma (episode lengths vary from tens of steps to the 1000-step cap). In one process, interleaved
repeats of:

- raw: the backend stepping random actions with all sub-envs busy (vector autoreset), in
  sub-env steps per second;
- the engine (`RolloutFitness` -> `run_episodes`) on each backend and pool size, in counted env
  steps per second of the whole rollout (forwards, resets, accounting included), with its ratio
  to the same backend's raw rate. ``lockstep`` drives the SyncVectorEnv through its batched API
  (every sub-env steps until the longest episode ends; live rows only are forwarded), the shape
  of the loop before the work-conserving engine; envpool steps only the live sub-envs by
  ``env_id`` (``pool n/4``: a pool of N/4 slots refilled as episodes end).

    python benchmarks/bench_engine.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import gymnasium as gym
import numpy as np
import torch

from eggroll_rl import EGGROLLTrainer, RolloutFitness
from eggroll_rl.agents import load_policy
from eggroll_rl.rollout import make_vec_env


def raw_rate(env_id: str, n: int, backend: str, steps: int) -> float:
    """Sub-env steps per second of random actions with every sub-env busy."""
    env = make_vec_env(env_id, n, backend=backend)
    env.reset(seed=list(range(n)) if backend != "envpool" else None)
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 4, n) for _ in range(steps)]
    t0 = time.perf_counter()
    for a in actions:
        env.step(a)
    seconds = time.perf_counter() - t0
    env.close()
    return n * steps / seconds


def main() -> None:
    """Print raw and engine rates per configuration (medians over repeats)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="LunarLander-v3")
    parser.add_argument("--members", type=int, default=256)
    parser.add_argument("--sigma", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--raw-steps", type=int, default=100)
    parser.add_argument("--agent", default="agents/LunarLander-v3")
    parser.add_argument("--only", nargs="*", help="run only these configurations")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    n = args.members
    try:
        import envpool  # noqa: F401

        has_envpool = True
    except ImportError:
        has_envpool = False
    configs = {
        "sync": {"backend": "sync"},
        "sync pool n/4": {"backend": "sync", "num_envs": n // 4},
        "lockstep": {"backend": "sync", "wrap": True},
    }
    if has_envpool:
        configs["envpool"] = {"backend": "envpool"}
        configs["envpool pool n/4"] = {"backend": "envpool", "num_envs": n // 4}
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    policy = load_policy(args.agent, args.env)
    rates: dict[str, list[float]] = {k: [] for k in configs}
    lengths: dict[str, list[float]] = {k: [] for k in configs}
    raws: dict[str, list[float]] = {
        b: [] for b in ("sync", "envpool") if any(c["backend"] == b for c in configs.values())
    }
    for rep in range(args.repeats):
        for backend in raws:
            raws[backend].append(raw_rate(args.env, n, backend, args.raw_steps))
        for name, cfg in configs.items():
            cfg = dict(cfg)
            wrap = cfg.pop("wrap", False)
            slots = cfg.pop("num_envs", n)
            env = make_vec_env(args.env, slots, backend=cfg["backend"], max_episode_steps=1000, seed=rep)
            fitness = RolloutFitness(
                gym.vector.VectorWrapper(env) if wrap else env,
                seed=rep,
                obs_norm=False,
                max_episode_steps=1000,
                num_envs=slots,
            )
            trainer = EGGROLLTrainer(policy, fitness, population_size=n, sigma=args.sigma, seed=rep)
            pop = trainer.make_population(trainer.sample_perturbations(n), torch.arange(n))
            fitness(pop)
            rates[name].append(fitness.stats["env_steps"] / fitness.stats["rollout_seconds"])
            lengths[name].append(fitness.stats["episode_length_mean"])
            env.close()
    print(f"{args.env}, N = {n}, sigma {args.sigma}, medians of {args.repeats} repeats")
    for backend, values in raws.items():
        print(f"raw {backend:<14} {statistics.median(values):>9.0f} sub-env steps/s")
    for name, values in rates.items():
        raw = statistics.median(raws["envpool" if name.startswith("envpool") else "sync"])
        rate = statistics.median(values)
        print(
            f"engine {name:<14}{rate:>9.0f} counted steps/s  ratio {rate / raw:.2f}  "
            f"mean length {statistics.median(lengths[name]):.0f}"
        )


if __name__ == "__main__":
    main()
