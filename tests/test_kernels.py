"""Building and loading the compiled CPU kernel, and falling back when it cannot be had."""

from __future__ import annotations

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
def test_half_conversion_covers_every_finite_float16(fresh) -> None:
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
