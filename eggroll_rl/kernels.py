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
(up to float32 rounding: the fused kernel sums in its own order and has its own tanh, within 2.5e-7
of the exact one).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_RANK = 64  # the kernel keeps a member's r dot products in a fixed-size array

_SOURCE = (Path(__file__).parent / "kernels.c").read_text()


def _cache_dir() -> Path:
    root = os.environ.get("EGGROLL_RL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "eggroll_rl"


def _cpu_signature() -> str:
    """Describe this CPU, so a ``-march=native`` build is never loaded on a different one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + platform.processor() + "".join(lines)


def _compile(compiler: str, target: Path, variants: tuple[tuple[str, ...], ...]) -> None:
    """Compile the kernels into ``target`` atomically (temp file in the same folder, then rename).

    The first of the flag ``variants`` that compiles wins.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernels.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        base = [compiler, "-O3", "-fPIC", "-shared", "-fopenmp", str(src), "-o", str(out)]
        errors = []
        for flags in variants:
            proc = subprocess.run(base + list(flags), capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(out, target)
                return
            errors.append(proc.stderr.strip()[-500:])
        raise RuntimeError(f"{compiler} failed: {errors[-1]}")


# -march=native where the compiler knows it; a portable build otherwise.
_NATIVE = (("-march=native",), ())


@functools.cache
def _library(variants: tuple[tuple[str, ...], ...] = _NATIVE) -> ctypes.CDLL | None:
    """Return the compiled kernels, building them on first use; None where they cannot be had.

    ``variants`` (compiler flags to try in turn) other than the default build other instruction
    sets of the same source, which the tests use to check the AVX2 and SSE code paths.
    """
    if os.environ.get("EGGROLL_RL_KERNEL", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: EGGROLL populations use the PyTorch-ops path")
        return None
    signature = _SOURCE + compiler + _cpu_signature() + repr(variants)
    key = hashlib.sha256(signature.encode()).hexdigest()[:16]
    path = _cache_dir() / f"kernels-{key}.so"
    try:
        if not path.exists():
            _compile(compiler, path, variants)
        lib = ctypes.CDLL(str(path))
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
            f"{fn}: the row count must be a multiple of {groups} (member map entries), got {rows}"
        )
    return groups


def available() -> bool:
    """Whether the compiled CPU kernel can be used in this process (builds it if needed)."""
    return _library() is not None


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
    no ``e``).
    """
    lib = _require_library()
    # The C code reads raw memory: refuse anything but the layout it assumes.
    if not (
        x.dtype == out.dtype == torch.float32
        and table.dtype == torch.float16
        and offsets.dtype == torch.int64
        and x.is_contiguous()
        and out.is_contiguous()
        and out.shape[0] == x.shape[0]
        and 1 <= rank <= MAX_RANK
    ):
        raise ValueError("lowrank_rows: inputs do not have the dtypes and shapes it expects")
    rows, n = x.shape
    groups = _member_map(members, offsets.shape[0], rows, "lowrank_rows")
    if rows == 0:
        return out
    lib.eggroll_lowrank_rows(
        x.data_ptr(),
        table.data_ptr(),
        offsets.data_ptr(),
        coef_a.data_ptr(),
        coef_e.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        groups,
        None if members is None else members.data_ptr(),
        rows // max(groups, 1),
        n,
        out.shape[1],
        rank,
        pos_a,
        pos_b,
        pos_e,
        torch.get_num_threads(),
    )
    return out


# -- the fused MLP forward ------------------------------------------------------------------------

ACTIVATIONS = {"identity": 0, "tanh": 1, "relu": 2}  # what the fused forward computes itself
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


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class MLPKernel:
    """A whole MLP (normaliser, then Linear + activation layers) for every member in one C call.

    Member ``i``'s layer computes ``h W^T + b + c_e[i] e_i + c_a[i] (h B_i) A_i^T`` with the
    factors read from the noise table (see :func:`lowrank_rows`); without ``noise`` every row is
    the center. The normaliser is ``clamp((x - mean) / std, -clip, clip)``, its tensors read at
    every call. Weights are copied (transposed, padded) here: build one per set of parameters.
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
        fan_in = layers[0].weight.shape[1]
        self.in_dim = fan_in
        for layer in layers:
            m, n = layer.weight.shape
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
            if noise.table.dtype != torch.float16 or not 1 <= noise.rank <= MAX_RANK:
                raise ValueError("MemberNoise needs a float16 table and 1 <= rank <= MAX_RANK")
            self.members = noise.offsets.numel()
            self._plan.rank, self._plan.window = noise.rank, noise.window
            self._plan.table = held(noise.table, torch.float16)
            self._plan.off = held(noise.offsets, torch.int64)
            self._plan.ca, self._plan.ce = held(noise.coef_a), held(noise.coef_e)
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
        if out is not None and not (out.is_contiguous() and out.shape == (rows, self.out_dim)):
            raise ValueError(f"out must be a contiguous ({rows}, {self.out_dim}) tensor")
        if actions is not None and not (actions.dtype == torch.int64 and actions.shape == (rows,)):
            raise ValueError(f"actions must be an int64 tensor of shape ({rows},)")
        if rows == 0:
            return out if out is not None else actions
        rs, cs = x.stride()
        self._fn(
            self._plan_ref, x.data_ptr(), rows, groups, _addr(members), rs, cs, _addr(out),
            _addr(actions), action_start, torch.get_num_threads(),
        )  # fmt: skip
        return out if out is not None else actions


def tanh(x: torch.Tensor) -> torch.Tensor:
    """Return the fused forward's tanh of a contiguous float32 tensor (for its accuracy test)."""
    lib = _require_library()
    x = x.contiguous()
    if x.dtype != torch.float32:
        raise ValueError(f"tanh needs float32, got {x.dtype}")
    y = torch.empty_like(x)
    lib.eggroll_tanh(x.data_ptr(), y.data_ptr(), x.numel())
    return y
