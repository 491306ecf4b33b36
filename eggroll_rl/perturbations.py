"""One generation's perturbations, full-rank or low-rank, over a flat parameter vector.

Both kinds expose the same three things the trainers need: ``len``, ``p[i]`` (member i's dense
perturbation, so that member i is evaluated at ``center + p[i]``) and ``contract(w)`` =
``sum_i w_i eps_i``, the weighted sum of the members' unit-variance directions ``eps_i``
(``p[i] = sigma * eps_i``).
"""

from __future__ import annotations

import math

import torch

from .noise import NoiseLayout
from .params import ParamSpec


class FullRankPerturbations:
    """Gaussian perturbations ``p[i] = sign_i * sigma * eps_{draw(i)}`` of every parameter."""

    def __init__(
        self, noise: torch.Tensor, sigma: float, draw_index: torch.Tensor, signs: torch.Tensor
    ) -> None:
        self.noise, self.sigma = noise, sigma
        self.draw_index, self.signs = draw_index, signs

    def __len__(self) -> int:
        return self.draw_index.numel()

    def __getitem__(self, i: int | torch.Tensor) -> torch.Tensor:
        """Return member i's perturbation, or ``(len(i), numel)`` rows for a tensor of members."""
        return self.noise[self.draw_index[i]] * (self.signs[i] * self.sigma).unsqueeze(-1)

    def contract(self, weights: torch.Tensor) -> torch.Tensor:
        """Return ``sum_i weights_i * eps_i`` in one matrix-vector product over the draws."""
        return per_draw(weights, self.signs, self.noise.shape[0]) @ self.noise


class LowRankPerturbations:
    """EGGROLL perturbations: matrices get ``sign_i * sigma/sqrt(r) * A_j B_j^T``, others ``sigma e_j``.

    ``A_j`` is ``(m, r)`` and ``B_j`` is ``(n, r)`` for an ``(m, n)`` matrix, both N(0, 1), so each
    entry of ``A_j B_j^T / sqrt(r)`` has unit variance, like a full-rank Gaussian entry; vectors
    (biases, norms) get full-rank noise unless frozen (``freeze_nonlora``).
    """

    def __init__(
        self,
        noise: torch.Tensor,
        layout: NoiseLayout,
        specs: tuple[ParamSpec, ...],
        lowrank: frozenset[str],
        frozen: frozenset[str],
        rank: int,
        sigma: float,
        draw_index: torch.Tensor,
        signs: torch.Tensor,
        numel: int,
        source: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.noise, self.layout, self.specs = noise, layout, specs
        # (float16 table, per-draw window starts) that `noise` was read from, when it was: the CPU
        # kernel reads members' factors there instead of from copies.
        self.source = source
        self.lowrank, self.frozen, self.rank, self.sigma = lowrank, frozen, rank, sigma
        self.draw_index, self.signs, self.numel = draw_index, signs, numel
        self._where = {n: (o, s) for n, o, s in zip(layout.names, layout.offsets, layout.sizes)}

    def __len__(self) -> int:
        return self.draw_index.numel()

    def position(self, key: str) -> int:
        """Return where ``key`` (a parameter name, or ``name:A`` / ``name:B``) sits in a window."""
        return self._where[key][0]

    def _block(self, key: str) -> torch.Tensor:
        offset, size = self._where[key]
        return self.noise[:, offset : offset + size]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the per-draw factors ``A (draws, m, r)`` and ``B (draws, n, r)`` of a matrix."""
        m, n = next(s.shape for s in self.specs if s.name == name)
        draws = self.noise.shape[0]
        # Stored factor-major, (r, m) and (r, n): each factor column is contiguous in the window,
        # which is how the CPU kernel reads it.
        return (
            self._block(name + ":A").view(draws, self.rank, m).transpose(1, 2),
            self._block(name + ":B").view(draws, self.rank, n).transpose(1, 2),
        )

    def has_vector(self, name: str) -> bool:
        """Whether ``name`` is a perturbed non-matrix parameter (not frozen, not low-rank)."""
        return name in self._where

    def vector(self, name: str) -> torch.Tensor:
        """Return the per-draw full-rank noise ``(draws, numel)`` of a non-matrix parameter."""
        return self._block(name)

    def __getitem__(self, i: int) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=self.noise.dtype, device=self.noise.device)
        j, sign = self.draw_index[i], self.signs[i]
        for s in self.specs:
            if s.name in self.lowrank:
                a, b = self.factors(s.name)
                block = (a[j] @ b[j].T) * (sign * self.sigma / math.sqrt(self.rank))
            elif s.name in self.frozen:
                continue
            else:
                block = self.vector(s.name)[j] * (sign * self.sigma)
            out[s.slice] = block.reshape(-1)
        return out

    def contract(self, weights: torch.Tensor) -> torch.Tensor:
        """Return ``sum_i weights_i * eps_i``; each matrix's part is one ``(m, Nr) @ (Nr, n)`` product.

        For a matrix that is ``sum_j w_j A_j B_j^T / sqrt(r)`` over the draws ``j`` (``w`` folded
        onto the draws by :func:`per_draw`), computed as a single contraction over ``(j, k)``.
        """
        w = per_draw(weights, self.signs, self.noise.shape[0])
        out = torch.zeros(self.numel, dtype=self.noise.dtype, device=self.noise.device)
        for s in self.specs:
            if s.name in self.frozen:
                continue
            if s.name in self.lowrank:
                a, b = self.factors(s.name)
                m, n = s.shape
                # (A w) laid out as (draws, r, m) in the pass that scales it, so that both operands
                # are (draws * r, .) matrices: the product reads them without a transposed copy
                # (for rank 1, B's rows are read in place from the noise).
                aw = a.new_empty(a.shape[0], self.rank, m)
                torch.mul(a.transpose(1, 2), (w / math.sqrt(self.rank)).view(-1, 1, 1), out=aw)
                rows = b.transpose(1, 2).reshape(-1, n)
                torch.mm(aw.view(-1, m).T, rows, out=out[s.slice].view(m, n))
            else:
                torch.mv(self.vector(s.name).T, w, out=out[s.slice])
        return out


def per_draw(weights: torch.Tensor, signs: torch.Tensor, draws: int) -> torch.Tensor:
    """Fold member weights onto their shared draws: ``w_j = sum_{i in draw j} sign_i * weights_i``."""
    signed = weights * signs.to(weights.dtype)  # float32 signs must not promote bfloat16 weights
    return signed.view(draws, -1).sum(dim=1) if signed.numel() != draws else signed
