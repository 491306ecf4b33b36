"""Counter-based Gaussian noise: every number a pure function of (seed, generation, draw, block, element).

No generator state is carried between generations, so any process can rebuild any member's noise
from the seed alone (what checkpoints and ``torch.distributed`` rely on), and the numbers are
independent across members, layers and generations by construction, at any population size and
any width.

How one number is made:

1. **Bits.** Element ``k`` of parameter block ``b`` (a layer's ``A``, ``B`` or bias, see
   :class:`NoiseLayout`) of draw ``j`` in generation ``t`` is one 32-bit word of Philox4x32-10
   (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the
   generator behind cuRAND, JAX and numpy's ``Philox``) with key ``(seed mod 2^32, seed >> 32)``
   and counter ``(c, j, t, b)``: elements ``32g .. 32g + 31`` are the 4 words of the counters
   ``c = 8g .. 8g + 7`` (element ``32g + 8l + i`` is word ``l`` of counter ``8g + i``). Distinct
   ``(c, j, t, b)`` are distinct inputs of a keyed bijection, so no two numbers share bits: no
   collisions, no overlapping windows, no reuse across layers or generations, no size limit below
   2^32 draws, generations and blocks and 2^34 numbers per block.
2. **Normal.** The word's top bit is the sign; its low 31 bits give ``p = (2m + 1) / 2^33`` in
   (0, 1/2), and ``|z| = -Phi^-1(p)`` is read from a table of the inverse normal CDF at 256
   knots per octave of ``p`` (32 octaves, 8193 knots: tails out to 6.23 sigma), interpolated
   linearly in 24-bit fixed point with 12 bits of the position between knots (error < 1e-6, far
   below float16's resolution), then rounded once, to nearest even, to float16. The knots are
   AS241 (Wichura 1988, ~1e-16 relative) evaluated once per process in Python floats with a log
   built from + - * / only.

Every step is an integer operation (the knot table is integers too), so the bits are the same on
every CPU, instruction set, thread count and on CUDA: no libm, no ``torch.randn`` (whose bits
differ between ATen's CPU capabilities). The PyTorch-ops version here is the reference and runs on
any device; on CPU the compiled kernel (``eggroll_noise_fill`` in ``kernels.c``) computes the same
bits faster, and the tests compare the two bit for bit.

Numbers are float16 values: the population forward is bound by how many noise bytes it reads, and
the CPU kernel (:mod:`eggroll_rl.kernels`) reads the float16 copy; every other use reads the same
values as float32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

# Recorded in trainer configurations (and so in checkpoints): a checkpoint made with other noise
# cannot resume bit-exactly and is refused.
SCHEME = "philox4x32-10/icdf-8193/fp16"

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers (Salmon et al. 2011)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_KNOTS_PER_OCTAVE = 256
_OCTAVES = 32
_FIXED = 24  # knots are |z| * 2^24, rounded
_FRACTION = 12  # bits of the position between two knots
_CHUNK = 1 << 16  # numbers per piece of the PyTorch path on CPU: int64 temporaries that stay in cache
_CHUNK_GPU = 1 << 22  # on accelerators, fewer and larger kernels
_GROUP = 32  # numbers per group of 8 counters


def philox4x32(counter: tuple, key: tuple[int, int], rounds: int = 10) -> tuple:
    """Return Philox4x32-``rounds`` of ``counter`` (4 words) under ``key`` (2 words).

    Words are Python ints or int64 tensors holding values in ``[0, 2^32)``; tensors broadcast.
    Checked against Random123's known-answer vectors in the tests.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        p0, p1 = c0 * _M0, c2 * _M1  # < 2^64: exact in int64 up to the wrap, which keeps the low 64 bits
        c0, c1, c2, c3 = (
            ((p1 >> 32) & _MASK32) ^ c1 ^ k0,
            p1 & _MASK32,
            ((p0 >> 32) & _MASK32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
    return c0, c1, c2, c3


# -- the inverse normal CDF table ------------------------------------------------------------------
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10


def _log(x: float) -> float:
    """Return ln(x) for x > 0 from + - * / only (frexp is exact), so every platform gets the same bits."""
    m, e = math.frexp(x)
    if m < 0.7071067811865476:
        m, e = m * 2.0, e - 1
    s = (m - 1.0) / (m + 1.0)  # ln m = 2 atanh(s), |s| < 0.172
    s2 = s * s
    acc = 0.0
    for k in range(12, 0, -1):
        acc = acc * s2 + 1.0 / (2 * k + 1)
    return e * _LN2_HI + (2.0 * s + (2.0 * s * s2 * acc + e * _LN2_LO))


def _poly(coefs: tuple[float, ...], x: float) -> float:
    acc = 0.0
    for c in coefs:
        acc = acc * x + c
    return acc


# AS241 PPND16 (Wichura 1988), highest degree first.
_A = (
    2509.0809287301226727,
    33430.575583588128105,
    67265.770927008700853,
    45921.953931549871457,
    13731.693765509461125,
    1971.5909503065514427,
    133.14166789178437745,
    3.387132872796366608,
)
_B = (
    5226.495278852854561,
    28729.085735721942674,
    39307.89580009271061,
    21213.794301586595867,
    5394.1960214247511077,
    687.1870074920579083,
    42.313330701600911252,
    1.0,
)
_C = (
    7.7454501427834140764e-4,
    0.0227238449892691845833,
    0.24178072517745061177,
    1.27045825245236838258,
    3.64784832476320460504,
    5.7694972214606914055,
    4.6303378461565452959,
    1.42343711074968357734,
)
_D = (
    1.05075007164441684324e-9,
    5.475938084995344946e-4,
    0.0151986665636164571966,
    0.14810397642748007459,
    0.68976733498510000455,
    1.6763848301838038494,
    2.05319162663775882187,
    1.0,
)
_E = (
    2.01033439929228813265e-7,
    2.71155556874348757815e-5,
    0.0012426609473880784386,
    0.026532189526576123093,
    0.29656057182850489123,
    1.7848265399172913358,
    5.4637849111641143699,
    6.6579046435011037772,
)
_F = (
    2.04426310338993978564e-15,
    1.4215117583164458887e-7,
    1.8463183175100546818e-5,
    7.868691311456132591e-4,
    0.0148753612908506148525,
    0.13692988092273580531,
    0.59983220655588793769,
    1.0,
)


def _upper_quantile(p: float) -> float:
    """Return ``-Phi^-1(p)`` for ``0 < p <= 1/2`` (AS241, relative error ~1e-16)."""
    q = p - 0.5
    if abs(q) <= 0.425:
        r = 0.180625 - q * q
        return -q * _poly(_A, r) / _poly(_B, r)
    r = math.sqrt(-_log(p))  # sqrt is correctly rounded (IEEE 754) everywhere
    if r <= 5.0:
        return _poly(_C, r - 1.6) / _poly(_D, r - 1.6)
    return _poly(_E, r - 5.0) / _poly(_F, r - 5.0)


@functools.cache
def knot_table() -> np.ndarray:
    """Return the 8193 knots ``round(-Phi^-1(p) 2^24)`` (int32), ``p = 2^(e-33) (1 + j/256)``.

    Knot ``256 e + j`` (octave ``e`` in 0..31, ``j`` in 0..255); the last knot, ``p = 1/2``, is 0.
    Built once per process (~50 ms), identically everywhere (see :func:`_log`).
    """
    knots = [
        round(_upper_quantile(math.ldexp(1.0 + j / _KNOTS_PER_OCTAVE, e - 33)) * (1 << _FIXED))
        for e in range(_OCTAVES)
        for j in range(_KNOTS_PER_OCTAVE)
    ]
    return np.array([*knots, 0], dtype=np.int32)


def _msb(x: torch.Tensor) -> torch.Tensor:
    """Return floor(log2 x) for int64 ``1 <= x < 2^32``, from the exponent of an exact float32.

    ``x`` or ``x >> 8`` is below 2^24, so its float32 conversion is exact (as in the C code).
    """
    shift = ((x >> 24) != 0).to(x.dtype) << 3
    exponent = (x >> shift).to(torch.float32).view(torch.int32).to(x.dtype) >> 23
    return exponent - 127 + shift


def normal_bits(words: torch.Tensor, knots: torch.Tensor | None = None) -> torch.Tensor:
    """Map 32-bit words (int64 in ``[0, 2^32)``) to the float16 bit patterns of normal numbers (int64).

    ``knots``: :func:`knot_table` as an int64 tensor on ``words``' device (built when None).
    """
    if knots is None:
        knots = _knots_on(words.device)
    t = ((words & 0x7FFFFFFF) << 1) | 1  # p = t / 2^33
    e = _msb(t)
    n = (t << (31 - e)) & _MASK32  # the top bit of t moved to bit 31
    q = (e << 8) | ((n >> 23) & 255)
    hi, lo = knots[q], knots[q + 1]
    v = lo + (((4096 - ((n >> 11) & 4095)) * (hi - lo)) >> _FRACTION)  # |z| * 2^24, >= 10
    return _fixed_to_half_bits(v) + ((words >> 31) << 15)


def _fixed_to_half_bits(v: torch.Tensor) -> torch.Tensor:
    """Return the float16 bits of ``v * 2^-24`` rounded to nearest even, for int64 ``0 <= v < 2^27``.

    Below 2^11 the bits are ``v`` itself (subnormals and the first binade); above, ``v``'s top 11
    bits rounded, with the exponent ``s`` in the field above them (a carry moves into it).
    """
    s = (_msb(v.clamp(min=1)) - 10).clamp_(min=0)
    r = (2 * v + (torch.ones_like(s) << s) - 1 + ((v >> s) & 1)) >> (s + 1)
    return (s << 10) + r


def _as_half(bits: torch.Tensor) -> torch.Tensor:
    return (bits - ((bits >> 15) << 16)).to(torch.int16).view(torch.float16)


def _check_range(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value < high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}), got {value!r}")
    return int(value)


@functools.cache
def _knots_on(device: torch.device) -> torch.Tensor:
    """Return :func:`knot_table` as int64 on ``device``, copied there once per process."""
    return torch.from_numpy(knot_table()).to(device=device, dtype=torch.int64)


def reference_noise(
    seed: int,
    generation: int,
    block: int,
    start: int,
    stop: int,
    draw0: int = 0,
    draws: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Return numbers ``start..stop-1`` of ``block`` for draws ``draw0..draw0+draws-1`` (float16).

    Shape ``(draws, stop - start)``. The PyTorch-ops definition of the noise (any device); the
    compiled CPU kernel must equal it bit for bit.
    """
    device = torch.device(device)
    knots = _knots_on(device)
    out = torch.empty(draws, stop - start, dtype=torch.float16, device=device)
    key = (seed & _MASK32, seed >> 32)
    rows = torch.arange(draw0, draw0 + draws, device=device).view(-1, 1, 1)
    lanes = torch.arange(8, device=device)
    chunk = _CHUNK if device.type == "cpu" else _CHUNK_GPU
    per_piece = max(1, chunk // (_GROUP * max(draws, 1)))  # groups of 32 numbers per piece
    g, g_end = start // _GROUP, -(-stop // _GROUP)
    while g < g_end:
        g_next = min(g + per_piece, g_end)
        counters = (torch.arange(g, g_next, device=device).view(1, -1, 1) * 8 + lanes).expand(draws, -1, -1)
        words = torch.stack(philox4x32((counters, rows, generation, block), key), dim=2)  # (D, G, 4, 8)
        bits = normal_bits(words.reshape(draws, -1), knots)
        lo, hi = max(start, g * _GROUP), min(stop, g_next * _GROUP)
        out[:, lo - start : hi - start] = _as_half(bits[:, lo - g * _GROUP : hi - g * _GROUP])
        g = g_next
    return out


@dataclass(frozen=True)
class NoiseLayout:
    """Where each perturbed parameter's numbers sit inside one draw's row; each entry is one block."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def width(self) -> int:
        """Numbers one draw holds."""
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0

    @classmethod
    def from_sizes(cls, sizes: dict[str, int]) -> NoiseLayout:
        """Lay parameters out back to back in insertion order."""
        offsets, pos = [], 0
        for size in sizes.values():
            offsets.append(pos)
            pos += size
        return cls(tuple(sizes), tuple(offsets), tuple(sizes.values()))


def _compiled_fill():
    """Return the compiled ``eggroll_noise_fill``, or None where the CPU kernel is not available."""
    from . import kernels

    lib = kernels._library()
    if lib is None:
        return None
    fn = lib.eggroll_noise_fill
    if fn.argtypes is None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, p, i64, i64, i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, i64, i64, p]
        fn.argtypes += [ctypes.c_int]
        fn.restype = None
    return fn


class NoiseGenerator:
    """One trainer's noise: ``sample(generation, draws)`` is that generation's ``(draws, width)`` noise.

    ``seed`` in ``[0, 2^64)``; ``layout`` says which block each column belongs to. On CPU the
    compiled kernel fills the rows (same bits as :func:`reference_noise`), elsewhere PyTorch ops do.
    """

    def __init__(self, seed: int, layout: NoiseLayout, device: torch.device | str = "cpu") -> None:
        self.seed = _check_range("seed", seed, 0, 1 << 64)
        if len(layout.sizes) >= 1 << 32 or any(s > _GROUP << 29 for s in layout.sizes):
            raise ValueError("noise layout: at most 2^32 blocks of at most 2^34 numbers each")
        self.layout, self.device = layout, torch.device(device)
        self.width = layout.width
        self._knots = torch.from_numpy(knot_table())  # int32, read by the compiled kernel

    def block(
        self, generation: int, block: int, start: int, stop: int, draw0: int = 0, draws: int = 1
    ) -> torch.Tensor:
        """Return numbers ``start..stop-1`` of ``block`` for draws ``draw0..`` as ``(draws, n)`` float16."""
        out = torch.empty(draws, stop - start, dtype=torch.float16, device=self.device)
        self._fill(out, None, generation, block, start, stop, draw0, draws)
        return out

    def sample(
        self, generation: int, draws: int, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return generation ``generation``'s noise for draws ``0..draws-1``: ``(float16, dtype)`` copies.

        Both are ``(draws, width)``, contiguous, with equal values (the second is the first upcast).
        """
        half = torch.empty(draws, self.width, dtype=torch.float16, device=self.device)
        full = torch.empty(draws, self.width, dtype=torch.float32, device=self.device)
        filled_full = False
        for b, (offset, size) in enumerate(zip(self.layout.offsets, self.layout.sizes)):
            cols = slice(offset, offset + size)
            filled_full = self._fill(half[:, cols], full[:, cols], generation, b, 0, size, 0, draws)
        if not filled_full:
            full = half.to(torch.float32)
        return half, full if dtype == torch.float32 else half.to(dtype)

    def fingerprint(self) -> str:
        """Return a hash of the scheme, seed, layout and a probe of the numbers this process draws."""
        h = hashlib.sha256(repr((SCHEME, self.seed, self.layout)).encode())
        for generation in (0, 1):
            for b, size in enumerate(self.layout.sizes):
                piece = self.block(generation, b, 0, min(size, 96), 0, 3)
                h.update(piece.cpu().view(torch.int16).numpy().astype("<i2").tobytes())
        return h.hexdigest()

    def _fill(
        self,
        half: torch.Tensor,
        full: torch.Tensor | None,
        generation: int,
        block: int,
        start: int,
        stop: int,
        draw0: int,
        draws: int,
    ) -> bool:
        """Write the numbers into ``half`` (and ``full`` when the kernel can); return whether it did."""
        _check_range("generation", generation, 0, 1 << 32)
        _check_range("draw0 + draws", draw0 + draws, 0, (1 << 32) + 1)
        if not 0 <= start <= stop <= self.layout.sizes[block]:
            raise ValueError(
                f"numbers {start}..{stop} are not inside block {block} ({self.layout.sizes[block]})"
            )
        if draws == 0 or stop == start:
            return full is not None
        fill = _compiled_fill() if self.device.type == "cpu" else None
        if fill is None or half.stride(1) != 1 or (full is not None and full.stride() != half.stride()):
            half.copy_(reference_noise(self.seed, generation, block, start, stop, draw0, draws, self.device))
            return False
        fill(
            half.data_ptr(),
            None if full is None else full.data_ptr(),
            half.stride(0),
            draw0,
            draws,
            self.seed,
            generation,
            block,
            start,
            stop,
            self._knots.data_ptr(),
            torch.get_num_threads(),
        )
        return full is not None


def reuse_pattern(
    population_size: int, noise_reuse: int, device: torch.device | str = "cpu"
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Return (draws, member→draw index, member sign) for a noise_reuse setting.

    With ``noise_reuse = k >= 2`` members ``k*j .. k*j+k-1`` share draw ``j`` with signs
    ``+1, -1, +1, ...`` (k = 2 is antithetic sampling); with 0 every member has its own draw.
    """
    k = max(noise_reuse, 1)
    members = torch.arange(population_size, device=device)
    signs = torch.ones(population_size, device=device)
    if k > 1:
        signs[(members % k) % 2 == 1] = -1.0
    return population_size // k, members // k, signs
