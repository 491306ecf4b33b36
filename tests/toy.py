"""Small deterministic problems shared by the core tests (also imported by subprocesses)."""

from __future__ import annotations

import torch
from torch import nn

from eggroll_rl import EGGROLLTrainer, VanillaESTrainer, batched_fitness

INPUTS = torch.linspace(-1, 1, 24).reshape(6, 4)
TARGET = torch.tensor([0.5, -0.25])


def mlp(seed: int = 0) -> nn.Module:
    """Return a small fixed-seed MLP."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def regression_fitness(model: nn.Module) -> float:
    """Return minus the squared error of ``model`` on a fixed regression task."""
    with torch.no_grad():
        return -float(((model(INPUTS) - TARGET) ** 2).mean())


@batched_fitness
def batched_regression(population) -> torch.Tensor:
    """Evaluate every member on the same regression task in one forward."""
    out = population(INPUTS.expand(len(population), *INPUTS.shape))
    return -((out - TARGET) ** 2).mean(dim=(1, 2))


def make_trainer(kind: str = "eggroll", batched: bool = True, **kwargs) -> EGGROLLTrainer:
    """Build a trainer on the regression task with fixed defaults."""
    fitness = batched_regression if batched else regression_fitness
    defaults = dict(population_size=16, learning_rate=0.05, sigma=0.1, seed=3)
    defaults.update(kwargs)
    if kind == "vanilla":
        return VanillaESTrainer(model=mlp(), fitness_fn=fitness, **defaults)
    return EGGROLLTrainer(model=mlp(), fitness_fn=fitness, **defaults)
