"""Fitness shaping: turn raw returns into the weights of the ES update.

Every shaper takes the ``(N,)`` raw fitness, possibly holding non-finite values (NaN, +-inf: a
member that failed), and returns ``(N,)`` finite weights. A non-finite fitness is strictly the
worst: its weight is below that of every finite member it is compared with (its group, or the
whole population), under every shaping, grouped or not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Shaper = Callable[[torch.Tensor], torch.Tensor]
EPS = 1e-8


def zscore(fitness: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Standardise fitness; with groups subtract each group's mean, divide by the global std.

    The grouped form is the reference EGGROLL implementation's (``convert_fitnesses`` in
    ESHyperscale/HyperscaleES): members that share start states are compared with each other,
    while one global scale keeps every group's step comparable.

    Non-finite members: the finite ones are standardised among themselves (their group means,
    their std); each non-finite member then gets the lowest finite weight of its group minus 1
    (one standard deviation below the worst finite member), and every group (or the whole
    population) is re-centred to mean 0, so the weights still sum to 0 and keep their order. A
    group without a finite member gets weight 0 (nothing to compare within it).
    """
    finite = torch.isfinite(fitness)
    if bool(finite.all()):
        std = fitness.std(correction=0)
        if group_size > 1:
            groups = fitness.view(-1, group_size)
            centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
        else:
            centred = fitness - fitness.mean()
        return centred / (std + EPS)
    shape = (-1, group_size) if group_size > 1 else (1, -1)
    ok = finite.view(shape)
    values = torch.where(finite, fitness, 0.0).view(shape)
    count = ok.sum(dim=1, keepdim=True)
    kept = values[ok]
    std = (kept - kept.mean()).square().mean().sqrt() if kept.numel() else values.new_zeros(())
    means = values.sum(dim=1, keepdim=True) / count.clamp(min=1)
    z = torch.where(ok, (values - means) / (std + EPS), 0.0)
    floor = torch.where(ok, z, torch.inf).amin(dim=1, keepdim=True) - 1.0
    z = torch.where(ok, z, torch.where(count > 0, floor, 0.0))
    return (z - z.mean(dim=1, keepdim=True)).reshape(-1)


def centered_rank(fitness: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Map fitness to ranks spread evenly over [-0.5, 0.5] (OpenAI-ES), within groups if given.

    Tied fitnesses share their average rank (all equal: every weight 0); non-finite fitness
    ranks as -inf, below every finite one (tied among themselves).
    """
    worst = torch.tensor(-torch.inf, dtype=fitness.dtype, device=fitness.device)
    groups = torch.where(torch.isfinite(fitness), fitness, worst)
    groups = groups.view(-1, group_size) if group_size > 1 else groups.view(1, -1)
    ordered = groups.sort(dim=1).values
    below = torch.searchsorted(ordered, groups, right=False)  # members strictly worse
    upto = torch.searchsorted(ordered, groups, right=True)  # members worse or tied
    ranks = (below + upto - 1).to(fitness.dtype) / 2
    return (ranks / (groups.shape[1] - 1) - 0.5).reshape(-1)


SHAPERS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "zscore": zscore,
    "centered_rank": centered_rank,
}


def worst_to_finite(fitness: torch.Tensor) -> torch.Tensor:
    """Replace non-finite fitness by one finite value strictly below every finite fitness.

    The value is the lowest finite fitness minus the finite range (minus 1 when every finite
    fitness is equal). Raises ValueError when no fitness is finite.
    """
    finite = torch.isfinite(fitness)
    if bool(finite.all()):
        return fitness
    if not bool(finite.any()):
        raise ValueError("fitness has no finite value to rank the non-finite ones below")
    kept = fitness[finite]
    low, spread = kept.min(), kept.max() - kept.min()
    return torch.where(finite, fitness, low - torch.where(spread > 0, spread, 1.0))


def make_shaper(shaping: str | Shaper, group_size: int = 0) -> Shaper:
    """Resolve ``fitness_shaping=`` (a name in SHAPERS or a callable) into a shaper.

    A callable receives the raw fitness with non-finite values replaced by
    :func:`worst_to_finite`, so a monotone shaper also ranks them strictly worst.
    """
    if callable(shaping):
        custom = shaping
        return lambda fitness: custom(worst_to_finite(fitness))
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
