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


def top_directions(count: int, shaping: str | Shaper = "zscore") -> Shaper:
    """Return a shaper that keeps only the ``count`` best antithetic pairs (ARS's top-b).

    Augmented Random Search (Mania et al. 2018, "Simple random search provides a competitive
    approach to reinforcement learning", V1-t/V2-t) ranks each direction by ``max(f+, f-)`` of
    its antithetic pair and steps along the best ``b = count`` only. Here members ``2j`` and
    ``2j+1`` are pair ``j`` (``noise_reuse=2``); the kept ``2b`` fitnesses are shaped by
    ``shaping`` (``"zscore"`` divides by their std, as ARS V2-t does; ties in ``max(f+, f-)``
    keep the lower pair index), scaled by ``N / (2b)`` so the trainer's ``1/N`` average becomes
    an average over the kept members, and every other member gets 0. ``count >= N/2`` is
    ``shaping`` unchanged. Input ``(N,)`` with even N; output ``(N,)``. Raises ValueError for
    ``count < 1`` or an odd N.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"top_directions count must be an integer >= 1, got {count!r}")
    base = make_shaper(shaping)

    def shape(fitness: torch.Tensor) -> torch.Tensor:
        n = fitness.numel()
        if n % 2:
            raise ValueError(f"top_directions needs antithetic pairs (noise_reuse=2): got {n} members")
        pairs = fitness.view(-1, 2)
        if count >= pairs.shape[0]:
            return base(fitness)
        score = pairs.max(dim=1).values
        # Stable descending order: ties keep the lower pair index.
        keep = torch.argsort(-score, stable=True)[:count].sort().values
        shaped = torch.zeros_like(pairs)
        shaped[keep] = base(pairs[keep].reshape(-1)).view(-1, 2) * (n / (2 * count))
        return shaped.reshape(-1)

    return shape
