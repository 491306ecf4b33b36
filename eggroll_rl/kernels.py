"""A compiled CPU kernel for EGGROLL's per-member low-rank term, built on first use.

A member's ``nn.Linear`` output is the shared ``x W^T`` plus ``b + c_e e_i + c_a (x B_i) A_i^T``.
In PyTorch ops that per-member part takes a dot, an ``addcmul`` and per-generation copies of the
noise laid out for them. This C kernel computes it in one pass per row and reads
``A_i``, ``B_i`` and ``e_i`` straight from the float16 copy of the noise table (the table's numbers
are float16 values, see :mod:`eggroll_rl.noise`): half the bytes of float32 copies, and the
forward is bound by those bytes. The shared GEMM is then accumulated into the result in place by
PyTorch (MKL), as before.

It is compiled with the system C compiler (``$CC``, else ``cc``; OpenMP, ``-march=native``) into
``$EGGROLL_RL_CACHE`` (default ``~/.cache/eggroll_rl``) the first time a CPU population needs
it; OpenMP resolves to the runtime PyTorch already loaded, so both share one thread pool. Without
a compiler, on a failed build, for rank > 64, for non-float32 or non-CPU tensors, or with
``EGGROLL_RL_KERNEL=0``, the population uses the PyTorch-ops path, which computes the same numbers.
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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_RANK = 64  # the kernel keeps a member's r dot products in a fixed-size array

_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#define MAX_RANK 64
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* IEEE half -> float, for tails and for builds without F16C. */
static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0 && man == 0) {
    bits = sign;
  } else if (exp == 0) {  /* subnormal: renormalise */
    exp = 1;
    while (!(man & 0x400u)) { man <<= 1; --exp; }
    bits = sign | ((exp + 112u) << 23) | ((man & 0x3ffu) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* AVX2 + F16C: 8 lanes. (16-lane AVX-512 was measured no faster here.) */
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define W 8
typedef __m256 vec;
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec hload(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline vec vset(float v) { return _mm256_set1_ps(v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline float vsum(vec v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_hadd_ps(q, q);
  return _mm_cvtss_f32(_mm_hadd_ps(q, q));
}
#endif

/* x . b over n numbers, b float16. */
static inline float dot_half(const float* restrict x, const uint16_t* restrict b, int64_t n) {
  int64_t j = 0;
  float s = 0.f;
#ifdef W
  /* Two accumulators so consecutive FMAs do not wait on each other. */
  vec s0 = vset(0.f), s1 = vset(0.f);
  for (; j + 2 * W <= n; j += 2 * W) {
    s0 = vfma(vload(x + j), hload(b + j), s0);
    s1 = vfma(vload(x + j + W), hload(b + j + W), s1);
  }
  for (; j + W <= n; j += W) s0 = vfma(vload(x + j), hload(b + j), s0);
  s = vsum(s0) + vsum(s1);
#endif
  for (; j < n; ++j) s += x[j] * half_to_float(b[j]);
  return s;
}

/* y = bias + ce e + sum_q (ca (x . b_q)) a_q for one row. The factors are stored factor-major:
   b_q = b + q n and a_q = a + q m are contiguous; a, b, e are float16 table numbers. */
static inline __attribute__((always_inline)) void member_row(
    const float* restrict x, const uint16_t* restrict a, const uint16_t* restrict b,
    const uint16_t* restrict e, float ce, float ca, const float* restrict bias, float* restrict y,
    int64_t n, int64_t m, int64_t r) {
  float s[MAX_RANK];
  for (int64_t q = 0; q < r; ++q) s[q] = ca * dot_half(x, b + q * n, n);
  int64_t j = 0;
#ifdef W
  const vec cv = vset(ce), zero = vset(0.f);
  for (; j + W <= m; j += W) {
    vec v = bias ? vload(bias + j) : zero;
    if (e) v = vfma(cv, hload(e + j), v);
    for (int64_t q = 0; q < r; ++q) v = vfma(vset(s[q]), hload(a + q * m + j), v);
    vstore(y + j, v);
  }
#endif
  for (; j < m; ++j) {
    float v = bias ? bias[j] : 0.f;
    if (e) v += ce * half_to_float(e[j]);
    for (int64_t q = 0; q < r; ++q) v += s[q] * half_to_float(a[q * m + j]);
    y[j] = v;
  }
}

/* Rows i*k .. i*k+k-1 belong to member i, whose A (r x m), B (r x n) and e (m) start at
   off[i] + pa, + pb, + pe (pe < 0: no e). Members are split into contiguous blocks per thread,
   the same rows each thread's share of the following GEMM is likely to touch. */
void eggroll_lowrank_rows(const float* restrict x, const uint16_t* restrict table,
                          const int64_t* restrict off, const float* restrict ca,
                          const float* restrict ce, const float* restrict bias,
                          float* restrict y, int64_t members, int64_t k, int64_t n, int64_t m,
                          int64_t r, int64_t pa, int64_t pb, int64_t pe, int nthreads) {
  #pragma omp parallel for schedule(static) num_threads(nthreads) \
      if (nthreads > 1 && members * k * r * (n + m) > 32768)
  for (int64_t i = 0; i < members; ++i) {
    const uint16_t* w = table + off[i];
#ifdef W
    if (i + 2 < members) {  /* the table windows are random: start the next fetches early */
      const uint16_t* nw = table + off[i + 2];
      for (int64_t j = 0; j < n * r; j += 32) _mm_prefetch((const char*)(nw + pb + j), _MM_HINT_T0);
      for (int64_t j = 0; j < m * r; j += 32) _mm_prefetch((const char*)(nw + pa + j), _MM_HINT_T0);
      if (pe >= 0)
        for (int64_t j = 0; j < m; j += 32) _mm_prefetch((const char*)(nw + pe + j), _MM_HINT_T0);
    }
#endif
    const uint16_t* e = pe >= 0 ? w + pe : NULL;
    const float cei = pe >= 0 ? ce[i] : 0.f;
    for (int64_t row = i * k; row < (i + 1) * k; ++row) {
      /* A literal rank 1 lets the compiler drop the factor loops on the common path. */
      if (r == 1)
        member_row(x + row * n, w + pa, w + pb, e, cei, ca[i], bias, y + row * m, n, m, 1);
      else
        member_row(x + row * n, w + pa, w + pb, e, cei, ca[i], bias, y + row * m, n, m, r);
    }
  }
}
"""


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


def _compile(compiler: str, target: Path) -> None:
    """Compile the kernel into ``target`` atomically (temp file in the same folder, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "lowrank.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        base = [compiler, "-O3", "-fPIC", "-shared", "-fopenmp", str(src), "-o", str(out)]
        errors = []
        # -march=native where the compiler knows it; a portable build otherwise.
        for flags in (["-march=native"], []):
            proc = subprocess.run(base + flags, capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(out, target)
                return
            errors.append(proc.stderr.strip()[-500:])
        raise RuntimeError(f"{compiler} failed: {errors[-1]}")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Return the compiled kernel, building it on first use; None where it cannot be had."""
    if os.environ.get("EGGROLL_RL_KERNEL", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: EGGROLL populations use the PyTorch-ops path")
        return None
    key = hashlib.sha256((_SOURCE + compiler + _cpu_signature()).encode()).hexdigest()[:16]
    path = _cache_dir() / f"lowrank-{key}.so"
    try:
        if not path.exists():
            _compile(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.info("EGGROLL CPU kernel unavailable (%s): using the PyTorch-ops path", exc)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = lib.eggroll_lowrank_rows
    fn.argtypes = [p] * 7 + [i64] * 8 + [ctypes.c_int]
    fn.restype = None
    return lib


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
) -> torch.Tensor:
    """Write ``bias + coef_e[i] e_i + coef_a[i] (x_row B_i) A_i^T`` into ``out`` for every row.

    ``x`` is ``(N * k, n)`` and ``out`` ``(N * k, m)``, float32; rows ``i*k .. i*k+k-1`` belong
    to member ``i``, whose ``A`` (stored ``(r, m)``), ``B`` (``(r, n)``) and ``e`` (m) start at
    ``offsets[i] + pos_a``, ``+ pos_b`` and ``+ pos_e`` in the float16 ``table`` (``pos_e < 0``:
    no ``e``).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the EGGROLL CPU kernel is not available in this process")
    # The C code reads raw memory: refuse anything but the layout it assumes.
    if not (
        x.dtype == out.dtype == torch.float32
        and table.dtype == torch.float16
        and offsets.dtype == torch.int64
        and x.is_contiguous()
        and out.is_contiguous()
        and out.shape[0] == x.shape[0]
        and x.shape[0] % offsets.shape[0] == 0
        and 1 <= rank <= MAX_RANK
    ):
        raise ValueError("lowrank_rows: inputs do not have the dtypes and shapes it expects")
    members = offsets.shape[0]
    rows, n = x.shape
    lib.eggroll_lowrank_rows(
        x.data_ptr(),
        table.data_ptr(),
        offsets.data_ptr(),
        coef_a.data_ptr(),
        coef_e.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        members,
        rows // members,
        n,
        out.shape[1],
        rank,
        pos_a,
        pos_b,
        pos_e,
        torch.get_num_threads(),
    )
    return out
