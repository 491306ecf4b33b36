"""The trainer family: API, base contract, estimator, noise, shaping, state and bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from eggroll_rl import EGGROLLTrainer, ESTrainer, VanillaESTrainer, batched_fitness
from eggroll_rl.shaping import centered_rank, zscore

from toy import INPUTS, batched_regression, make_trainer, mlp, regression_fitness

TESTS = Path(__file__).parent


class CustomESTrainer(ESTrainer):
    def sample_perturbations(self, population_size):
        param_dim = self.current_params.shape[0]
        return torch.randn(population_size, param_dim, device=self.device) * self.sigma

    def compute_update(self, perturbations, fitnesses):
        weights = (fitnesses - fitnesses.mean()) / (fitnesses.std() + 1e-8)
        return (weights[:, None] * perturbations).mean(dim=0)


# -- the documented API -----------------------------------------------------------------------------
def test_documented_api_runs_and_improves():
    model = mlp()
    trainer = VanillaESTrainer(
        model=model, fitness_fn=regression_fitness, population_size=50, learning_rate=0.01, sigma=0.1, seed=42
    )
    start = regression_fitness(trainer.get_center_model())
    trainer.train(num_generations=40)
    assert len(trainer.history["mean_fitness"]) == 40
    assert regression_fitness(model) > 0.25 * start  # the center's error is at most a quarter
    trainer = EGGROLLTrainer(
        model=mlp(),
        fitness_fn=batched_regression,
        population_size=256,
        learning_rate=0.01,
        sigma=0.1,
        rank=1,
        noise_reuse=0,
        group_size=0,
        freeze_nonlora=False,
        seed=42,
    )
    seen = []
    trainer.train(num_generations=100, log_every=10, callback=lambda g, h: seen.append((g, list(h))))
    assert [g for g, _ in seen] == list(range(10, 101, 10))
    assert seen[-1][1] == trainer.history["mean_fitness"]
    hist = trainer.history
    assert len(hist["fitness"]) == len(hist["mean_fitness"]) == len(hist["best_fitness"]) == 100
    assert hist["mean_fitness"][-1] > 0.5 * hist["mean_fitness"][0]  # error at least halved
    best = trainer.get_best_model()
    assert trainer.best_fitness == max(hist["fitness"])
    assert math.isclose(regression_fitness(best), trainer.best_fitness, rel_tol=1e-5)


def test_custom_subclass_example_runs():
    torch.manual_seed(0)
    trainer = CustomESTrainer(
        model=mlp(), fitness_fn=regression_fitness, population_size=32, learning_rate=0.05, sigma=0.1
    )
    trainer.train(40)
    assert trainer.history["mean_fitness"][-1] > trainer.history["mean_fitness"][0]
    # The dense (vmap) batched path serves custom trainers too: the same step as per-model fitness.
    steps = []
    for fitness in (batched_regression, regression_fitness):
        torch.manual_seed(1)
        trainer = CustomESTrainer(model=mlp(), fitness_fn=fitness, population_size=8, sigma=0.1)
        start = trainer.current_params.clone()
        trainer.step()
        steps.append(trainer.current_params - start)
    assert steps[0].abs().max() > 0
    assert torch.allclose(steps[0], steps[1], atol=1e-6)


def test_base_contract_member_params_and_step():
    """Member i is evaluated at center + p[i] exactly; the step is center += lr * update."""
    seen = []

    def fitness(model):
        seen.append(torch.nn.utils.parameters_to_vector(model.parameters()).clone())
        return float(len(seen) % 3)

    class Recorder(CustomESTrainer):
        def sample_perturbations(self, population_size):
            self.last = super().sample_perturbations(population_size)
            return self.last

        def compute_update(self, perturbations, fitnesses):
            self.last_update = super().compute_update(perturbations, fitnesses)
            return self.last_update

    trainer = Recorder(model=mlp(), fitness_fn=fitness, population_size=6, learning_rate=0.3, sigma=0.2)
    center = trainer.current_params.clone()
    trainer.step()
    for i, params in enumerate(seen):
        assert torch.equal(params, center + trainer.last[i])
    # The step is computed in the update's precision (float64 here) and stored in the model's.
    assert torch.equal(trainer.current_params, (center + 0.3 * trainer.last_update).float())
    # The model's parameters view the flat center: updating one updates the other.
    assert torch.equal(
        torch.nn.utils.parameters_to_vector(trainer.model.parameters()), trainer.current_params
    )


def test_history_and_step_stats():
    seen = []

    def fitness(model):
        seen.append(regression_fitness(model))
        return seen[-1]

    trainer = make_trainer(batched=False)
    trainer.fitness_fn = fitness
    stats = trainer.step()
    assert {"fitness", "mean_fitness", "best_fitness", "std_fitness", "sigma", "time"} <= stats.keys()
    for _ in range(4):
        trainer.step()
    h = trainer.history
    assert h["best_fitness"] == [max(h["fitness"][: i + 1]) for i in range(5)]
    # Each generation's stats are those of the 16 fitness values its members returned.
    values = torch.tensor(seen, dtype=torch.float64).view(5, 16)
    assert h["fitness"] == values.max(dim=1).values.tolist()
    assert h["mean_fitness"] == pytest.approx(values.mean(dim=1).tolist(), rel=1e-12)
    assert h["std_fitness"] == pytest.approx(values.std(dim=1, correction=0).tolist(), rel=1e-12)
    assert h["nonfinite_fitness"] == [0.0] * 5


@pytest.mark.parametrize("kind", ["eggroll", "vanilla"])
def test_best_model_reproduces_best_fitness(kind):
    trainer = make_trainer(kind, batched=False)
    trainer.train(6)
    assert regression_fitness(trainer.get_best_model()) == trainer.best_fitness
    trainer = make_trainer(kind, batched=True)
    trainer.train(6)
    assert math.isclose(regression_fitness(trainer.get_best_model()), trainer.best_fitness, rel_tol=1e-5)
    center = trainer.get_center_model()
    assert torch.equal(torch.nn.utils.parameters_to_vector(center.parameters()), trainer.current_params)


@pytest.mark.parametrize("kind", ["eggroll", "vanilla"])
def test_batched_equals_per_model_fitness(kind):
    per_model = make_trainer(kind, batched=False)
    batched = make_trainer(kind, batched=True)
    per_model.step()
    batched.step()
    assert torch.allclose(per_model.current_params, batched.current_params, atol=1e-5)
    a, b = per_model.history["mean_fitness"][0], batched.history["mean_fitness"][0]
    assert math.isclose(a, b, rel_tol=1e-5)


def test_batched_population_called_many_times_with_extra_dims():
    calls = []

    @batched_fitness
    def fitness(pop):
        x = torch.ones(len(pop), 3, 4)
        first = pop(x)
        second = pop(x[:, 0])
        calls.append((first.shape, second.shape))
        assert torch.allclose(first[:, 0], second, atol=1e-6)
        return second.sum(dim=1)

    EGGROLLTrainer(model=mlp(), fitness_fn=fitness, population_size=4, rank=2, seed=0).train(2)
    assert calls == [((4, 3, 2), (4, 2))] * 2


# -- the estimator ----------------------------------------------------------------------------------
class Flat(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Linear(d, d, bias=True)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("cls", [VanillaESTrainer, EGGROLLTrainer])
def test_linear_fitness_update_aligns_with_gradient(cls):
    torch.manual_seed(1)
    model = Flat(8)
    c = torch.randn(8 * 8 + 8)

    def fitness(m):
        return float(torch.nn.utils.parameters_to_vector(m.parameters()) @ c)

    trainer = cls(model=model, fitness_fn=fitness, population_size=2000, sigma=0.05, seed=0)
    p = trainer.sample_perturbations(2000)
    f = torch.tensor([fitness_at(trainer, p[i], c) for i in range(2000)], dtype=torch.float64)
    assert _cosine(trainer.compute_update(p, f), c) > 0.95


def fitness_at(trainer, delta, c):
    return float((trainer.current_params + delta) @ c)


def test_same_shaped_layers_do_not_cancel():
    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6, bias=False)
            self.b = nn.Linear(6, 6, bias=False)

    torch.manual_seed(0)
    c = torch.randn(6, 6)
    model = Twin()

    def fitness(m):
        return float((m.a.weight * c).sum() - (m.b.weight * c).sum())

    trainer = EGGROLLTrainer(
        model=model, fitness_fn=fitness, population_size=64, learning_rate=0.05, sigma=0.1
    )
    start_a, start_b = model.a.weight.detach().clone(), model.b.weight.detach().clone()
    trainer.train(30)
    assert _cosine(model.a.weight.detach() - start_a, c) > 0.9
    assert _cosine(model.b.weight.detach() - start_b, -c) > 0.9


def test_lowrank_directions_approach_gaussian_as_rank_grows():
    """Entries of A B^T / sqrt(r) have unit variance and kurtosis 3 + 6/r (Gaussian: 3)."""
    model = nn.Linear(32, 32, bias=False)
    kurtosis = {}
    for rank in (1, 4, 16):
        trainer = EGGROLLTrainer(
            model=model, fitness_fn=regression_fitness, population_size=512, rank=rank, sigma=1.0, seed=7
        )
        eps = torch.stack([trainer.sample_perturbations(512)[i] for i in range(512)])
        assert abs(float(eps.var()) - 1) < 0.05
        kurtosis[rank] = float((eps**4).mean() / eps.var() ** 2)
        assert abs(kurtosis[rank] - (3 + 6 / rank)) < 0.1 * (3 + 6 / rank)
    assert kurtosis[1] > kurtosis[4] > kurtosis[16]


# -- noise --------------------------------------------------------------------------------------------
def test_noise_independent_across_same_shaped_layers_and_seeded():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = nn.Linear(5, 5)
            self.l2 = nn.Linear(5, 5)

    def first_member(seed, generation=0):
        t = EGGROLLTrainer(model=Two(), fitness_fn=regression_fitness, population_size=4, seed=seed)
        t.generation = generation
        return t.sample_perturbations(4)

    p = first_member(0)
    a1, b1 = p.factors("l1.weight")
    a2, b2 = p.factors("l2.weight")
    assert not torch.allclose(a1, a2) and not torch.allclose(b1, b2)
    assert not torch.allclose(p.vector("l1.bias"), p.vector("l2.bias"))
    assert torch.equal(first_member(0)[2], p[2])
    assert not torch.allclose(first_member(1)[2], p[2])
    assert not torch.allclose(first_member(0, generation=1)[2], p[2])
    assert not torch.allclose(p[0], p[1])


@pytest.mark.parametrize("kind", ["eggroll", "vanilla"])
def test_noise_reuse_alternating_signs(kind):
    trainer = make_trainer(kind, population_size=12, noise_reuse=2)
    p = trainer.sample_perturbations(12)
    for j in range(6):
        assert torch.allclose(p[2 * j + 1], -p[2 * j])
    assert not torch.allclose(p[0], p[2])


def test_freeze_nonlora_trains_only_matrices():
    trainer = make_trainer(freeze_nonlora=True, optimizer="adamw", optimizer_kwargs={"weight_decay": 0.1})
    biases = [m.bias.detach().clone() for m in trainer.model if isinstance(m, nn.Linear)]
    weights = [m.weight.detach().clone() for m in trainer.model if isinstance(m, nn.Linear)]
    p = trainer.sample_perturbations(16)
    assert float(p[0][trainer._params.specs[1].slice].abs().sum()) == 0.0
    trainer.train(3)
    linears = [m for m in trainer.model if isinstance(m, nn.Linear)]
    assert all(torch.equal(m.bias, b) for m, b in zip(linears, biases))
    assert all(not torch.equal(m.weight, w) for m, w in zip(linears, weights))


# -- shaping ----------------------------------------------------------------------------------------
def test_shaping_hand_computed():
    f = torch.tensor([1.0, 2.0, 3.0, 6.0])
    std = math.sqrt(((f - 3) ** 2).mean())  # global std = sqrt(3.5)
    assert torch.allclose(zscore(f), (f - 3) / std)
    # groups of 2: subtract each group's mean (1.5, 4.5), divide by the global std
    assert torch.allclose(zscore(f, 2), torch.tensor([-0.5, 0.5, -1.5, 1.5]) / std)
    assert torch.allclose(centered_rank(torch.tensor([10.0, -1.0, 3.0])), torch.tensor([0.5, -0.5, 0.0]))
    assert torch.allclose(
        centered_rank(torch.tensor([3.0, 1.0, 0.0, 5.0]), 2), torch.tensor([0.5, -0.5, -0.5, 0.5])
    )


def test_centered_rank_shaping_selectable():
    trainer = make_trainer(fitness_shaping="centered_rank")
    trainer.train(20)
    assert trainer.history["mean_fitness"][-1] > trainer.history["mean_fitness"][0]


# -- optimizers and schedules ---------------------------------------------------------------------------
def test_adam_and_schedules():
    sigmas = []
    trainer = make_trainer(
        optimizer="adam",
        learning_rate=lambda g: 0.05 / (1 + g),
        sigma=lambda g: sigmas.append(g) or 0.1 * 0.9**g,
    )
    trainer.train(5)
    assert trainer.history["learning_rate"] == pytest.approx([0.05 / (1 + g) for g in range(5)])
    assert trainer.history["sigma"] == pytest.approx([0.1 * 0.9**g for g in range(5)])
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 5)
    # The first Adam step moves every coordinate by ~lr (its normalised step).
    fresh = make_trainer(optimizer=torch.optim.Adam, learning_rate=0.01)
    start = fresh.current_params.clone()
    fresh.step()
    moved = (fresh.current_params - start).abs()
    assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], 0.01), rtol=1e-3)


# -- state --------------------------------------------------------------------------------------------
_RESUME = """
import sys, torch
from toy import make_trainer
t = make_trainer(optimizer="adam", noise_reuse=2, group_size=4)
t.load_state_dict(torch.load(sys.argv[1], weights_only=True))
t.train(5)
torch.save({"params": t.current_params, "history": t.history, "best": t.best_fitness}, sys.argv[2])
"""


@pytest.mark.parametrize("kind", ["eggroll", "vanilla"])
def test_state_round_trip_in_fresh_process(tmp_path, kind):
    kw = dict(optimizer="adam", noise_reuse=2, group_size=4)
    straight = make_trainer(kind, **kw)
    straight.train(10)
    half = make_trainer(kind, **kw)
    half.train(5)
    torch.save(half.state_dict(), tmp_path / "ckpt.pt")
    script = _RESUME.replace("make_trainer(", f"make_trainer({kind!r}, ", 1)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
    )
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(out["params"], straight.current_params)
    assert out["history"]["mean_fitness"] == straight.history["mean_fitness"]
    assert out["best"] == straight.best_fitness


def test_load_state_rejects_other_configuration():
    state = make_trainer(rank=1).state_dict()
    with pytest.raises(ValueError, match="rank"):
        make_trainer(rank=2).load_state_dict(state)


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"population_size": 1}, ValueError, "population_size"),
        ({"population_size": 2.5}, ValueError, "population_size"),
        ({"sigma": 0}, ValueError, "sigma"),
        ({"sigma": -1}, ValueError, "sigma"),
        ({"learning_rate": 0}, ValueError, "learning_rate"),
        ({"rank": 0}, ValueError, "rank"),
        ({"noise_reuse": 3}, ValueError, r"noise_reuse must be 0 \(independent members\) or 2"),
        ({"population_size": 15, "noise_reuse": 2}, ValueError, "divisible by noise_reuse"),
        ({"noise_reuse": 1}, ValueError, "noise_reuse"),
        ({"group_size": 5}, ValueError, "divisible by group_size"),
        ({"fitness_shaping": "bogus"}, ValueError, "fitness_shaping"),
        ({"optimizer": "lion"}, ValueError, "optimizer"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_trainer(**kwargs)


def test_bad_models_and_fitness():
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        EGGROLLTrainer(model=frozen, fitness_fn=regression_fitness, population_size=4)
    with pytest.raises(TypeError, match="fitness_fn"):
        EGGROLLTrainer(model=mlp(), fitness_fn=3, population_size=4)
    conv = nn.Sequential(nn.Conv1d(1, 1, 3), nn.Flatten())
    with pytest.raises(TypeError, match="Conv1d"):
        EGGROLLTrainer(model=conv, fitness_fn=batched_regression, population_size=4)

    for value, error, match in [
        ("fast", TypeError, "must return a number"),
        (torch.ones(3), ValueError, "one number"),
    ]:
        trainer = EGGROLLTrainer(model=mlp(), fitness_fn=lambda m, v=value: v, population_size=4)
        with pytest.raises(error, match=match):
            trainer.step()
    for value, error, match in [
        (lambda n: torch.ones(n + 1), ValueError, r"shape \(4,\)"),
        (lambda n: "x", TypeError, "batched fitness_fn"),
        (lambda n: torch.ones(n, 2), ValueError, r"shape \(4,\)"),
    ]:
        trainer = EGGROLLTrainer(
            model=mlp(), fitness_fn=batched_fitness(lambda p, v=value: v(len(p))), population_size=4
        )
        with pytest.raises(error, match=match):
            trainer.step()


def test_no_finite_fitness_is_an_error():
    values = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    trainer = EGGROLLTrainer(
        model=mlp(), fitness_fn=batched_fitness(lambda p: values * float("nan")), population_size=4
    )
    with pytest.raises(ValueError, match="no finite fitness"):
        trainer.step()


def test_layernorm_model_batched_matches_per_model():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))

    a = EGGROLLTrainer(model=model(), fitness_fn=batched_regression, population_size=8, rank=2, seed=5)
    b = EGGROLLTrainer(model=model(), fitness_fn=regression_fitness, population_size=8, rank=2, seed=5)
    a.train(3)
    b.train(3)
    assert torch.allclose(a.current_params, b.current_params, atol=1e-5)
    assert INPUTS.shape == (6, 4)
