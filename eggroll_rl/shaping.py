"""Fitness shaping: turn raw returns into the weights of the ES update."""

from __future__ import annotations

from collections.abc import Callable

import torch

Shaper = Callable[[torch.Tensor], torch.Tensor]
EPS = 1e-8


def zscore(fitness: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Standardise fitness; with groups subtract each group's mean, divide by the global std.

    The grouped form is the reference EGGROLL implementation's: members that share start states
    are compared with each other, while one global scale keeps every group's step comparable.
    """
    std = fitness.std(correction=0)
    if group_size > 1:
        groups = fitness.view(-1, group_size)
        centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    else:
        centred = fitness - fitness.mean()
    return centred / (std + EPS)


def centered_rank(fitness: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Map fitness to ranks spread evenly over [-0.5, 0.5] (OpenAI-ES), within groups if given."""
    groups = fitness.view(-1, group_size) if group_size > 1 else fitness.view(1, -1)
    ranks = torch.empty_like(groups)
    order = groups.argsort(dim=1, stable=True)
    steps = torch.arange(groups.shape[1], dtype=fitness.dtype, device=fitness.device)
    ranks.scatter_(1, order, steps.expand_as(groups).contiguous())
    return (ranks / (groups.shape[1] - 1) - 0.5).reshape(-1)


SHAPERS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "zscore": zscore,
    "centered_rank": centered_rank,
}


def make_shaper(shaping: str | Shaper, group_size: int = 0) -> Shaper:
    """Resolve ``fitness_shaping=`` (a name in SHAPERS or a callable) into a shaper."""
    if callable(shaping):
        return shaping
    if shaping not in SHAPERS:
        raise ValueError(f"fitness_shaping must be one of {sorted(SHAPERS)} or a callable, got {shaping!r}")
    fn = SHAPERS[shaping]
    return lambda fitness: fn(fitness, group_size)
