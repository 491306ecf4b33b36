"""Building and loading the compiled CPU kernel, and falling back when it cannot be had."""

from __future__ import annotations

import io
import itertools
import shutil
import subprocess
import sys

import pytest
import torch

from eggroll_rl import kernels


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Forget the process's kernel and build into an empty cache folder."""
    monkeypatch.setenv("EGGROLL_RL_CACHE", str(tmp_path))
    kernels._library.cache_clear()
    yield tmp_path
    kernels._library.cache_clear()


needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


def _by_hand(x, table, offsets, coef_a, coef_e, bias, n, m, r, with_e):
    """The kernel's rows computed in float64 from the formula (A (r, m), B (r, n), then e)."""
    t = table.double()
    rows = []
    for i, o in enumerate(offsets.tolist()):
        a = t[o : o + r * m].view(r, m)
        b = t[o + r * m : o + r * (m + n)].view(r, n)
        y = (bias.double() if bias is not None else 0) + coef_a[i] * (b @ x[i].double()) @ a
        if with_e:
            y = y + coef_e[i] * t[o + r * (m + n) : o + r * (m + n) + m]
        rows.append(y)
    return torch.stack(rows).float()


@needs_compiler
def test_builds_into_an_empty_cache(fresh) -> None:
    """A fresh cache gets the library, its checksum and the build lock; no temp files left behind."""
    assert kernels.available()
    assert sorted(p.suffix for p in fresh.iterdir()) == [".lock", ".sha256", ".so"]
    (library,) = fresh.glob("*.so")
    assert kernels._cache_problem(library) is None


@needs_compiler
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("n, m", [(3, 4), (37, 21), (64, 256), (256, 8)])
@pytest.mark.parametrize("with_bias, with_e", [(True, True), (True, False), (False, True), (False, False)])
def test_computes_the_rows(rank, n, m, with_bias, with_e) -> None:
    """The rows equal the formula for vector bodies and tails."""
    assert kernels.available()
    torch.manual_seed(n * m + rank)
    members, width = 5, rank * (m + n) + m
    table = torch.randn(8000).half()
    offsets = torch.randint(0, 8000 - width, (members,))
    x = torch.randn(members, n)
    bias = torch.randn(m) if with_bias else None
    coef_a, coef_e = torch.randn(members), torch.randn(members)
    out = torch.empty(members, m)
    pos_e = rank * (m + n) if with_e else -1
    kernels.lowrank_rows(x, table, offsets, coef_a, coef_e, bias, out, rank, 0, rank * m, pos_e)
    expected = _by_hand(x, table, offsets, coef_a, coef_e, bias, n, m, rank, with_e)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_half_conversion_covers_every_finite_float16(build) -> None:
    """Every finite float16 (subnormals included) is read as its exact float32 value."""
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    table = bits.view(torch.float16)
    table = table[torch.isfinite(table.float())].contiguous()
    # A 1-wide layer with x = 1, coefficient 1 and no bias gives y = a * (1 * b): put b = 1 in front
    # and read every table number as `a` (m = len, a tail-only layer for the scalar path too).
    ones = torch.ones(1, dtype=torch.float16)
    table = torch.cat([ones, table])
    m = table.numel() - 1
    out = torch.empty(1, m)
    one = torch.ones(1)
    start = torch.zeros(1, dtype=torch.int64)
    kernels.lowrank_rows(torch.ones(1, 1), table, start, one, one, None, out, 1, 1, 0, -1)
    torch.testing.assert_close(out[0], table[1:].float(), rtol=0, atol=0)


def _rows_args(**change):
    """Valid lowrank_rows arguments (2 members x 2 rows, n 3, m 4, rank 2, e after A and B), changed."""
    args = dict(
        x=torch.zeros(4, 3),
        table=torch.zeros(100, dtype=torch.float16),
        offsets=torch.tensor([0, 82]),  # window 2*4 + 2*3 + 4 = 18: 82 + 18 = 100 fits exactly
        coef_a=torch.ones(2),
        coef_e=torch.ones(2),
        bias=torch.zeros(4),
        out=torch.zeros(4, 4),
        rank=2,
        pos_a=0,
        pos_b=8,
        pos_e=14,
    )
    args.update(change)
    return args


_BAD_ROWS = {
    "short coef_a (ASan: heap-buffer-overflow)": ({"coef_a": torch.ones(1)}, "coef_a must be"),
    "short coef_e": ({"coef_e": torch.ones(1)}, "coef_e must be"),
    "coef_a float64": ({"coef_a": torch.ones(2).double()}, "coef_a must be"),
    "strided coef_a": ({"coef_a": torch.ones(4)[::2]}, "coef_a must be"),
    "table float32": ({"table": torch.zeros(100)}, "table must be"),
    "strided table": ({"table": torch.zeros(200, dtype=torch.float16)[::2]}, "table must be"),
    "table on meta": ({"table": torch.zeros(100, dtype=torch.float16, device="meta")}, "table must be"),
    "x float64": ({"x": torch.zeros(4, 3).double()}, "x must be"),
    "x transposed": ({"x": torch.zeros(3, 4).T}, "x must be"),
    "x 1-D": ({"x": torch.zeros(12)}, "x must be"),
    "out stride 0": ({"out": torch.zeros(1, 4).expand(4, 4)}, "out must be"),
    "out too few rows": ({"out": torch.zeros(2, 4)}, "out must be"),
    "out int": ({"out": torch.zeros(4, 4, dtype=torch.int32)}, "out must be"),
    "bias too short": ({"bias": torch.zeros(3)}, "bias must be"),
    "bias stride 0": ({"bias": torch.zeros(1).expand(4)}, "bias must be"),
    "offsets int32": ({"offsets": torch.tensor([0, 82], dtype=torch.int32)}, "offsets must be"),
    "offsets 2-D": ({"offsets": torch.tensor([[0, 82]])}, "offsets must be"),
    "no members": ({"offsets": torch.zeros(0, dtype=torch.int64)}, "offsets must hold at least one"),
    "rows not a multiple": (
        {"offsets": torch.tensor([0, 20, 40]), "coef_a": torch.ones(3), "coef_e": torch.ones(3)},
        "x must have a multiple",
    ),
    "window past the table": ({"offsets": torch.tensor([0, 83])}, "offsets must lie"),
    "negative offset": ({"offsets": torch.tensor([-1, 0])}, "offsets must lie"),
    "e past the window": ({"pos_e": 90}, "offsets must lie"),
    "rank 0": ({"rank": 0}, "rank must be"),
    "rank above MAX_RANK": ({"rank": kernels.MAX_RANK + 1}, "rank must be"),
    "negative pos_a": ({"pos_a": -1}, "pos_a must be"),
    "float pos_b": ({"pos_b": 8.0}, "pos_b must be"),
}


@pytest.mark.parametrize("case", list(_BAD_ROWS))
def test_lowrank_rows_refuses_what_it_cannot_read(case) -> None:
    """Every size, dtype, device, stride and window is checked before a pointer reaches C: one line."""
    if not kernels.available():
        pytest.skip("no compiled kernel here")
    change, message = _BAD_ROWS[case]
    with pytest.raises(ValueError, match=f"^lowrank_rows: {message}") as info:
        kernels.lowrank_rows(**_rows_args(**change))
    assert "\n" not in str(info.value)


def test_lowrank_rows_accepts_the_tightest_valid_inputs() -> None:
    """The checks reject nothing valid: the last member's window ends at the table's last number."""
    if not kernels.available():
        pytest.skip("no compiled kernel here")
    torch.manual_seed(0)
    args = _rows_args(x=torch.randn(4, 3), table=torch.randn(100).half(), bias=torch.randn(4))
    kernels.lowrank_rows(**args)
    expected = _by_hand(args["x"][::2], args["table"], args["offsets"], args["coef_a"], args["coef_e"],
                        args["bias"], 3, 4, 2, True)  # fmt: skip
    torch.testing.assert_close(args["out"][::2], expected, rtol=1e-5, atol=1e-5)


def test_disabled_by_environment(fresh, monkeypatch) -> None:
    """EGGROLL_RL_KERNEL=0 keeps the PyTorch-ops path and builds nothing."""
    monkeypatch.setenv("EGGROLL_RL_KERNEL", "0")
    assert not kernels.available()
    assert list(fresh.iterdir()) == []
    with pytest.raises(RuntimeError, match="not available"):
        kernels.lowrank_rows(*[torch.zeros(1, 1)] * 7, 1, 0, 0, -1)


def test_failed_build_falls_back_cleanly(fresh, monkeypatch) -> None:
    """A compiler that fails leaves no library or temp files, and the kernel reports unavailable."""
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program to stand in for a failing compiler")
    monkeypatch.setenv("CC", false)
    assert not kernels.available()
    assert [p.suffix for p in fresh.iterdir()] == [".lock"]


# -- the fused MLP forward --------------------------------------------------------------------------


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next(ln for ln in f if ln.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


# The same source built for each instruction set it has a code path for (AVX-512 where -march=native
# has it, AVX2, and the portable SSE2 / scalar-float16 build).
_VARIANTS = {
    "native": kernels._NATIVE,
    "avx2": (("-mavx2", "-mfma", "-mf16c"),),
    "portable": ((),),
}


@pytest.fixture(params=list(_VARIANTS))
def build(request, monkeypatch, tmp_path):
    """Load one instruction-set build of the kernels as the process's library."""
    if request.param == "avx2" and not {"avx2", "fma", "f16c"} <= _cpu_flags():
        pytest.skip("this CPU cannot run an AVX2 build")
    monkeypatch.setenv("EGGROLL_RL_CACHE", str(tmp_path))
    lib = kernels._library(_VARIANTS[request.param])
    if lib is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(kernels, "_library", lambda variants=kernels._NATIVE: lib)
    return request.param


@pytest.mark.slow
def test_tanh_is_within_its_stated_bound_for_every_float32(build) -> None:
    """Every float32 in [2^-12, 16) (exhaustive, in C) is within TANH_MAX_REL_ERROR of float64 tanh.

    Below 2^-12 the result is x itself (x^3/3 is under half an ulp of x), whose error x^2/3 < 2e-8
    is checked on a strided sample; from 10 on the result is 1 (the argument is capped at 20), the
    float32 nearest tanh(x) for x >= 9.02. The sign is copied from x, so negative x mirror these.
    """
    err, worst = kernels.tanh_max_error(2.0**-12, 16.0)
    assert err < kernels.TANH_MAX_REL_ERROR, f"{err:.3g} at x = {worst!r}"
    assert err > 0.5 * kernels.TANH_MAX_REL_ERROR  # the stated bound is not loose (and the sweep ran)
    tiny = torch.arange(1, 0x39800000, 4099, dtype=torch.int32).view(torch.float32)  # (0, 2^-12)
    assert torch.equal(kernels.tanh(tiny), tiny) and torch.equal(kernels.tanh(-tiny), -tiny)
    big = torch.tensor([9.02, 10.0, 16.0, 20.0, 1e3, 3.4e38])
    assert torch.equal(kernels.tanh(big), torch.ones(6)) and torch.equal(kernels.tanh(-big), -torch.ones(6))
    x = torch.linspace(-16, 16, 100_001)
    assert torch.equal(kernels.tanh(-x), -kernels.tanh(x))
    special = kernels.tanh(torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, 1e3]))
    assert special[:2].tolist() == [1.0, -1.0] and special[2].isnan() and special[3] == 0 and special[4] == 1


_ACT = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda t: t}


def _random_layers(sizes, activations, with_bias):
    torch.manual_seed(sum(sizes))
    layers = []
    for (n, m), act in zip(itertools.pairwise(sizes), activations):
        bias = torch.randn(m) if with_bias else None
        layers.append(kernels.MLPLayer(torch.randn(m, n) / n**0.5, bias, act))
    return layers


def _reference(layers, x, normalizer=None, members=None, table=None, offsets=None, ca=None, ce=None, rank=1):
    """The MLP in float64 with each member's weights W + ca A^T B and biases b + ce e materialised."""
    h = x.double()
    if normalizer is not None:
        mean, std, clip = normalizer
        h = ((h - mean.double()) / std.double()).clamp(-clip, clip)
    rows = h.shape[0]
    member = torch.arange(rows) // (rows // members) if members else None
    for layer in layers:
        m, n = layer.weight.shape
        w = layer.weight.double().expand(rows, m, n).clone()
        b = (layer.bias.double() if layer.bias is not None else torch.zeros(m)).expand(rows, m).clone()
        pa, pb, pe = layer.where
        if members:
            for row in range(rows):
                i = member[row].item()
                o = offsets[i].item()
                t = table.double()
                if pa >= 0:
                    a = t[o + pa : o + pa + rank * m].view(rank, m)
                    bf = t[o + pb : o + pb + rank * n].view(rank, n)
                    w[row] += ca[i].double() * a.T @ bf
                if pe >= 0:
                    b[row] += ce[i].double() * t[o + pe : o + pe + m]
        h = _ACT[layer.activation](torch.einsum("rmn,rn->rm", w, h) + b)
    return h


@pytest.mark.parametrize(
    "sizes, activations",
    [
        ((4, 64, 64, 2), ("tanh", "tanh", "identity")),
        ((3, 37, 5), ("relu", "identity")),
        ((70, 2), ("identity",)),
        ((8, 130, 20, 3), ("tanh", "relu", "tanh")),
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_mlp_center_matches_the_formula(build, sizes, activations, with_bias) -> None:
    """Without noise every row is the plain MLP, normaliser (with clipping) included, any input strides."""
    layers = _random_layers(sizes, activations, with_bias)
    normalizer = (torch.randn(sizes[0]), torch.rand(sizes[0]) + 0.2, 1.5)
    kernel = kernels.MLPKernel(layers, normalizer)
    x = torch.randn(37, sizes[0]) * 3  # 37 rows: two full tiles of 16 and a tail
    expected = _reference(layers, x, normalizer).float()
    torch.testing.assert_close(kernel(x), expected, rtol=1e-5, atol=1e-5)
    column_major = x.T.contiguous().T  # what CartPoleVectorEnv returns
    torch.testing.assert_close(kernel(column_major), expected, rtol=1e-5, atol=1e-5)
    actions = torch.empty(37, dtype=torch.int64)
    kernel(x, actions=actions, action_start=3)
    assert torch.equal(actions, _reference(layers, x, normalizer).argmax(-1) + 3)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("k", [1, 3])
def test_mlp_members_match_materialised_weights(build, rank, k) -> None:
    """Row block i runs W + ca_i A_i^T B_i, b + ce_i e_i read from member i's table window."""
    sizes = (5, 40, 24, 3)
    layers = _random_layers(sizes, ("tanh", "relu", "identity"), True)
    # Window layout: layer 0 perturbed fully, layer 1 weight only, layer 2 bias only.
    where, pos = [], 0
    for j, layer in enumerate(layers):
        m, n = layer.weight.shape
        pa, pb = (pos, pos + rank * m) if j < 2 else (-1, -1)
        pos += rank * (m + n) if j < 2 else 0
        pe = pos if j != 1 else -1
        pos += m if j != 1 else 0
        where.append((pa, pb, pe))
    layers = [kernels.MLPLayer(la.weight, la.bias, la.activation, w) for la, w in zip(layers, where)]
    members = 21
    table = torch.randn(20_000).half()
    offsets = torch.randint(0, 20_000 - pos, (members,))
    ca, ce = 0.3 * torch.randn(members), 0.3 * torch.randn(members)  # sign sigma / sqrt(r), sign sigma
    noise = kernels.MemberNoise(table, offsets, ca, ce, rank, pos)
    normalizer = (torch.randn(5), torch.rand(5) + 0.5, 5.0)
    kernel = kernels.MLPKernel(layers, normalizer, noise)
    x = torch.randn(members * k, 5)
    expected = _reference(layers, x, normalizer, members, table, offsets, ca, ce, rank)
    torch.testing.assert_close(kernel(x), expected.float(), rtol=1e-5, atol=1e-5)


def test_mlp_reads_the_normaliser_at_every_call() -> None:
    """A normaliser refreshed in place (a new generation's statistics) applies without a rebuild."""
    if not kernels.available():
        pytest.skip("no compiled kernel here")
    layers = _random_layers((3, 8, 2), ("tanh", "identity"), True)
    mean, std = torch.zeros(3), torch.ones(3)
    kernel = kernels.MLPKernel(layers, (mean, std, 5.0))
    x = torch.randn(4, 3)
    mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    std.copy_(torch.tensor([2.0, 0.5, 1.0]))
    torch.testing.assert_close(
        kernel(x), _reference(layers, x, (mean, std, 5.0)).float(), rtol=1e-5, atol=1e-5
    )


def test_mlp_refuses_what_it_cannot_compute() -> None:
    """Bad layers, inputs and outputs are refused with a message before any pointer reaches C."""
    if not kernels.available():
        pytest.skip("no compiled kernel here")
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="activation 'elu'"):
        kernels.MLPKernel([kernels.MLPLayer(w, None, "elu")])
    with pytest.raises(ValueError, match="does not follow"):
        kernels.MLPKernel([kernels.MLPLayer(w, None, "tanh"), kernels.MLPLayer(w, None, "identity")])
    with pytest.raises(ValueError, match="wider than"):
        kernels.MLPKernel([kernels.MLPLayer(torch.randn(kernels.MAX_WIDTH + 1, 3), None, "identity")])
    with pytest.raises(ValueError, match="normaliser"):
        kernels.MLPKernel(
            [kernels.MLPLayer(w, None, "identity")], (torch.zeros(3).double(), torch.ones(3), 5.0)
        )
    noise = kernels.MemberNoise(
        torch.zeros(100).half(), torch.zeros(2, dtype=torch.int64), *torch.ones(2, 2), 1, 7
    )
    kernel = kernels.MLPKernel([kernels.MLPLayer(w, None, "identity", (0, 4, -1))], noise=noise)
    with pytest.raises(TypeError, match="float32"):
        kernel(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple of 2"):
        kernel(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="out must be"):
        kernel(torch.zeros(2, 3), out=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="actions must be"):
        kernel(torch.zeros(2, 3), actions=torch.zeros(2, dtype=torch.int32))


def _noise(**change):
    """Valid MemberNoise for one (4, 3) layer at rank 1 (A 4, B 3, e 4: window 11), changed."""
    args = dict(
        table=torch.zeros(100, dtype=torch.float16),
        offsets=torch.tensor([0, 89]),
        coef_a=torch.ones(2),
        coef_e=torch.ones(2),
        rank=1,
        window=11,
    )
    args.update(change)
    return kernels.MemberNoise(**args)


_WHERE = (0, 4, 7)
_BAD_MLP = {
    "actions stride 0 (an out-of-bounds write)": (
        {},
        {"actions": torch.zeros(1, dtype=torch.int64).expand(2)},
        "actions must be",
    ),
    "actions strided": ({}, {"actions": torch.zeros(4, dtype=torch.int64)[::2]}, "actions must be"),
    "actions on meta": ({}, {"actions": torch.zeros(2, dtype=torch.int64, device="meta")}, "actions must be"),
    "out stride 0": ({}, {"out": torch.zeros(1, 4).expand(2, 4)}, "out must be"),
    "out float64": ({}, {"out": torch.zeros(2, 4).double()}, "out must be"),
    "out transposed": ({}, {"out": torch.zeros(4, 2).T}, "out must be"),
    "action_start float": (
        {},
        {"actions": torch.zeros(2, dtype=torch.int64), "action_start": 1.5},
        "action_start",
    ),
    "short coef_a": ({"noise": _noise(coef_a=torch.ones(1))}, None, "coef_a must be"),
    "coef_e float64": ({"noise": _noise(coef_e=torch.ones(2).double())}, None, "coef_e must be"),
    "no members": ({"noise": _noise(offsets=torch.zeros(0, dtype=torch.int64))}, None, "at least one member"),
    "window past the table": ({"noise": _noise(offsets=torch.tensor([0, 90]))}, None, "offsets must lie"),
    "offsets int32": (
        {"noise": _noise(offsets=torch.tensor([0, 1], dtype=torch.int32))},
        None,
        "offsets must be",
    ),
    "table float32": ({"noise": _noise(table=torch.zeros(100))}, None, "table must be"),
    "rank 0": ({"noise": _noise(rank=0)}, None, "rank must be"),
    "layer noise past the window": ({"noise": _noise(window=10)}, None, "the window holds 10"),
    "pos_a without pos_b": ({"where": (0, -1, 7)}, None, "both"),
    "bias too short": ({"bias": torch.zeros(3)}, None, "bias must be"),
    "weight 1-D": ({"weight": torch.zeros(12)}, None, "weight must be"),
    "weight on meta": ({"weight": torch.zeros(4, 3, device="meta")}, None, "weight must be"),
    "clip NaN": ({"normalizer": (torch.zeros(3), torch.ones(3), float("nan"))}, None, "clip"),
    "clip negative": ({"normalizer": (torch.zeros(3), torch.ones(3), -1.0)}, None, "clip"),
}


@pytest.mark.parametrize("case", list(_BAD_MLP))
def test_mlp_kernel_refuses_what_it_cannot_read(case) -> None:
    """Every layer, noise, normaliser and output argument is checked before C sees it: one line."""
    if not kernels.available():
        pytest.skip("no compiled kernel here")
    build, call, message = _BAD_MLP[case]
    layer = dict(weight=torch.zeros(4, 3), bias=torch.zeros(4), activation="tanh", where=_WHERE)
    layer.update({k: v for k, v in build.items() if k in layer})
    noise = build.get("noise", _noise())
    with pytest.raises(ValueError, match=message) as info:
        kernel = kernels.MLPKernel([kernels.MLPLayer(**layer)], build.get("normalizer"), noise)
        kernel(torch.zeros(2, 3), **call)
    assert "\n" not in str(info.value)
    if call is not None:  # the same kernel runs with valid outputs
        kernel(torch.zeros(2, 3), out=torch.zeros(2, 4), actions=torch.zeros(2, dtype=torch.int64))


def test_mlp_kernel_keeps_its_own_member_offsets() -> None:
    """Offsets changed after the check cannot move a window out of the table: the kernel copied them."""
    if not kernels.available():
        pytest.skip("no compiled kernel here")
    torch.manual_seed(0)
    table = torch.randn(100).half()
    offsets = torch.tensor([0, 89])
    noise = _noise(table=table, offsets=offsets, coef_a=torch.rand(2), coef_e=torch.rand(2))
    layer = kernels.MLPLayer(torch.randn(4, 3), torch.randn(4), "identity", _WHERE)
    kernel = kernels.MLPKernel([layer], None, noise)
    x = torch.randn(2, 3)
    before = kernel(x)
    offsets.fill_(10**12)
    torch.testing.assert_close(kernel(x), before, rtol=0, atol=0)


_NAN, _INF = float("nan"), float("inf")
_ARGMAX_ROWS = [
    [1.0, 3.0, 3.0, 2.0],  # tie: the first maximum
    [_NAN, 1.0, 2.0, 3.0],  # NaN first
    [1.0, 2.0, _NAN, 3.0],  # NaN in the middle beats a larger number after it
    [1.0, 2.0, 3.0, _NAN],  # NaN last
    [_NAN, 5.0, _NAN, 1.0],  # the first NaN of two
    [1.0, _NAN, 9.0, _NAN],
    [_NAN, _NAN, _NAN, _NAN],
    [-_INF, -_INF, -_INF, -_INF],
    [_INF, 1.0, _INF, _NAN],
    [-0.0, 0.0, -0.0, 0.0],  # -0 == 0: a tie
    [-5.0, -_INF, -4.0, -4.0],
    [7.0, 7.0, 7.0, 7.0],
]


@pytest.mark.parametrize("width", [4, 21])
def test_mlp_argmax_is_torch_argmax_with_nan_and_ties(build, width) -> None:
    """The fused argmax picks what torch.argmax picks: the first NaN, else the first maximum."""
    # Each row is one member whose output is exactly its bias noise e_i (zero weights and inputs),
    # so the table sets the outputs, NaN and ties included (a NaN input would reach every output).
    rows = []
    for j, row in enumerate(_ARGMAX_ROWS):
        full = [-1e4] * width  # the pattern at a different place in every row, inside wider rows
        start = j % (width - 3)
        full[start : start + 4] = row
        rows.append(full)
    values = torch.tensor(rows)
    members = len(rows)
    table = values.reshape(-1).half()
    assert torch.equal(table.float().isnan(), values.reshape(-1).isnan())
    noise = kernels.MemberNoise(
        table, torch.arange(members) * width, torch.zeros(members), torch.ones(members), 1, width
    )
    layer = kernels.MLPLayer(torch.zeros(width, 3), None, "identity", (-1, -1, 0))
    kernel = kernels.MLPKernel([layer], None, noise)
    out = torch.empty(members, width)
    actions = torch.empty(members, dtype=torch.int64)
    kernel(torch.zeros(members, 3), out=out, actions=actions, action_start=2)
    torch.testing.assert_close(out, table.float().view(members, width), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(actions, out.argmax(-1) + 2)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_mlp_propagates_nan_like_pytorch(activation) -> None:
    """A NaN observation gives NaN outputs (as in PyTorch), not a silently clipped number."""
    if not kernels.available():
        pytest.skip("no compiled kernel here")
    layers = _random_layers((3, 20, 2), (activation, "identity"), True)
    kernel = kernels.MLPKernel(layers, (torch.zeros(3), torch.ones(3), 5.0))
    x = torch.randn(4, 3)
    x[2, 1] = float("nan")
    out = kernel(x)
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()


# -- the cached library: validated before loading, rebuilt when damaged -----------------------------

_CHILD = """
import os, sys, warnings, torch
from eggroll_rl import kernels
torch.manual_seed(0)
x, table = torch.randn(3, 5), torch.randn(64).half()
offsets, ca, ce, bias = torch.tensor([0, 7, 30]), torch.randn(3), torch.randn(3), torch.randn(4)
t = table.double()
for cache in sys.argv[1:]:  # one cache folder per case, so no library is loaded twice by name
    os.environ["EGGROLL_RL_CACHE"] = cache
    kernels._library.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.available(), "the kernel is not available"
    out = torch.empty(3, 4)
    kernels.lowrank_rows(x, table, offsets, ca, ce, bias, out, 2, 0, 8, 18)
    for i, o in enumerate(offsets.tolist()):
        a, b, e = t[o : o + 8].view(2, 4), t[o + 8 : o + 18].view(2, 5), t[o + 18 : o + 22]
        expected = bias.double() + ca[i].double() * (b @ x[i].double()) @ a + ce[i].double() * e
        torch.testing.assert_close(out[i], expected.float(), rtol=1e-5, atol=1e-5)
    rebuilt = any("rebuilding it" in str(w.message) for w in caught)
    print(os.path.basename(cache), "rows ok", "rebuilt" if rebuilt else "loaded", flush=True)
"""


def _child(*caches) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, caches)], capture_output=True, text=True, timeout=900
    )


def _truncate(lib):
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])


def _empty(lib):
    lib.write_bytes(b"")


def _garbage(lib):
    lib.write_bytes(bytes(range(256)) * (lib.stat().st_size // 256))


def _no_checksum(lib):
    kernels._checksum_path(lib).unlink()


def _flipped_byte(lib):  # same size, one byte changed: only the checksum can tell
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))


def _intact(lib):
    pass


_DAMAGE = [_truncate, _empty, _garbage, _no_checksum, _flipped_byte, _intact]


@needs_compiler
@pytest.mark.slow
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path) -> None:
    """Truncated (SIGBUS on load), empty, garbage, unverifiable -> rebuilt with a warning, correct.

    Child processes: a crash on loading is theirs, not pytest's. The first builds a cache as a
    user's first run does; copies of it are damaged one way each, and a second child loads them all.
    """
    built = tmp_path / "built"
    first = _child(built)
    assert first.returncode == 0 and "built rows ok" in first.stdout, first.stderr[-2000:]
    caches = []
    for damage in _DAMAGE:
        cache = tmp_path / damage.__name__.strip("_")
        shutil.copytree(built, cache)
        damage(next(cache.glob("*.so")))
        caches.append(cache)
    proc = _child(*caches)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout} {proc.stderr[-2000:]}"
    for cache in caches:
        expected = "loaded" if cache.name == "intact" else "rebuilt"
        assert f"{cache.name} rows ok {expected}" in proc.stdout, proc.stdout
        (lib,) = cache.glob("*.so")
        assert kernels._cache_problem(lib) is None  # the new build and its checksum match
    assert (tmp_path / "intact" / lib.name).read_bytes() == next(built.glob("*.so")).read_bytes()


def test_cache_key_tells_cpus_apart_without_cpuinfo_model_lines(tmp_path, monkeypatch) -> None:
    """On CPUs whose /proc/cpuinfo has no model name/flags (aarch64) the key still differs by CPU.

    A stand-in compiler resolves -march=native to the CPU named by $FAKE_CPU, as gcc and clang do.
    """
    fake = tmp_path / "fakecc"
    fake.write_text('#!/bin/sh\necho "cc1 -E - -march=$FAKE_CPU -mcpu=$FAKE_CPU" >&2\n')
    fake.chmod(0o755)
    arm_cpuinfo = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU architecture: 8\n\n"
    monkeypatch.setattr(kernels, "open", lambda *a, **k: io.StringIO(arm_cpuinfo), raising=False)
    signatures = {}
    for cpu in ["neoverse-n1", "neoverse-v2", "neoverse-n1"]:
        monkeypatch.setenv("FAKE_CPU", cpu)
        signatures.setdefault(cpu, set()).add(kernels._cpu_signature(str(fake)))
    assert len(signatures["neoverse-n1"]) == 1  # stable for one CPU
    assert signatures["neoverse-n1"] != signatures["neoverse-v2"]
