"""Building and loading the compiled CPU kernel, and falling back when it cannot be had."""

from __future__ import annotations

import itertools
import shutil

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
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("n, m", [(3, 4), (37, 21), (64, 256), (256, 8)])
@pytest.mark.parametrize("with_bias, with_e", [(True, True), (True, False), (False, True), (False, False)])
def test_builds_into_cache_and_computes_the_rows(fresh, rank, n, m, with_bias, with_e) -> None:
    """A fresh cache gets one library; its rows equal the formula for vector bodies and tails."""
    assert kernels.available()
    assert [p.suffix for p in fresh.iterdir()] == [".so"]  # no temp files left behind
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


def test_refuses_inputs_it_cannot_read(fresh) -> None:
    """Wrong dtypes never reach the C code."""
    if not kernels.available():
        pytest.skip("no compiled kernel here")
    x, out = torch.zeros(2, 3), torch.zeros(2, 4)
    offsets, coef = torch.zeros(2, dtype=torch.int64), torch.ones(2)
    with pytest.raises(ValueError, match="dtypes and shapes"):
        kernels.lowrank_rows(x, torch.zeros(100), offsets, coef, coef, None, out, 1, 0, 4, -1)
    with pytest.raises(ValueError, match="dtypes and shapes"):
        kernels.lowrank_rows(x.double(), torch.zeros(100).half(), offsets, coef, coef, None, out, 1, 0, 4, -1)


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
    assert list(fresh.iterdir()) == []


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


def test_tanh_is_accurate_to_a_few_ulp(build) -> None:
    """The fused forward's tanh is within 2.5e-7 of float64 tanh, odd, saturating, NaN-preserving."""
    x = torch.cat([torch.linspace(-12, 12, 240_001), torch.logspace(-30, 1, 3001), torch.tensor([0.55])])
    x = torch.cat([x, -x])
    y = kernels.tanh(x).double()
    exact = torch.tanh(x.double())
    assert (y - exact).abs().max().item() < 2.5e-7
    nonzero = exact != 0
    assert ((y - exact).abs() / exact.abs())[nonzero].max().item() < 2.5e-7
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
