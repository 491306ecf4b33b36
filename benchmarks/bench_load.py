"""Training speed on a busy CPU: the library's threading against 1 thread and an idle machine.

Each measurement is a fresh process (OpenMP reads its settings when the runtime loads) that
builds the CartPole-v1 preset trainer with a 64-64 policy and times ``--generations`` generations
(median of ``--repeats``). Configurations, interleaved so that any drift in the background load
hits all of them alike:

- ``library``: eggroll-rl's default (OMP_WAIT_POLICY=PASSIVE unless the user set it);
- ``spin``: OpenMP's own default wait policy (threads spin before sleeping), as before;
- ``1-thread``: OMP_NUM_THREADS=1 (no OpenMP waiting at all);

each on an idle machine and with ``--busy`` (default 2) busy-loop processes beside it. The
ratio busy/idle is what a busy machine costs; the fair share with B busy loops on C cores is
about max(1, (B + 1) / C).

    python benchmarks/bench_load.py --generations 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = """
import json, sys, time
from eggroll_rl.presets import apply_overrides, load_preset
from eggroll_rl.run import build_trainer
preset = apply_overrides(load_preset("CartPole-v1"), ["policy.hidden_sizes=64,64", "trainer.seed=0"])
trainer = build_trainer(preset)
trainer.step()  # warm-up: kernel load, vector env, first allocation
t0 = time.perf_counter()
for _ in range(int(sys.argv[1])):
    trainer.step()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

CONFIGS = {
    "library": {},
    "spin": {"EGGROLL_RL_OMP_PASSIVE": "0"},
    "1-thread": {"OMP_NUM_THREADS": "1"},
}


def measure(config: str, generations: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(CONFIGS[config])
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(generations)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def busy_loops(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes beside the run")
    args = parser.parse_args()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for load in ("idle", "busy"):
            loops = busy_loops(args.busy) if load == "busy" else []
            try:
                time.sleep(0.5 if loops else 0)
                for config in CONFIGS:
                    times.setdefault((config, load), []).append(measure(config, args.generations))
            finally:
                for p in loops:
                    p.kill()
                    p.wait()
    print(
        f"{os.cpu_count()} CPUs, {args.busy} busy loops, {args.generations} generations, "
        f"median of {args.repeats}"
    )
    print(f"{'config':>10} {'idle s':>8} {'busy s':>8} {'busy/idle':>9}")
    for config in CONFIGS:
        idle = statistics.median(times[(config, "idle")])
        busy = statistics.median(times[(config, "busy")])
        print(f"{config:>10} {idle:8.3f} {busy:8.3f} {busy / idle:9.2f}")


if __name__ == "__main__":
    main()
