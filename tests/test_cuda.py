"""The population forward, update, noise and rollout on CUDA equal their CPU results (issue 14).

Every test takes the device as a parameter: the ``cpu`` half runs everywhere and checks the test
itself (a CPU run against an independent CPU reference), the ``cuda`` half runs only where CUDA
is present. References: each member's weights rebuilt explicitly (``center + perturbations[i]``)
and run as a plain model in float64; the compiled CPU noise fill; a CPU trainer's update.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from eggroll_rl import EGGROLLTrainer, RolloutFitness, batched_fitness, kernels, make_policy
from eggroll_rl.noise import NoiseGenerator, NoiseLayout, reference_noise
from eggroll_rl.rollout import _DeviceStaging

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """Run the PyTorch-ops population path on CPU too (the path CUDA runs)."""
    monkeypatch.setattr(kernels, "available", lambda: False)


@batched_fitness
def _unused(population):
    return torch.zeros(len(population))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _trainer(model: nn.Module, device: str, rank: int = 2, fitness=_unused, **kw) -> EGGROLLTrainer:
    return EGGROLLTrainer(
        model.to(device), fitness, population_size=16, rank=rank, sigma=0.2, seed=3, device=device, **kw
    )


def _reference(
    model: nn.Module, trainer: EGGROLLTrainer, x: torch.Tensor, members: torch.Tensor
) -> torch.Tensor:
    """Row j through member members[j]'s materialised weights, float64 on CPU, in a plain loop."""
    perts = trainer.sample_perturbations(trainer.population_size)
    center = trainer.current_params.detach().to("cpu", torch.float64)
    twin = copy.deepcopy(model).to("cpu", torch.float64)
    out = []
    for j, i in enumerate(members.tolist()):
        flat = center + perts[i].to("cpu", torch.float64)
        torch.nn.utils.vector_to_parameters(flat, twin.parameters())
        with torch.no_grad():
            out.append(twin(x[j : j + 1].to("cpu", torch.float64)))
    return torch.cat(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("mapped", [False, True])
def test_forward_matches_materialised_members_float32(device: str, rank: int, mapped: bool) -> None:
    model = _mlp()
    trainer = _trainer(copy.deepcopy(model), device, rank)
    members = torch.tensor([5, 5, 0, 15, 3, 8, 1, 2, 9, 9, 11, 4]) if mapped else torch.arange(16)
    x = torch.randn(len(members), 6, generator=torch.Generator().manual_seed(1))
    pop = trainer.make_population(trainer.sample_perturbations(16), torch.arange(16, device=device))
    got = pop(x.to(device), members=members.to(device) if mapped else None)
    assert got.device.type == device and got.dtype == torch.float32
    ref = _reference(model, trainer, x, members)
    torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 4])
def test_forward_bfloat16_matches_float32_to_bf16_precision(device: str, rank: int) -> None:
    model = _mlp()
    members = torch.tensor([5, 5, 0, 15, 3, 8, 1, 2])
    x = torch.randn(len(members), 6, generator=torch.Generator().manual_seed(1))
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        trainer = _trainer(copy.deepcopy(model).to(dtype), device, rank)
        pop = trainer.make_population(trainer.sample_perturbations(16), torch.arange(16, device=device))
        outs[dtype] = pop(x.to(device, dtype), members=members.to(device))
    assert outs[torch.bfloat16].dtype == torch.bfloat16
    f32, bf16 = outs[torch.float32].cpu(), outs[torch.bfloat16].cpu().float()
    # bf16 keeps 8 significant bits (2^-8 ~ 0.4%); three layers of rounding: a few times that.
    scale = f32.abs().max()
    assert (bf16 - f32).abs().max() <= 0.03 * scale
    assert (bf16 - f32).abs().max() > 0  # it did run in bfloat16


def _step_params(device: str) -> torch.Tensor:
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    target = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))

    @batched_fitness
    def fitness(population):
        out = population(x.to(population.device))
        return -((out - target.to(out.device)) ** 2).sum(dim=1)

    trainer = _trainer(_mlp(), device, 2, fitness, noise_reuse=2, learning_rate=0.05)
    trainer.step()
    trainer.step()
    assert trainer.current_params.device.type == device
    return trainer.current_params.detach().cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_update_step_matches_cpu(device: str, monkeypatch) -> None:
    """Two generations on ``device`` (PyTorch path) == on CPU with the compiled kernel (if any)."""
    got = _step_params(device)
    monkeypatch.undo()  # the CPU reference runs the default path (the compiled kernel where there)
    ref = _step_params("cpu")
    assert not torch.equal(ref, _mlp_params())  # the steps moved the parameters
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _mlp_params() -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(_mlp().parameters()).detach()


@pytest.mark.parametrize("device", DEVICES)
def test_noise_bits_equal_the_cpu_generator(device: str) -> None:
    layout = NoiseLayout.from_sizes({"w:A": 300, "w:B": 77, "b": 5})
    cpu = NoiseGenerator(2**40 + 9, layout, "cpu")
    dev = NoiseGenerator(2**40 + 9, layout, device)
    half, full = dev.sample(7, 33)
    assert half.device.type == device and full.device.type == device
    ref_half, ref_full = cpu.sample(7, 33)
    assert torch.equal(half.cpu().view(torch.int16), ref_half.view(torch.int16))
    assert torch.equal(full.cpu(), ref_full)
    piece = reference_noise(2**40 + 9, 7, 1, 3, 70, 5, 4, device)
    assert torch.equal(piece.cpu(), ref_half[5:9, 303:370])


@pytest.mark.parametrize("device", DEVICES)
def test_staging_sends_observations_and_rows_together(device: str) -> None:
    stage = _DeviceStaging(torch.device(device))
    for n in (5, 64, 3, 64):  # grows, then reuses the buffer
        x = torch.randn(n, 4)
        rows = torch.randint(0, 100, (n,))
        x_d, rows_d = stage(x, rows)
        assert x_d.device.type == device and rows_d.dtype == torch.int64
        assert torch.equal(x_d.cpu(), x) and torch.equal(rows_d.cpu(), rows)


def _cartpole(device: str, generations: int) -> tuple[EGGROLLTrainer, RolloutFitness]:
    env = gym.make("CartPole-v1")
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=(16,), seed=0)
    fitness = RolloutFitness("CartPole-v1", seed=0, backend="vector_entry_point")
    trainer = EGGROLLTrainer(
        policy.to(device), fitness, population_size=32, learning_rate=0.28, sigma=0.3, rank=1,
        noise_reuse=2, seed=0, device=device,
    )  # fmt: skip
    trainer.train(num_generations=generations, log_every=1000)
    return trainer, fitness


@pytest.mark.parametrize("device", DEVICES)
def test_short_cartpole_training(device: str) -> None:
    trainer, fitness = _cartpole(device, 6)
    fitness.close()
    assert trainer.current_params.device.type == device
    returns = trainer.history["return_mean"]
    assert len(returns) == 6 and np.isfinite(returns).all()
    assert max(returns[3:]) > returns[0]  # it learns (CartPole from seed 0: 20 -> 100+)


def _profiled_step_counts(device: str) -> tuple[int, dict[str, int]]:
    """Run one generation's rollout under the profiler; return (env steps, event counts)."""
    from torch.profiler import ProfilerActivity, profile

    trainer, fitness = _cartpole(device, 1)
    pop = trainer.make_population(
        trainer.sample_perturbations(trainer.population_size),
        torch.arange(trainer.population_size, device=device),
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fitness(pop)
    steps = int(fitness.stats["lockstep_steps"])
    fitness.close()
    counts: dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    return steps, counts


def _count(counts: dict[str, int], *needles: str) -> int:
    return sum(n for name, n in counts.items() if any(s in name for s in needles))


@pytest.mark.parametrize("device", DEVICES)
def test_rollout_step_copies_once_each_way(device: str) -> None:
    """Per env step: one host->device copy (observations + rows map) and one device->host copy
    (actions), and no other synchronisation. The CPU half checks the counting itself: the
    profiler sees the population's forward once per step."""
    steps, counts = _profiled_step_counts(device)
    assert steps > 10
    # Each step runs the policy's Linear layers: at least one matrix product per layer.
    assert _count(counts, "aten::addmm", "aten::mm") >= 2 * steps
    if device == "cuda":
        per_generation = 16  # the totals' all-reduce, the member block and fitness, per generation
        # Runtime calls (CPU side): one copy each way per step.
        copies = _count(counts, "cudaMemcpy")
        assert 2 * steps <= copies <= 2 * steps + per_generation, counts
        # Device activities, where the profiler records them: one of each direction per step.
        h2d, d2h = _count(counts, "Memcpy HtoD"), _count(counts, "Memcpy DtoH")
        if h2d + d2h:
            assert steps <= h2d <= steps + per_generation, counts
            assert steps <= d2h <= steps + per_generation, counts
        # The action read-back waits for the step; nothing else does (no event or device waits).
        assert _count(counts, "cudaStreamSynchronize") <= d2h + per_generation or not d2h, counts
        assert _count(counts, "cudaDeviceSynchronize", "cudaEventSynchronize") <= per_generation, counts


@pytest.mark.parametrize("device", DEVICES)
def test_noise_regeneration_moves_nothing_between_host_and_device(device: str) -> None:
    """After the first generation, drawing a generation's noise on the device copies nothing
    (the knot table is on the device once per process). The CPU half checks the counting: the
    first draw of a fresh device table copies it (a CPU-to-CPU copy there)."""
    from torch.profiler import ProfilerActivity, profile

    from eggroll_rl import noise

    noise._knots_on.cache_clear()
    gen = NoiseGenerator(11, NoiseLayout.from_sizes({"w:A": 256, "w:B": 64, "b": 8}), device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as first:
        reference_noise(11, 0, 0, 0, 64, 0, 2, device)
    assert _count(_names(first), "aten::copy_", "aten::_to_copy") >= 1  # the table's one copy
    gen.sample(0, 16)
    with profile(activities=activities) as prof:
        for generation in (1, 2):
            half, _ = gen.sample(generation, 16)
            reference_noise(11, generation, 1, 0, 64, 0, 16, device)
    counts = _names(prof)
    assert half.device.type == device
    assert noise._knots_on.cache_info().misses == 1  # one table per device and process
    assert _count(counts, "cudaMemcpy", "Memcpy HtoD", "Memcpy DtoH") == 0, counts


def _names(prof) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


@pytest.mark.parametrize("device", DEVICES)
def test_cli_trains_on_the_device_and_resumes_on_cpu(device: str, tmp_path, monkeypatch, capsys) -> None:
    """``eggroll-rl train --device DEVICE`` runs there; its checkpoint resumes on the CPU."""
    from eggroll_rl.cli import main

    monkeypatch.chdir(tmp_path)
    small = ["--population", "16", "--set", "eval.every=2", "--set", "eval.episodes=3", "--no-progress"]

    def cli(*args: str) -> tuple[int, str]:
        try:
            main([*args, *small])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out + err

    code, out = cli("train", "CartPole-v1", "--out", "run", "--generations", "2", "--device", device)
    assert code == 0, out
    code, out = cli(
        "train", "CartPole-v1", "--out", "run", "--resume", "--generations", "3", "--device", "cpu"
    )
    assert code == 0, out
