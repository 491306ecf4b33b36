"""Raw vector-env step time per backend: gymnasium SyncVectorEnv vs envpool (when installed).

python benchmarks/bench_backends.py --env LunarLander-v3 --num-envs 512
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np

from eggroll_rl.rollout import make_vec_env


def step_ms(env_id: str, num_envs: int, backend: str, steps: int) -> float:
    """Median milliseconds of one step of all sub-envs with a constant action."""
    env = make_vec_env(env_id, num_envs, backend=backend)
    env.reset(seed=list(range(num_envs)) if backend != "envpool" else None)
    action = np.stack([env.single_action_space.sample() for _ in range(num_envs)])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        env.step(action)
        times.append(time.perf_counter() - t0)
    env.close()
    return 1e3 * statistics.median(times)


def main() -> None:
    """Print the median step time of each available backend."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="LunarLander-v3")
    parser.add_argument("--num-envs", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    results = {}
    for backend in ("sync", "envpool"):
        try:
            results[backend] = step_ms(args.env, args.num_envs, backend, args.steps)
        except ImportError as exc:
            print(f"{backend}: skipped ({exc})")
    for backend, ms in results.items():
        print(f"{args.env}, {args.num_envs} sub-envs, {backend}: {ms:.2f} ms per step")
    if len(results) == 2:
        print(f"envpool speed-up: {results['sync'] / results['envpool']:.1f}x")


if __name__ == "__main__":
    main()
