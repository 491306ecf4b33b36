"""Counter-based noise: the definition, bit-exactness everywhere, independence and normality at scale."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_kernels import _cpu_flags

from eggroll_rl import EGGROLLTrainer, VanillaESTrainer, kernels, noise
from eggroll_rl.distributed import DistributedError, World, disagreement
from eggroll_rl.launch import launch
from eggroll_rl.noise import SCHEME, NoiseGenerator, NoiseLayout, knot_table, philox4x32, reference_noise

import toy

ROOT = Path(__file__).resolve().parent.parent
M32 = 0xFFFFFFFF


def bits_of(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


def digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().cpu().view(torch.int16).numpy().astype("<i2").tobytes()).hexdigest()


# -- the definition -----------------------------------------------------------------------------------
def test_philox_matches_random123_known_answers():
    """Philox4x32-10 (Random123's kat_vectors), on Python ints and on int64 tensors."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        assert philox4x32(counter, key) == expected
        words = philox4x32(tuple(torch.tensor([c, c]) for c in counter), key)
        assert [w.tolist() for w in words] == [[e, e] for e in expected]


def test_knot_table_is_the_inverse_normal_cdf_and_pinned():
    knots = knot_table()
    assert knots.shape == (8193,) and knots.dtype == np.int32 and knots[-1] == 0
    assert (np.diff(knots.astype(np.int64)) < 0).all()  # |z| falls as p rises to 1/2
    nd = statistics.NormalDist()
    for q in [*range(0, 8192, 37), 0, 255, 256, 8191]:
        e, j = divmod(q, 256)
        p = math.ldexp(1 + j / 256, e - 33)
        assert abs(knots[q] / 2**24 + nd.inv_cdf(p)) < 2**-24  # rounded to the nearest 2^-24
    assert hashlib.sha256(knots.astype("<i4").tobytes()).hexdigest()[:16] == "5658672c467c6200"


def test_numbers_follow_the_documented_definition():
    """Number 32g + 8l + i of (seed, generation, draw, block) is word l of Philox at (8g + i, draw,
    generation, block), mapped through the inverse normal CDF (checked against statistics.NormalDist)."""
    seed, generation, block, draw = 0xDEADBEEF12345678, 7, 3, 11
    got = reference_noise(seed, generation, block, 0, 96, draw, 1)[0].double()
    nd = statistics.NormalDist()
    for k in range(96):
        g, rem = divmod(k, 32)
        word = philox4x32((8 * g + rem % 8, draw, generation, block), (seed & M32, seed >> 32))[rem // 8]
        p = (2 * (word & 0x7FFFFFFF) + 1) / 2**33
        z = -nd.inv_cdf(p) * (-1 if word >> 31 else 1)
        assert abs(float(got[k]) - z) <= abs(z) * 2**-11 + 1e-6, k  # float16 rounding


def test_fixed_point_to_float16_rounds_to_nearest_even():
    """The integer rounding of v 2^-24 to float16 equals numpy's correctly rounded conversion."""
    gen = torch.Generator().manual_seed(0)
    v = torch.cat(
        [
            torch.arange(0, 4096),
            torch.randint(10, 1 << 27, (200_000,), generator=gen),
            # ties (halfway between two float16 numbers) and their neighbours in every binade
            torch.tensor(
                [
                    (m << s) + (1 << (s - 1)) + d
                    for s in range(1, 17)
                    for m in (1024, 1025, 2047)
                    for d in (-1, 0, 1)
                ]
            ),
        ]
    )
    ours = noise._fixed_to_half_bits(v)
    exact = torch.from_numpy(
        (v.double().numpy() * 2.0**-24).astype(np.float16).view(np.uint16).astype(np.int64)
    )
    assert torch.equal(ours, exact)


def test_pinned_hash_of_a_fixed_seed_draw():
    """The numbers themselves are pinned: any change to the scheme must change SCHEME too."""
    x = reference_noise(12345, 3, 1, 5, 4101, 2, 8)
    assert SCHEME == "philox4x32-10/icdf-8193/fp16"
    assert digest(x)[:16] == "9d58c87c7861f106"


# -- the compiled fill equals the reference, bit for bit -------------------------------------------------
_VARIANTS = {"native": kernels._NATIVE, "avx2": (("-mavx2", "-mfma", "-mf16c"),), "portable": ((),)}


@pytest.fixture(params=list(_VARIANTS))
def build(request, monkeypatch):
    """Load one instruction-set build of the kernels as the process's library (AVX2 and portable C)."""
    if request.param == "avx2" and not {"avx2", "fma", "f16c"} <= _cpu_flags():
        pytest.skip("this CPU cannot run an AVX2 build")
    lib = kernels._library(_VARIANTS[request.param])  # cached by source, compiler, CPU and flags
    if lib is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(kernels, "_library", lambda variants=kernels._NATIVE: lib)
    return request.param


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_fill_equals_reference(build, threads):
    torch.set_num_threads(threads)
    try:
        layout = NoiseLayout.from_sizes({"a": 70_000, "b": 37, "c": 5})
        gen = NoiseGenerator(2**64 - 3, layout)
        cases = [  # (generation, block, start, stop, draw0, draws): edges of batches and groups
            (0, 0, 0, 70_000, 0, 3),
            (2**32 - 1, 0, 3, 1001, 2**32 - 5, 5),
            (7, 0, 31, 33, 9, 2),
            (5, 1, 0, 37, 100, 4),
            (5, 2, 1, 5, 0, 40),
            (1, 0, 65_535, 70_000, 65_530, 3),
        ]
        for case in cases:
            compiled = gen.block(*case)
            assert torch.equal(bits_of(compiled), bits_of(reference_noise(gen.seed, *case))), case
        half, full = gen.sample(4, 6)
        assert torch.equal(full, half.float())
        parts = [reference_noise(gen.seed, 4, b, 0, size, 0, 6) for b, size in enumerate(layout.sizes)]
        assert torch.equal(bits_of(half), bits_of(torch.cat(parts, dim=1)))
    finally:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def test_pytorch_path_is_used_without_the_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_library", lambda variants=kernels._NATIVE: None)
    gen = NoiseGenerator(9, NoiseLayout.from_sizes({"w": 100, "b": 3}))
    half, full = gen.sample(2, 5)
    assert torch.equal(full, half.float())
    assert torch.equal(bits_of(half[:, :100]), bits_of(reference_noise(9, 2, 0, 0, 100, 0, 5)))


_CAPABILITY_SCRIPT = """
import hashlib, torch
from eggroll_rl.noise import NoiseGenerator, NoiseLayout, reference_noise
def h(x):
    return hashlib.sha256(x.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()).hexdigest()[:16]
out = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    ref = reference_noise(12345, 3, 1, 5, 4101, 2, 8)
    half, full = NoiseGenerator(77, NoiseLayout.from_sizes({"a": 5000, "b": 300})).sample(5, 64)
    assert torch.equal(full, half.float())
    out += [h(ref), h(half)]
print(" ".join(out))
"""


def test_same_bits_under_every_cpu_capability_and_thread_count():
    """ATen's default and AVX2 code paths (torch.randn's bits differ between them), with 1 and 2
    threads, give the same bits, for the reference and for the compiled fill."""
    lines = set()
    for capability in ("default", "avx2"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ATEN_CPU_CAPABILITY": capability}
        done = subprocess.run(
            [sys.executable, "-c", _CAPABILITY_SCRIPT], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        lines.add(done.stdout.strip())
    here = NoiseGenerator(77, NoiseLayout.from_sizes({"a": 5000, "b": 300})).sample(5, 64)[0]
    expected = " ".join([digest(reference_noise(12345, 3, 1, 5, 4101, 2, 8))[:16], digest(here)[:16]] * 2)
    assert lines == {expected}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_draws_the_same_bits():
    layout = NoiseLayout.from_sizes({"a": 5000, "b": 300})
    cpu = NoiseGenerator(77, layout).sample(5, 64)[0]
    cuda = NoiseGenerator(77, layout, "cuda").sample(5, 64)[0]
    assert torch.equal(bits_of(cuda.cpu()), bits_of(cpu))


# -- any width, chunked -----------------------------------------------------------------------------------
def test_chunked_equals_unchunked(monkeypatch):
    gen = NoiseGenerator(5, NoiseLayout.from_sizes({"w": 10_000_037}))
    whole = gen.block(3, 0, 9_990_000, 10_000_037, 65_535, 2)
    cuts = [9_990_000, 9_990_001, 9_990_031, 9_995_000, 9_995_777, 10_000_037]
    pieces = torch.cat([gen.block(3, 0, a, b, 65_535, 2) for a, b in itertools.pairwise(cuts)], dim=1)
    assert torch.equal(bits_of(whole), bits_of(pieces))
    rows = torch.cat([gen.block(3, 0, 9_990_000, 10_000_037, 65_535 + d, 1) for d in range(2)])
    assert torch.equal(bits_of(whole), bits_of(rows))
    ref = reference_noise(5, 3, 0, 9_990_000, 10_000_037, 65_535, 2)
    monkeypatch.setattr(noise, "_CHUNK", 4096)  # the reference's own pieces
    assert torch.equal(bits_of(ref), bits_of(reference_noise(5, 3, 0, 9_990_000, 10_000_037, 65_535, 2)))
    assert torch.equal(bits_of(whole), bits_of(ref))


# -- independence at scale ---------------------------------------------------------------------------------
def _prefix_keys(x: torch.Tensor) -> torch.Tensor:
    """One int64 key per row from its first 8 float16 numbers (two int64 words, mixed)."""
    words = x[:, :8].contiguous().view(torch.int64)
    return words[:, 0] * -7046029254386353131 + words[:, 1]  # wraps; odd multiplier: 1-to-1 in words[:, 0]


def test_no_duplicate_members_at_65536():
    """The old table had ~7,550 duplicate members at N = 65,536, width 392."""
    gen = NoiseGenerator(0, NoiseLayout.from_sizes({"w": 392}))
    rows = gen.block(0, 0, 0, 392, 0, 65_536)
    assert torch.unique(_prefix_keys(rows)).numel() == 65_536


def test_no_repeated_blocks_across_layers_and_generations():
    """No (draw, layer, generation) starts like another (the old table: 277,470 shared layer starts)."""
    gen = NoiseGenerator(1, NoiseLayout.from_sizes({f"l{i}": 64 for i in range(4)}))
    keys = [_prefix_keys(gen.block(t, b, 0, 8, 0, 65_536)) for t in range(3) for b in range(4)]
    assert torch.unique(torch.cat(keys)).numel() == 12 * 65_536


def _row_correlations(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.double() - x.double().mean(1, keepdim=True)
    y = y.double() - y.double().mean(1, keepdim=True)
    return (x @ y.T) / (x.norm(dim=1, keepdim=True) * y.norm(dim=1, keepdim=True).T)


def _assert_uncorrelated(r: torch.Tensor, width: int) -> None:
    """Correlations of independent rows: mean r^2 ~ 1/width, none beyond ~6 standard errors."""
    assert abs(float((r**2).mean()) * width - 1) < 0.05
    assert float(r.abs().max()) < 6.5 / math.sqrt(width)
    assert abs(float(r.mean())) < 5 / math.sqrt(width * r.numel())


def test_members_layers_and_generations_are_uncorrelated():
    width = 4096
    gen = NoiseGenerator(2, NoiseLayout.from_sizes({"a": width, "b": width}))
    a0, b0 = gen.block(0, 0, 0, width, 0, 512), gen.block(0, 1, 0, width, 0, 512)
    a1 = gen.block(1, 0, 0, width, 0, 512)
    members = _row_correlations(a0, a0)
    _assert_uncorrelated(members[~torch.eye(512, dtype=torch.bool)], width)
    _assert_uncorrelated(_row_correlations(a0, b0).flatten(), width)  # layer vs layer, any members
    _assert_uncorrelated(_row_correlations(a0, a1).flatten(), width)  # generation vs generation
    # within a row: neighbours, and numbers from the same counter (lag 8) or the next group (32)
    flat = a0.double()
    for lag in (1, 8, 16, 32):
        r = (flat[:, :-lag] * flat[:, lag:]).mean() / flat.var()
        assert abs(float(r)) < 5 / math.sqrt(flat[:, lag:].numel())


def test_moments_and_tails_match_the_standard_normal():
    gen = NoiseGenerator(3, NoiseLayout.from_sizes({"w": 1 << 14}))
    x = gen.block(0, 0, 0, 1 << 14, 0, 256).double().flatten()  # 4.2 M numbers
    n = x.numel()
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert abs(float(x.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((x**3).mean())) < 5 * math.sqrt(15 / n)
    assert abs(float((x**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    # The numbers are float16 values: a float16 value h stands for Z in [h-, h+), the midpoints to
    # its neighbours, so probabilities are taken at those midpoints.
    nd = statistics.NormalDist()

    def below(h: float) -> float:  # P(number < h) for a float16 value h > 0
        lower = float(np.nextafter(np.float16(h), np.float16(0)))
        return nd.cdf((lower + h) / 2)

    for c in (0.5, 1.0, 2.0, 3.0, 4.0, 4.5):
        upper = float(np.nextafter(np.float16(c), np.float16(10)))
        p = 2 * nd.cdf(-(c + upper) / 2)
        got = float((x.abs() > c).double().mean())
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / n) + 2 / n, c
    # 100 near-equiprobable bins between float16 edges: chi-square, 99 degrees of freedom (sd 14)
    edges = np.float16([nd.inv_cdf(i / 100) for i in range(50, 100)])
    edges = edges[edges > 0]
    probs = np.diff([0.5, *[below(float(h)) for h in edges], 1.0])
    counts = torch.bincount(torch.bucketize(x.abs(), torch.from_numpy(edges.astype(np.float64)), right=True))
    expected = n * torch.from_numpy(2 * probs)
    chi2 = float(((counts.double() - expected) ** 2 / expected).sum())
    dof = len(probs) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof)
    # and the sign is a fair coin, independent of the magnitude
    assert abs(float((x > 0).double().mean()) - 0.5) < 5 * math.sqrt(0.25 / n)


# -- the trainers use it ---------------------------------------------------------------------------------
def test_trainer_rows_are_generator_rows_and_the_kernel_reads_them():
    trainer = toy.make_trainer(population_size=8, rank=2, noise_reuse=2)
    trainer.generation = 4
    p = trainer.sample_perturbations(8)
    half, full = trainer.noise.sample(4, 4)
    assert torch.equal(p.noise, full) and torch.equal(full, half.float())
    table, offsets = p.source
    assert (
        table.dtype == torch.float16 and table.is_contiguous() and table.numel() == 4 * trainer.layout.width
    )
    assert offsets.tolist() == [j * trainer.layout.width for j in range(4)]
    assert torch.equal(bits_of(table.view(4, -1)), bits_of(half))
    for name, offset, size in zip(trainer.layout.names, trainer.layout.offsets, trainer.layout.sizes):
        b = trainer.layout.names.index(name)
        ref = reference_noise(trainer.seed, 4, b, 0, size, 0, 4)
        assert torch.equal(bits_of(half[:, offset : offset + size]), bits_of(ref)), name


def test_vanilla_blocks_are_the_parameters():
    trainer = toy.make_trainer("vanilla", population_size=6)
    p = trainer.sample_perturbations(6)
    specs = trainer._params.specs
    for b, s in enumerate(specs):
        ref = reference_noise(trainer.seed, 0, b, 0, s.numel, 0, 6).float()
        assert torch.equal(p.noise[:, s.slice], ref)


def test_checkpoint_from_the_old_noise_is_refused():
    state = toy.make_trainer().state_dict()
    assert state["config"]["noise"] == SCHEME
    del state["config"]["noise"]  # what a checkpoint from the table noise holds
    with pytest.raises(ValueError, match=r"noise .*table.* cannot resume"):
        toy.make_trainer().load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"seed": 2**64}, r"seed must be an integer in \[0, 18446744073709551616\)")],
)
def test_bad_noise_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy.make_trainer(**kwargs)
    gen = NoiseGenerator(0, NoiseLayout.from_sizes({"w": 10}))
    with pytest.raises(ValueError, match="generation must be an integer in"):
        gen.sample(2**32, 1)
    with pytest.raises(ValueError, match="not inside block 0"):
        gen.block(0, 0, 5, 11)


# -- every rank draws the same noise -----------------------------------------------------------------------
def test_disagreement_names_the_ranks():
    assert disagreement("noise", ["a", "a", "a"]) is None
    message = disagreement("noise and configuration", ["a", "b", "a", "c"])
    assert "rank(s) 1, 3 differ from rank 0" in message and "noise and configuration" in message


def build_on_ranks(cases: list[str]) -> list[str]:
    """In a 2-process world, build a trainer per case where rank 1 differs as the case says."""
    rank, results = World.current().rank, []
    fill = NoiseGenerator._fill
    for case in cases:
        if case == "one-bit" and rank == 1:  # rank 1's CPU rounds one number differently

            def flipped(self, half, *args):
                used = fill(self, half, *args)
                half.view(-1)[:1].view(torch.int16).bitwise_xor_(1)
                return used

            NoiseGenerator._fill = flipped
        try:
            trainer = EGGROLLTrainer(toy.mlp(), toy.batched_regression, 8, seed=3 + rank * (case == "seed"))
            results.append(trainer.noise.fingerprint())
        except DistributedError as exc:
            results.append(f"error: {exc}")
        finally:
            NoiseGenerator._fill = fill
    return results


def test_ranks_that_draw_different_noise_stop_at_start_up():
    same, seed, one_bit = launch(build_on_ranks, 2, ["same", "seed", "one-bit"], timeout=60)
    assert same == EGGROLLTrainer(toy.mlp(), toy.batched_regression, 8, seed=3).noise.fingerprint()
    for result in (seed, one_bit):
        assert result.startswith("error: ranks disagree on the noise and configuration: rank(s) 1 differ")


def test_vanilla_and_eggroll_fingerprints_differ_by_layout():
    a = VanillaESTrainer(toy.mlp(), toy.regression_fitness, 4).noise.fingerprint()
    b = EGGROLLTrainer(toy.mlp(), toy.regression_fitness, 4).noise.fingerprint()
    assert a != b
