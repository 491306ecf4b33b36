"""Compiled CPU kernels for EGGROLL's population forward (C source: ``kernels.c``), built on first use.

Two kernels, both reading each member's factors straight from the float16 copy of the noise table
(the table's numbers are float16 values, see :mod:`eggroll_rl.noise`; the forward is bound by
those bytes):

- `lowrank_rows`: the per-member part of one ``nn.Linear``, ``b + c_e e_i + c_a (x B_i) A_i^T``,
  in one pass per row. The layer-wise forward adds the shared ``x W^T`` with PyTorch (MKL) in
  place. Used for any model made of ``nn.Linear``/``nn.LayerNorm`` layers.
- `MLPKernel`: a whole MLP policy (observation normaliser, then Linear + tanh/relu/identity
  layers) for every member in one call, shared GEMM included, each tile of rows kept in L1 through
  every layer, with an optional argmax that writes Discrete actions directly. A rollout calls it
  once per env step, so this replaces six to nine PyTorch calls per step with one. Used for models
  that describe themselves with ``mlp_plan()`` (`eggroll_rl.policies.Policy`).

They are compiled with the system C compiler (``$CC``, else ``cc``; OpenMP, ``-march=native``)
into ``$EGGROLL_RL_CACHE`` (default ``~/.cache/eggroll_rl``) the first time a CPU population needs
them; OpenMP resolves to the runtime PyTorch already loaded, so both share one thread pool.
Without a compiler, on a failed build, for rank > 64, for non-float32 or non-CPU tensors, or with
``EGGROLL_RL_KERNEL=0``, the population uses the PyTorch-ops path, which computes the same numbers
(up to float32 rounding: the fused kernel sums in its own order and has its own tanh, within
``TANH_MAX_REL_ERROR`` = 2e-7 relative of the exact one for every float32).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_path, atomic_write_text

try:
    import fcntl
except ImportError:  # not POSIX: builds are still atomic, only not serialised
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAX_RANK = 64  # the kernel keeps a member's r dot products in a fixed-size array

_SOURCE = (Path(__file__).parent / "kernels.c").read_text()


def _cache_dir() -> Path:
    root = os.environ.get("EGGROLL_RL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "eggroll_rl"


# /proc/cpuinfo lines that identify a CPU model and its features (x86: model name, flags; Arm:
# implementer, part, Features...), for the cache key next to what the compiler makes of -march=native.
_CPUINFO_KEYS = (
    "vendor_id", "model name", "flags", "isa", "Features", "CPU implementer", "CPU architecture",
    "CPU variant", "CPU part", "CPU revision", "cpu model", "uarch",
)  # fmt: skip


def _cpu_signature(compiler: str) -> str:
    """Describe this CPU, so a ``-march=native`` build is never loaded on a different one.

    The main part is the compiler's own resolution of ``-march=native`` (``cc -march=native -###``
    lists the target and every instruction-set flag it enables, on x86, Arm and the rest alike, and
    the compiler's version); the distinct identifying lines of ``/proc/cpuinfo`` are added where
    they exist.
    """
    try:
        proc = subprocess.run(
            [compiler, "-march=native", "-###", "-E", "-"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        resolved = proc.stdout + proc.stderr
    except (OSError, subprocess.SubprocessError) as exc:
        resolved = f"no -march=native resolution: {type(exc).__name__}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info = sorted({" ".join(ln.split()) for ln in f if ln.startswith(_CPUINFO_KEYS)})
    except OSError:
        info = []
    return "\n".join([platform.machine(), platform.processor(), resolved, *info])


class _BuildError(RuntimeError):
    pass


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _file_checksum(path: Path) -> str:
    data = path.read_bytes()
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}"


def _compile(compiler: str, target: Path, variants: tuple[tuple[str, ...], ...]) -> None:
    """Compile the kernels into ``target`` atomically, then record its checksum beside it.

    The first of the flag ``variants`` that compiles wins. The library is written to a temporary
    file, fsynced and renamed into place (:func:`eggroll_rl.atomic.atomic_path`); the checksum
    file (``<target>.sha256``: sha256 and size) is written the same way after it, so a library
    with a matching checksum is a complete one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        (Path(tmp) / "kernels.c").write_text(_SOURCE)
        # Relative source name, run in its folder: the same bytes from every build of one key.
        base = [compiler, "-O3", "-fPIC", "-shared", "-fopenmp", "kernels.c", "-lm"]
        errors = []
        for flags in variants:
            try:
                with atomic_path(target) as out:
                    proc = subprocess.run(
                        [*base, "-o", str(out), *flags], cwd=tmp, capture_output=True, text=True,
                        timeout=120,
                    )  # fmt: skip
                    if proc.returncode != 0:
                        raise _BuildError(proc.stderr.strip()[-500:])
            except _BuildError as exc:
                errors.append(str(exc))
                continue
            atomic_write_text(_checksum_path(target), _file_checksum(target) + "\n")
            return
        raise _BuildError(f"{compiler} failed: {errors[-1]}")


def _cache_problem(path: Path) -> str | None:
    """Return why the cached library cannot be loaded as it is ("absent", "...") or None if intact."""
    checksum = _checksum_path(path)
    if not path.exists():
        return "absent"
    if not checksum.exists():
        return "without its checksum file (an interrupted build or an older version)"
    try:
        recorded = checksum.read_text(encoding="utf-8").strip()
        actual = _file_checksum(path)
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable ({exc})"
    if recorded != actual:
        size = actual.split()[1]
        return f"corrupt (checksum mismatch: {size} bytes, truncated, empty or overwritten)"
    return None


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (one process checks and builds a key at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _load_cached(compiler: str, path: Path, variants: tuple[tuple[str, ...], ...]) -> ctypes.CDLL:
    """Load the cached library after verifying its checksum; build or rebuild it when needed.

    A library that is present but fails the check (truncated, empty, garbage, no checksum file) or
    fails to load is rebuilt with a warning: never loaded as it is (a truncated one kills the
    process with SIGBUS) and never silently given up on.
    """
    with _build_lock(path):
        problem = _cache_problem(path)
        if problem is not None:
            if problem != "absent":
                warnings.warn(
                    f"EGGROLL kernel cache {path} is {problem}: rebuilding it", RuntimeWarning, stacklevel=4
                )
            _compile(compiler, path, variants)
            return ctypes.CDLL(str(path))
        try:
            return ctypes.CDLL(str(path))
        except OSError as exc:
            warnings.warn(
                f"EGGROLL kernel cache {path} does not load ({exc}): rebuilding it",
                RuntimeWarning,
                stacklevel=4,
            )
            _compile(compiler, path, variants)
            return ctypes.CDLL(str(path))


# -march=native where the compiler knows it; a portable build otherwise.
_NATIVE = (("-march=native",), ())


@functools.cache
def _library(variants: tuple[tuple[str, ...], ...] = _NATIVE) -> ctypes.CDLL | None:
    """Return the compiled kernels, building them on first use; None where they cannot be had.

    ``variants`` (compiler flags to try in turn) other than the default build other instruction
    sets of the same source, which the tests use to check the AVX2 and SSE code paths. The cache
    key covers the source, the compiler, the CPU (:func:`_cpu_signature`) and the flags.
    """
    if os.environ.get("EGGROLL_RL_KERNEL", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: EGGROLL populations use the PyTorch-ops path")
        return None
    signature = _SOURCE + compiler + _cpu_signature(compiler) + repr(variants)
    key = hashlib.sha256(signature.encode()).hexdigest()[:16]
    path = _cache_dir() / f"kernels-{key}.so"
    try:
        lib = _load_cached(compiler, path, variants)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.info("EGGROLL CPU kernel unavailable (%s): using the PyTorch-ops path", exc)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.eggroll_lowrank_rows.argtypes = [p] * 7 + [i64, p] + [i64] * 7 + [ctypes.c_int]
    lib.eggroll_lowrank_rows.restype = None
    lib.eggroll_mlp_forward.argtypes = [p, p, i64, i64, p, i64, i64, p, p, i64, ctypes.c_int]
    lib.eggroll_mlp_forward.restype = None
    lib.eggroll_tanh.argtypes = [p, p, i64]
    lib.eggroll_tanh.restype = None
    lib.eggroll_tanh_sweep.argtypes = [ctypes.c_uint32, ctypes.c_uint32, p, ctypes.c_int]
    lib.eggroll_tanh_sweep.restype = ctypes.c_double
    return lib


def _require_library() -> ctypes.CDLL:
    """Return the compiled kernels or raise: callers that were told they are unavailable."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the EGGROLL CPU kernel is not available in this process")
    return lib


def _member_map(members: torch.Tensor | None, count: int, rows: int, fn: str) -> int:
    """Check a rows -> member map (int64, values in [0, count)); return the row groups it makes.

    Without a map every member owns ``rows / count`` consecutive rows. The C code indexes the
    member tables with it, so anything out of range is refused here.
    """
    if members is None:
        groups = count
    else:
        if not (members.dtype == torch.int64 and members.dim() == 1 and members.is_contiguous()):
            raise ValueError(f"{fn}: members must be a contiguous 1-D int64 tensor")
        groups = members.numel()
        if groups:
            lo, hi = torch.aminmax(members)
            if int(lo) < 0 or int(hi) >= count:
                raise ValueError(f"{fn}: members must lie in [0, {count}), got [{int(lo)}, {int(hi)}]")
    if (groups == 0 and rows != 0) or (groups and rows % groups):
        raise ValueError(
            f"{fn}: x must have a multiple of {groups} rows (one block per member map entry), got {rows}"
        )
    return groups


def available() -> bool:
    """Whether the compiled CPU kernel can be used in this process (builds it if needed)."""
    return _library() is not None


def _check_tensor(fn: str, name: str, t: object, dtype: torch.dtype, shape: tuple[int | None, ...]) -> None:
    """Raise one ValueError line unless ``t`` is a contiguous CPU ``dtype`` tensor of ``shape``.

    ``shape`` entries of None take any size. Contiguous means the dense row-major layout the C code
    indexes (no stride 0, no transposed or sliced views).
    """
    if (
        isinstance(t, torch.Tensor)
        and t.dtype == dtype
        and t.is_cpu
        and t.dim() == len(shape)
        and all(d is None or d == s for d, s in zip(shape, t.shape, strict=True))
        and t.is_contiguous()
    ):
        return
    dims = ["*" if d is None else str(d) for d in shape]
    expected = f"a contiguous CPU {dtype} tensor of shape ({', '.join(dims)}{',' if len(dims) == 1 else ''})"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be {expected}, got {type(t).__name__}")
    got = f"{t.dtype} {tuple(t.shape)} with strides {t.stride()} on {t.device}"
    raise ValueError(f"{fn}: {name} must be {expected}, got {got}")


def _check_int(fn: str, name: str, value: object, low: int | None, high: int | None = None) -> None:
    """Raise one ValueError line unless ``value`` is an int in ``[low, high]`` (None: unbounded)."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        bounds = f"in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{fn}: {name} must be an int {bounds}, got {value!r}")


def _check_windows(fn: str, offsets: torch.Tensor, span: int, table_size: int) -> None:
    """Raise unless every member's ``span`` numbers from ``offsets[i]`` lie inside the table."""
    if offsets.numel() == 0:
        return
    lo, hi = (int(v) for v in offsets.aminmax())
    if lo < 0 or hi + span > table_size:
        raise ValueError(
            f"{fn}: offsets must lie in [0, {table_size - span}] (table of {table_size} numbers, "
            f"windows of {span}), got [{lo}, {hi}]"
        )


class LowRankRows:
    """One ``nn.Linear``'s per-member term for a generation's members, checked once, called per batch.

    ``LowRankRows(...)(x, out)`` is :func:`lowrank_rows`: the member data (table, offsets,
    coefficients, bias, sizes and noise positions) is checked here, and the offsets and
    coefficients copied, so a call checks only ``x`` ``(N * k, n)`` and ``out`` ``(N * k, m)``.
    Raises ValueError (one line naming the argument) for any size, dtype, device, stride, rank,
    position or window the C code could not read safely.
    """

    def __init__(
        self,
        table: torch.Tensor,
        offsets: torch.Tensor,
        coef_a: torch.Tensor,
        coef_e: torch.Tensor,
        bias: torch.Tensor | None,
        n: int,
        m: int,
        rank: int,
        pos_a: int,
        pos_b: int,
        pos_e: int,
    ) -> None:
        self._fn = _require_library().eggroll_lowrank_rows
        fn = "lowrank_rows"
        self.offsets = _owned(fn, "offsets", offsets, torch.int64, (None,))
        self.members = members = self.offsets.shape[0]
        if members < 1:
            raise ValueError(f"{fn}: offsets must hold at least one member")
        self.coef_a = _owned(fn, "coef_a", coef_a, torch.float32, (members,))
        self.coef_e = _owned(fn, "coef_e", coef_e, torch.float32, (members,))
        _check_int(fn, "n", n, 1)
        _check_int(fn, "m", m, 1)
        if bias is not None:
            _check_tensor(fn, "bias", bias, torch.float32, (m,))
        _check_tensor(fn, "table", table, torch.float16, (None,))
        _check_int(fn, "rank", rank, 1, MAX_RANK)
        _check_int(fn, "pos_a", pos_a, 0)
        _check_int(fn, "pos_b", pos_b, 0)
        _check_int(fn, "pos_e", pos_e, None)
        span = max(pos_a + rank * m, pos_b + rank * n, pos_e + m if pos_e >= 0 else 0)
        _check_windows(fn, self.offsets, span, table.numel())
        self.table, self.bias, self.n, self.m = table, bias, n, m
        self._args = (rank, pos_a, pos_b, pos_e)

    def __call__(
        self, x: torch.Tensor, out: torch.Tensor, members: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Write the rows into ``out`` and return it (rows ``g*k .. g*k+k-1``: member ``members[g]``)."""
        fn = "lowrank_rows"
        _check_tensor(fn, "x", x, torch.float32, (None, self.n))
        rows = x.shape[0]
        _check_tensor(fn, "out", out, torch.float32, (rows, self.m))
        groups = _member_map(members, self.members, rows, fn)
        if rows == 0:
            return out
        self._fn(
            x.data_ptr(), self.table.data_ptr(), self.offsets.data_ptr(), self.coef_a.data_ptr(),
            self.coef_e.data_ptr(), None if self.bias is None else self.bias.data_ptr(), out.data_ptr(),
            groups, _addr(members), rows // groups, self.n, self.m, *self._args, torch.get_num_threads(),
        )  # fmt: skip
        return out


def lowrank_rows(
    x: torch.Tensor,
    table: torch.Tensor,
    offsets: torch.Tensor,
    coef_a: torch.Tensor,
    coef_e: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    rank: int,
    pos_a: int,
    pos_b: int,
    pos_e: int,
    members: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``bias + coef_e[i] e_i + coef_a[i] (x_row B_i) A_i^T`` into ``out`` for every row.

    ``x`` is ``(G * k, n)`` and ``out`` ``(G * k, m)``, float32; rows ``g*k .. g*k+k-1`` belong
    to member ``i = members[g]`` (``members``: ``(G,)`` int64 in ``[0, N)``; None: ``i = g`` and
    ``G = N``, the number of ``offsets``). Raises ValueError on other dtypes or shapes. Member
    ``i``'s ``A`` (stored ``(r, m)``), ``B`` (``(r, n)``) and ``e`` (m) start at
    ``offsets[i] + pos_a``, ``+ pos_b`` and ``+ pos_e`` in the float16 ``table`` (``pos_e < 0``:
    no ``e``). Every argument is checked first (see :class:`LowRankRows`, which checks the member
    data once for repeated calls).
    """
    _require_library()
    _check_tensor("lowrank_rows", "x", x, torch.float32, (None, None))
    _check_tensor("lowrank_rows", "out", out, torch.float32, (x.shape[0], None))
    n, m = x.shape[1], out.shape[1]
    rows_of = LowRankRows(table, offsets, coef_a, coef_e, bias, n, m, rank, pos_a, pos_b, pos_e)
    return rows_of(x, out, members)


# -- the fused MLP forward ------------------------------------------------------------------------

ACTIVATIONS = {"identity": 0, "tanh": 1, "relu": 2}  # what the fused forward computes itself
# Largest relative error of the fused forward's tanh against the exact one, for every float32 (the
# exhaustive sweep in tests/test_kernels.py measured 1.88e-7 at x = 0.55196 in the AVX2 build and
# 1.81e-7 in the portable one; it checks whichever builds the CPU runs, AVX-512 included).
TANH_MAX_REL_ERROR = 2e-7
MAX_WIDTH = 1024  # widest layer (its tile buffers live on the stack: 128 * width bytes)
_PAD = 16  # output columns are padded to a multiple of every vector width the C code may use


class _Layer(ctypes.Structure):
    _fields_ = [
        ("wt", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("m", ctypes.c_int64),
        ("m_pad", ctypes.c_int64),
        ("pa", ctypes.c_int64),
        ("pb", ctypes.c_int64),
        ("pe", ctypes.c_int64),
        ("act", ctypes.c_int64),
    ]


class _MLP(ctypes.Structure):
    _fields_ = [
        ("nlayers", ctypes.c_int64),
        ("in_dim", ctypes.c_int64),
        ("ld", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("window", ctypes.c_int64),
        ("layers", ctypes.POINTER(_Layer)),
        ("table", ctypes.c_void_p),
        ("off", ctypes.c_void_p),
        ("ca", ctypes.c_void_p),
        ("ce", ctypes.c_void_p),
        ("mean", ctypes.c_void_p),
        ("std", ctypes.c_void_p),
        ("clip", ctypes.c_float),
    ]


@dataclass(frozen=True)
class MLPLayer:
    """One ``Linear`` + activation of a fused MLP, and where its noise sits in a member's window.

    ``where`` is ``(pos_a, pos_b, pos_e)``; ``pos_a``/``pos_b`` < 0: the weight is not perturbed,
    ``pos_e`` < 0: the bias is not.
    """

    weight: torch.Tensor  # (m, n)
    bias: torch.Tensor | None  # (m,)
    activation: str
    where: tuple[int, int, int] = (-1, -1, -1)


@dataclass(frozen=True)
class MemberNoise:
    """Where each member's noise lives: the float16 table, window starts and coefficients."""

    table: torch.Tensor  # float16
    offsets: torch.Tensor  # (members,) int64
    coef_a: torch.Tensor  # (members,) float32: sign_i sigma / sqrt(r)
    coef_e: torch.Tensor  # (members,) float32: sign_i sigma
    rank: int
    window: int  # numbers a member reads from its offset on


def _owned(fn: str, name: str, t: object, dtype: torch.dtype, shape: tuple[int | None, ...]) -> torch.Tensor:
    """Return a private copy of ``t`` after checking it is a contiguous CPU ``dtype`` tensor of ``shape``."""
    _check_tensor(fn, name, t, dtype, shape)
    return t.detach().clone()  # type: ignore[union-attr]


def _check_layer_noise(j: int, where: tuple[int, int, int], m: int, n: int, rank: int, window: int) -> None:
    """Raise unless layer ``j``'s noise positions fit inside a member's ``window`` numbers."""
    if not (isinstance(where, tuple) and len(where) == 3 and all(isinstance(v, int) for v in where)):
        raise ValueError(f"MLPLayer {j}: where must be three ints (pos_a, pos_b, pos_e), got {where!r}")
    pa, pb, pe = where
    ends = []
    if (pa >= 0) != (pb >= 0):
        raise ValueError(f"MLPLayer {j}: pos_a and pos_b must both be >= 0 or both < 0, got {where}")
    if pa >= 0:
        ends += [pa + rank * m, pb + rank * n]
    if pe >= 0:
        ends.append(pe + m)
    if ends and max(ends) > window:
        raise ValueError(
            f"MLPLayer {j}: noise at {where} needs {max(ends)} numbers per member, the window holds {window}"
        )


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class MLPKernel:
    """A whole MLP (normaliser, then Linear + activation layers) for every member in one C call.

    Member ``i``'s layer computes ``h W^T + b + c_e[i] e_i + c_a[i] (h B_i) A_i^T`` with the
    factors read from the noise table (see :func:`lowrank_rows`); without ``noise`` every row is
    the center. The normaliser is ``clamp((x - mean) / std, -clip, clip)``, its tensors read at
    every call. Weights are copied (transposed, padded) here: build one per set of parameters;
    the member offsets and coefficients are copied too (checked once against the table here).

    Raises ValueError (one line naming the argument) for anything the C code could not read
    safely or would compute differently: shapes, dtypes, devices, a bias of the wrong size, noise
    positions outside a member's window, windows outside the table, a NaN or negative ``clip``.
    """

    def __init__(
        self,
        layers: list[MLPLayer],
        normalizer: tuple[torch.Tensor, torch.Tensor, float] | None = None,
        noise: MemberNoise | None = None,
    ) -> None:
        lib = _require_library()
        if not layers:
            raise ValueError("MLPKernel needs at least one layer")
        keep: list[torch.Tensor] = []

        def held(t: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> int | None:
            if t is None:
                return None
            t = t.detach().to(dtype).contiguous()
            keep.append(t)
            return t.data_ptr()

        structs = []
        fan_in = None
        if noise is not None:
            _check_tensor("MemberNoise", "table", noise.table, torch.float16, (None,))
            _check_int("MemberNoise", "rank", noise.rank, 1, MAX_RANK)
            _check_int("MemberNoise", "window", noise.window, 0)
        for j, layer in enumerate(layers):
            w = layer.weight
            if not (
                isinstance(w, torch.Tensor)
                and w.dim() == 2
                and w.device.type == "cpu"
                and w.is_floating_point()
            ):
                raise ValueError(f"MLPKernel: layer {j} weight must be a 2-D floating CPU tensor (m, n)")
            m, n = w.shape
            if layer.bias is not None:
                b = layer.bias
                if not (isinstance(b, torch.Tensor) and b.device.type == "cpu" and tuple(b.shape) == (m,)):
                    raise ValueError(f"MLPKernel: layer {j} bias must be a CPU tensor of shape ({m},)")
            if noise is not None:
                _check_layer_noise(j, layer.where, m, n, noise.rank, noise.window)
            if fan_in is None:
                fan_in = self.in_dim = n
            if n != fan_in:
                raise ValueError(f"layer input size {n} does not follow the previous output {fan_in}")
            if layer.activation not in ACTIVATIONS:
                raise ValueError(f"activation {layer.activation!r} is not one of {sorted(ACTIVATIONS)}")
            m_pad = -(-m // _PAD) * _PAD
            wt = torch.zeros(n, m_pad)
            wt[:, :m] = layer.weight.detach().T
            pa, pb, pe = layer.where if noise is not None else (-1, -1, -1)
            structs.append(
                _Layer(held(wt), held(layer.bias), n, m, m_pad, pa, pb, pe, ACTIVATIONS[layer.activation])
            )
            fan_in = m
        self.out_dim = fan_in
        ld = max([self.in_dim] + [s.m_pad for s in structs])
        if ld > MAX_WIDTH:
            raise ValueError(f"layers wider than {MAX_WIDTH} are not fused (got {ld})")
        self._layers = (_Layer * len(structs))(*structs)
        mean, std, clip = normalizer if normalizer is not None else (None, None, 0.0)
        if not (isinstance(clip, int | float) and float(clip) >= 0):  # NaN fails too
            raise ValueError(f"normaliser clip must be a number >= 0, got {clip!r}")
        if normalizer is not None:
            # Read at every call, not copied: a normaliser refreshed in place applies at once.
            if not all(
                t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
                and t.shape == (self.in_dim,)
                for t in (mean, std)
            ):  # fmt: skip
                raise ValueError(f"normaliser mean/std must be contiguous CPU float32 ({self.in_dim},)")
            keep += [mean, std]
        self._plan = _MLP(
            len(structs), self.in_dim, ld, 0, 0, self._layers, None, None, None, None,
            _addr(mean), _addr(std), float(clip),
        )  # fmt: skip
        self.members: int | None = None
        if noise is not None:
            # Own copies: what was checked here is what the C code reads at every call.
            offsets = _owned("MemberNoise", "offsets", noise.offsets, torch.int64, (None,))
            members = offsets.numel()
            if members < 1:
                raise ValueError("MemberNoise: offsets must hold at least one member")
            coef_a = _owned("MemberNoise", "coef_a", noise.coef_a, torch.float32, (members,))
            coef_e = _owned("MemberNoise", "coef_e", noise.coef_e, torch.float32, (members,))
            _check_windows("MemberNoise", offsets, noise.window, noise.table.numel())
            self.members = members
            self._plan.rank, self._plan.window = noise.rank, noise.window
            self._plan.table = held(noise.table, torch.float16)
            self._plan.off = held(offsets, torch.int64)
            self._plan.ca, self._plan.ce = held(coef_a), held(coef_e)
        self._keep = keep
        self._fn = lib.eggroll_mlp_forward
        self._plan_ref = ctypes.byref(self._plan)

    def __call__(
        self,
        x: torch.Tensor,
        out: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        action_start: int = 0,
        members: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the outputs ``(rows, out_dim)`` for ``x`` ``(rows, in_dim)`` (any strides).

        With noise, rows ``g*k .. g*k+k-1`` go to member ``members[g]`` (``members``: ``(G,)``
        int64 in ``[0, N)``, ``k = rows / G``; None: member ``g``, ``G = N``). With ``actions`` (int64,
        ``(rows,)``), each row's first argmax plus ``action_start`` is written there too, and
        ``out`` is only written if given.
        """
        rows = x.shape[0]
        if x.dtype != torch.float32:
            raise TypeError(f"population input must be float32 like the model, got {x.dtype}")
        if not (
            x.dim() == 2 and x.shape[1] == self.in_dim and x.device.type == "cpu" and min(x.stride()) >= 0
        ):
            raise ValueError(
                f"MLPKernel input must be a CPU (rows, {self.in_dim}) tensor, "
                f"got shape {tuple(x.shape)} on {x.device}"
            )
        if self.members is None:
            members, groups = None, max(rows, 1)  # no noise: every row is the center
        else:
            groups = _member_map(members, self.members, rows, "MLPKernel")
        if actions is None and out is None:
            out = x.new_empty(rows, self.out_dim)
        if out is not None:
            _check_tensor("MLPKernel", "out", out, torch.float32, (rows, self.out_dim))
        if actions is not None:
            _check_tensor("MLPKernel", "actions", actions, torch.int64, (rows,))
        _check_int("MLPKernel", "action_start", action_start, None)
        if rows == 0:
            return out if out is not None else actions
        rs, cs = x.stride()
        self._fn(
            self._plan_ref, x.data_ptr(), rows, groups, _addr(members), rs, cs, _addr(out),
            _addr(actions), action_start, torch.get_num_threads(),
        )  # fmt: skip
        return out if out is not None else actions


def tanh(x: torch.Tensor) -> torch.Tensor:
    """Return the fused forward's tanh of a CPU float32 tensor (for its accuracy test)."""
    lib = _require_library()
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu"):
        raise ValueError(f"tanh: x must be a CPU float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    x = x.contiguous()
    y = torch.empty_like(x)
    lib.eggroll_tanh(x.data_ptr(), y.data_ptr(), x.numel())
    return y


def tanh_max_error(low: float, high: float) -> tuple[float, float]:
    """Return the fused tanh's largest relative error over every float32 in ``[low, high)``, and where.

    An exhaustive sweep in C (OpenMP threads) against ``tanh`` in double; ``0 <= low < high``
    (the kernel's tanh is odd by construction). About a nanosecond per float per thread.
    """
    lib = _require_library()
    if not 0 <= low < high:
        raise ValueError(f"tanh_max_error: need 0 <= low < high, got [{low}, {high})")
    bits = torch.tensor([low, high], dtype=torch.float32).view(torch.int32).tolist()
    worst = ctypes.c_float()
    err = lib.eggroll_tanh_sweep(bits[0], bits[1], ctypes.byref(worst), torch.get_num_threads())
    return err, worst.value
