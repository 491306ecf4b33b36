"""A model's trainable parameters as one flat vector that the model's tensors view into."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """One trainable parameter's name, shape and place in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        """Number of scalars in the parameter."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def slice(self) -> slice:
        """Where the parameter sits in the flat vector."""
        return slice(self.offset, self.offset + self.numel)


class FlatParameters:
    """Own a model's trainable parameters as one flat tensor; the model's parameters view into it.

    Updating the flat vector in place updates the model, so the trainer's step is a single
    ``add_`` and no copy back is ever needed.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (requires_grad=True); nothing to train")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(f"model parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        specs, pos = [], 0
        for name, p in named:
            specs.append(ParamSpec(name, tuple(p.shape), pos))
            pos += p.numel()
        self.specs: tuple[ParamSpec, ...] = tuple(specs)
        self.numel = pos
        self.dtype = next(iter(dtypes))
        self.device = device
        model.to(device)
        self.flat = torch.cat([p.detach().reshape(-1) for _, p in named]).to(device)
        bind(model, self.specs, self.flat)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector (or a batch ``(N, numel)``) into named parameter-shaped views."""
        lead = flat.shape[:-1]
        return {s.name: flat[..., s.slice].view(*lead, *s.shape) for s in self.specs}

    def clone_model(self, model: nn.Module, flat: torch.Tensor) -> nn.Module:
        """Return an independent copy of ``model`` holding the parameters in ``flat``."""
        twin = copy.deepcopy(model)
        params = dict(twin.named_parameters())
        with torch.no_grad():
            for s in self.specs:
                params[s.name].copy_(flat[s.slice].view(s.shape))
        return twin


def bind(model: nn.Module, specs: tuple[ParamSpec, ...], flat: torch.Tensor) -> None:
    """Make each trainable parameter of ``model`` a view into ``flat``."""
    params = dict(model.named_parameters())
    for s in specs:
        params[s.name].data = flat[s.slice].view(s.shape)
