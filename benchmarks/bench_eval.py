"""Seconds of one evaluation (`evaluate` with a World) with 1 vs K local processes, in one run.

    python benchmarks/bench_eval.py                             # Swimmer-v5, 100 episodes of 1000 steps
    python benchmarks/bench_eval.py --env Hopper-v5 --episodes 50 --repeats 3

Each process plays a contiguous block of the episodes and the returns are gathered in episode
order; the script checks that every configuration returns the same bits as one process, and
prints the median seconds of ``--repeats`` evaluations (process start-up not counted) and the
speed-up. The policy is a fixed random linear one (episodes run to the env's limit on Swimmer).
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import statistics
import time

import torch

from eggroll_rl.distributed import World
from eggroll_rl.launch import run_distributed


def bench(env_id: str, episodes: int, repeats: int, hidden: tuple[int, ...]) -> dict:
    """Evaluate ``repeats`` times on this process group's world; return the timings and a digest."""
    import gymnasium as gym

    from eggroll_rl.policies import make_policy
    from eggroll_rl.rollout import evaluate

    torch.set_num_threads(1)
    world = World.current()
    probe = gym.make(env_id)
    policy = make_policy(probe.observation_space, probe.action_space, hidden, normalize_obs=False, seed=0)
    probe.close()
    seconds, digest = [], None
    for _ in range(repeats):
        world.barrier()
        start = time.perf_counter()
        result = evaluate(policy, env_id, episodes, seed=1, world=world)
        seconds.append(time.perf_counter() - start)
        digest = hashlib.sha256(result.returns.tobytes() + result.lengths.tobytes()).hexdigest()[:16]
    return {"seconds": seconds, "digest": digest, "mean": result.mean, "steps": int(result.lengths.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--env", default="Swimmer-v5")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, nargs="*", default=[])
    args = parser.parse_args()
    print(
        f"{args.env}: {args.episodes} episodes, policy hidden={args.hidden}, {platform.processor() or 'cpu'}"
    )
    rows = {}
    for k in args.nproc:
        kwargs = {
            "env_id": args.env,
            "episodes": args.episodes,
            "repeats": args.repeats,
            "hidden": tuple(args.hidden),
        }
        rows[k] = run_distributed(k, bench, kwargs, threads=1)
        out = rows[k]
        median = statistics.median(out["seconds"])
        print(
            f"nproc {k}: median {median:.2f} s over {args.repeats} "
            f"({', '.join(f'{s:.2f}' for s in out['seconds'])}), {out['steps']} env steps, "
            f"mean return {out['mean']:.3f}, digest {out['digest']}"
        )
    base = min(args.nproc)
    same = len({rows[k]["digest"] for k in rows}) == 1
    for k in args.nproc:
        if k != base:
            ratio = statistics.median(rows[base]["seconds"]) / statistics.median(rows[k]["seconds"])
            print(f"speed-up {k} vs {base} processes: {ratio:.2f}x")
    print(f"bit-identical across process counts: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
