"""Time to solve with an env's shipped preset: seeds one after another, one table.

Each seed runs ``eggroll-rl train ENV --seed K --out OUT`` in its own process (alone on
the machine for honest seconds) and reads the run's own ``results.json``: training seconds
(periodic evaluations included, process start-up not), generations, env steps, the agent's
100-episode score (after a target stop: fresh episodes; the stopping evaluation's mean, and
its confirmation's with ``eval.confirm``, in brackets) and whether it reaches the preset's
target, with the 1-minute load average before and after (the seconds mean little on a busy
machine). Extra arguments go to every ``train`` call (e.g. ``--nproc 2`` or ``--set rollout.backend=sync``).

    python benchmarks/bench_solve.py --out /tmp/lunar-bench                      # LunarLander-v3, seeds 0-4
    python benchmarks/bench_solve.py --env Swimmer-v5 --seeds 0 1 2 --out /tmp/sw-bench --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def main() -> None:
    """Train each seed and print one row per seed plus the median seconds and solved count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="LunarLander-v3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lunar-bench"))
    args, extra = parser.parse_known_args()
    rows = []
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        load = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "eggroll_rl", "train", args.env, "--seed", str(seed)]
        subprocess.run([*cmd, "--out", str(out), "--no-progress", *extra], check=True)
        results = json.loads((out / args.env / "results.json").read_text())
        rows.append(results)
        stop, confirm = results.get("stop_eval_mean"), results.get("confirm_eval_mean")
        confirm_text = "" if confirm is None else f", confirm {confirm:.1f}"
        stop_text = "" if stop is None else f" (stop {stop:.1f}{confirm_text})"
        print(
            f"seed {seed}: {results['seconds']:7.1f} s  {results['generations']:4d} generations  "
            f"{results['env_steps']:>9d} env steps ({results.get('eval_env_steps', 0)} in evaluations)  "
            f"eval {results['mean']:7.1f}{stop_text}  "
            f"solved {results['solved']}  "
            f"load {load:.1f} -> {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    seconds = [r["seconds"] for r in rows]
    solved = sum(bool(r["solved"]) for r in rows)
    print(f"median {statistics.median(seconds):.1f} s, {solved}/{len(rows)} solved")


if __name__ == "__main__":
    main()
