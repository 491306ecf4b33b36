"""What the kernels' boundary checks and exact tanh cost per call (issue 10 §2).

Side by side in one run, interleaved in a random order per round, medians over rounds:

- ``rows checked`` vs ``rows raw``: a `kernels.LowRankRows` built once (as the population builds
  one per layer and generation; a call checks ``x`` and ``out``) against the same C function
  called directly through ctypes, for one 64 -> 64 layer; ``rows one-shot`` is
  `kernels.lowrank_rows`, which checks (and copies) the member data at every call;
- ``mlp checked`` vs ``mlp raw``: `kernels.MLPKernel.__call__` with ``actions`` against the bare
  C call, for a CartPole-sized 4-64-64-2 tanh policy (one rollout step);
- ``mlp tanh`` vs ``mlp relu``: the same fused forward with both hidden activations tanh or relu
  (relu costs nothing next to the GEMM, so the difference bounds the tanh's share, IEEE division
  included).

    python benchmarks/bench_kernel_checks.py --members 1024 --threads 1
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from eggroll_rl import kernels


def _timed(fn, repeat: int) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("no compiled kernel here")
    lib = kernels._library()
    torch.manual_seed(0)
    n_mem, n, m, r = args.members, 64, 64, 1
    window = r * (m + n) + m
    table = torch.randn(1 << 18).half()
    offsets = torch.randint(0, table.numel() - window, (n_mem,))
    coef = torch.randn(n_mem)
    x = torch.randn(n_mem, n)
    bias = torch.randn(m)
    out = torch.empty(n_mem, m)
    call = (x, table, offsets, coef, coef, bias, out, r, 0, r * m, r * (m + n))
    ptrs = [t.data_ptr() for t in call[:7]]

    prepared = kernels.LowRankRows(table, offsets, coef, coef, bias, n, m, r, 0, r * m, r * (m + n))

    def rows_checked():
        prepared(x, out)

    def rows_one_shot():
        kernels.lowrank_rows(*call)

    def rows_raw():
        lib.eggroll_lowrank_rows(*ptrs, n_mem, 1, n, m, r, 0, r * m, r * (m + n), args.threads)

    def mlp(act: str) -> kernels.MLPKernel:
        torch.manual_seed(1)
        sizes = [(64, 4), (64, 64), (2, 64)]
        pos, layers = 0, []
        for j, (mo, ni) in enumerate(sizes):
            where = (pos, pos + r * mo, pos + r * (mo + ni))
            pos += r * (mo + ni) + mo
            layers.append(
                kernels.MLPLayer(torch.randn(mo, ni), torch.randn(mo), act if j < 2 else "identity", where)
            )
        noise = kernels.MemberNoise(
            table, torch.randint(0, table.numel() - pos, (n_mem,)), coef, coef, r, pos
        )
        return kernels.MLPKernel(layers, (torch.zeros(4), torch.ones(4), 5.0), noise)

    tanh_mlp, relu_mlp = mlp("tanh"), mlp("relu")
    obs = torch.randn(n_mem, 4)
    actions = torch.empty(n_mem, dtype=torch.int64)

    def mlp_checked(k=tanh_mlp):
        k(obs, actions=actions)

    def mlp_raw(k=tanh_mlp):
        k._fn(k._plan_ref, obs.data_ptr(), n_mem, n_mem, 4, 1, None, actions.data_ptr(), 0, args.threads)

    variants = {
        "rows checked": rows_checked,
        "rows raw": rows_raw,
        "rows one-shot": rows_one_shot,
        "mlp checked": mlp_checked,
        "mlp raw": mlp_raw,
        "mlp tanh": lambda: mlp_raw(tanh_mlp),
        "mlp relu": lambda: mlp_raw(relu_mlp),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(args.rounds):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            times[name].append(_timed(variants[name], args.repeat))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"N = {n_mem}, {args.threads} thread(s); median us per call over {args.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:13s} {v:9.2f}")
    print(f"  checks, lowrank_rows: +{med['rows checked'] - med['rows raw']:.2f} us "
          f"(ratio {med['rows checked'] / med['rows raw']:.3f})")  # fmt: skip
    print(f"  checks, MLPKernel:    +{med['mlp checked'] - med['mlp raw']:.2f} us "
          f"(ratio {med['mlp checked'] / med['mlp raw']:.3f})")  # fmt: skip
    print(f"  tanh / relu fused forward: {med['mlp tanh'] / med['mlp relu']:.3f}")


if __name__ == "__main__":
    main()
