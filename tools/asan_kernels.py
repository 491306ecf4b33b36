"""Run the C kernels' boundary cases under AddressSanitizer (not part of the test suite).

Builds ``eggroll_rl/kernels.c`` with ``-fsanitize=address`` and re-runs this script with the ASan
runtime preloaded (Python itself is not instrumented; torch's CPU tensors come from malloc, so
their ends have ASan red zones). Then, through the checked Python wrappers:

- every argument the wrappers refuse (the cases of tests/test_kernels.py) raises ValueError
  before C is reached;
- the tightest valid calls (a member window ending at the table's last number, outputs and
  actions exactly as long as the rows, tails of every vector width) run without an ASan report.

``--demo`` instead calls the C function directly with a coefficient array one member short (what
the wrapper used to let through): ASan must abort with a heap-buffer-overflow report, which shows
the set-up detects the fault class at all. Usage::

    python tools/asan_kernels.py          # exit 0: no report
    python tools/asan_kernels.py --demo   # exit != 0 with "heap-buffer-overflow" on stderr
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _build(folder: Path) -> Path:
    out = folder / "kernels-asan.so"
    cmd = [os.environ.get("CC", "cc"), "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address",
           "-fPIC", "-shared", "-fopenmp", "-march=native", str(ROOT / "eggroll_rl" / "kernels.c"),
           "-o", str(out), "-lm"]  # fmt: skip
    subprocess.run(cmd, check=True)
    return out


def _cases(lib_path: str, demo: bool) -> None:
    import torch

    from eggroll_rl import kernels

    real = kernels._library.__wrapped__  # type: ignore[attr-defined]
    lib = ctypes.CDLL(lib_path)
    # Register the argument types the way the package does, on this library.
    kernels._load_cached = lambda *a, **k: lib  # type: ignore[assignment]
    lib = real()
    assert lib is not None
    kernels._library = lambda variants=kernels._NATIVE: lib  # type: ignore[assignment]
    torch.set_num_threads(1)

    if demo:
        x, out = torch.zeros(4, 3), torch.zeros(4, 4)
        table, offsets = torch.zeros(100, dtype=torch.float16), torch.tensor([0, 82])
        coef_short = torch.ones(1)  # two members need two coefficients
        args = (x, table, offsets, coef_short, coef_short)
        lib.eggroll_lowrank_rows(*(a.data_ptr() for a in args), None, out.data_ptr(),
                                 2, 2, 3, 4, 2, 0, 8, 14, 1)  # fmt: skip
        print("no report: the sanitizer did not catch the short array", file=sys.stderr)
        sys.exit(3)

    sys.path.insert(0, str(ROOT / "tests"))
    import test_kernels as t

    for case, (change, _message) in t._BAD_ROWS.items():
        try:
            kernels.lowrank_rows(**t._rows_args(**change))
        except ValueError:
            continue
        raise SystemExit(f"lowrank_rows accepted {case!r}")
    for case, (build, call, _message) in t._BAD_MLP.items():
        layer = dict(weight=torch.zeros(4, 3), bias=torch.zeros(4), activation="tanh", where=t._WHERE)
        layer.update({k: v for k, v in build.items() if k in layer})
        try:
            kernel = kernels.MLPKernel([kernels.MLPLayer(**layer)], build.get("normalizer"),
                                       build.get("noise", t._noise()))  # fmt: skip
            kernel(torch.zeros(2, 3), **(call or {}))
        except ValueError:
            continue
        raise SystemExit(f"MLPKernel accepted {case!r}")

    # Tightest valid calls: windows that end at the table's end, every tail width.
    torch.manual_seed(0)
    for n, m, r in [(1, 1, 1), (3, 4, 2), (7, 9, 3), (17, 33, 1), (64, 31, 4)]:
        window = r * (m + n) + m
        members, k = 3, 2
        table = torch.randn(window * members).half()
        offsets = torch.arange(members) * window
        x = torch.randn(members * k, n)
        out = torch.empty(members * k, m)
        coef = torch.randn(members)
        kernels.lowrank_rows(x, table, offsets, coef, coef, torch.randn(m), out, r, 0, r * m, r * (m + n))
        layers = [kernels.MLPLayer(torch.randn(m, n), torch.randn(m), "tanh", (0, r * m, r * (m + n)))]
        noise = kernels.MemberNoise(table, offsets, coef, coef, r, window)
        for rows in (members, members * k, members * 7):
            mlp = kernels.MLPKernel(layers, (torch.zeros(n), torch.ones(n), 5.0), noise)
            xr = torch.randn(rows, n)
            mlp(xr, out=torch.empty(rows, m), actions=torch.empty(rows, dtype=torch.int64))
    for size in range(1, 40):
        kernels.tanh(torch.randn(size))
    print("asan: every refusal raised, every tight call ran clean")


def main() -> None:
    demo = "--demo" in sys.argv
    if os.environ.get("_EGGROLL_ASAN_CHILD"):
        _cases(os.environ["_EGGROLL_ASAN_CHILD"], demo)
        return
    with tempfile.TemporaryDirectory() as tmp:
        lib = _build(Path(tmp))
        runtime = subprocess.run([os.environ.get("CC", "cc"), "-print-file-name=libasan.so"],
                                 capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0",
                   _EGGROLL_ASAN_CHILD=str(lib), EGGROLL_RL_CACHE=tmp)  # fmt: skip
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
