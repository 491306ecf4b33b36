#!/usr/bin/env bash
# Issue 14's device run, whole, in under 8 minutes (time limits 150 + 120 + 180 s): the GPU, tests/test_cuda.py, then the benchmarks
# (benchmarks/bench_gpu.py), each part under its own time limit so one slow part cannot hide the rest.
#
#   bash benchmarks/gpu_check.sh            # on the device machine (CUDA torch)
#   bash benchmarks/gpu_check.sh --dry-run  # here, on CPU, at tiny sizes: checks the script itself
#
# The device image has a CUDA torch, numpy, pytest and cloudpickle but no gymnasium or Box2D and no
# network. Bring them as wheels (on a machine with pip access, in the repository root):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     gymnasium==1.4.0 farama-notifications==0.0.6 box2d==2.3.10
# (the versions installed on the development machine: `pip show gymnasium farama-notifications box2d`;
# if pip finds no Box2D wheel, add --platform manylinux_2_N_x86_64 for other N, see the device
# tool's README), carry `.whl` in the run, and this script installs them
# into /tmp/site. Whatever is under $OUT (set by the device tool) receives the log and the tables.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
DEVICE=${DEVICE:-cuda}
[[ $DRY == 1 ]] && DEVICE=cpu
LOG=${OUT:-/tmp}/gpu_check.log
TABLES=${OUT:-/tmp}/gpu_check_tables.md
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export EGGROLL_RL_CACHE=${EGGROLL_RL_CACHE:-/tmp/eggroll-gpu-cache} MUJOCO_GL=${MUJOCO_GL:-egl}
PY=${PYTHON:-python3}

exec > >(tee "$LOG") 2>&1
echo "== gpu_check: device=$DEVICE dry_run=$DRY $(date -u +%FT%TZ)"
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(), f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
for mod in ("gymnasium", "Box2D", "pytest"):
    try:
        print(mod, __import__(mod).__version__ if hasattr(__import__(mod), "__version__") else "ok")
    except ImportError as exc:
        print(f"MISSING {mod}: {exc} (carry it as a wheel, see the header of this script)")
PY

status=0
echo "== tests/test_cuda.py"
# Both halves (cpu and cuda); -rs lists skips: on the device no test may be skipped for want of CUDA.
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs || status=1

if [[ $DRY == 1 ]]; then
    BENCH=(--device cpu --tiny)
else
    BENCH=(--device "$DEVICE")
fi
echo "== population forward"
timeout 120 $PY benchmarks/bench_gpu.py "${BENCH[@]}" --part forward | tee "$TABLES" || status=1
echo "== rollout"
timeout 180 $PY benchmarks/bench_gpu.py "${BENCH[@]}" --part rollout | tee -a "$TABLES" || status=1
echo "== tables (paste into BENCHMARKS.md): $TABLES"
cat "$TABLES"
echo "== gpu_check done, status $status"
exit $status
