"""The ES trainer family: ``ESTrainer`` (the loop), ``VanillaESTrainer`` and ``EGGROLLTrainer``.

One generation (``step``): sample perturbations, evaluate the members' fitness, shape it, and move
the center along the estimated gradient. Subclasses only say how to perturb
(``sample_perturbations``) and how to turn fitness into a step (``compute_update``); the base class
does the evaluation protocols, bookkeeping, schedules, optimizers, checkpoints and distribution.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import World, check_agreement
from .noise import SCHEME, NoiseGenerator, NoiseLayout, reuse_pattern
from .params import FlatParameters, bind
from .perturbations import FullRankPerturbations, LowRankPerturbations
from .population import (
    BatchedFitness,
    FullRankPopulation,
    LowRankPopulation,
    Population,
    check_lowrank_model,
)
from .shaping import Shaper, make_shaper

Schedule = float | Callable[[int], float]
OptimizerSpec = str | type[torch.optim.Optimizer] | Callable[[list[torch.Tensor]], torch.optim.Optimizer]
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{hint}, got {value!r}")
    return int(value)


def _schedule(name: str, value: Schedule) -> Callable[[int], float]:
    if callable(value):
        return lambda generation: _positive(f"{name}({generation})", value(generation))
    constant = _positive(name, value)
    return lambda generation: constant


class ESTrainer(ABC):
    """Run Evolution Strategies on ``model``: subclasses define the perturbations and the update.

    Contract: member ``i`` is evaluated at ``current_params + perturbations[i]`` exactly as
    ``sample_perturbations`` returned it, and each generation applies
    ``current_params += learning_rate * compute_update(perturbations, fitnesses)`` (or hands
    ``-update`` as the gradient to ``optimizer``). ``fitnesses`` is the raw ``(N,)`` float64
    fitness and may hold NaN/inf (a failed member; a warning names how many): the shapers of
    :mod:`eggroll_rl.shaping` rank those strictly worst, and a non-finite update raises
    ValueError instead of corrupting the center. The step's statistics (best, mean, std) cover
    the finite members; ``nonfinite_fitness`` counts the others.
    """

    noise_reuse: int = 0
    group_size: int = 0

    def __init__(
        self,
        model: nn.Module,
        fitness_fn: Callable[..., Any],
        population_size: int,
        learning_rate: Schedule = 0.01,
        sigma: Schedule = 0.1,
        seed: int = 0,
        *,
        optimizer: OptimizerSpec | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(fitness_fn):
            raise TypeError(f"fitness_fn must be callable, got {type(fitness_fn).__name__}")
        self.population_size = _integer("population_size", population_size, 2)
        self.seed = _integer("seed", seed, 0)
        self._lr_at = _schedule("learning_rate", learning_rate)
        self._sigma_at = _schedule("sigma", sigma)
        self.learning_rate, self.sigma = self._lr_at(0), self._sigma_at(0)
        if device is None:
            device = next(model.parameters(), torch.empty(0)).device
        self.device = torch.device(device)
        self.model, self.fitness_fn = model, fitness_fn
        self.batched = isinstance(fitness_fn, BatchedFitness)
        self._params = FlatParameters(model, self.device)
        self.current_params: torch.Tensor = self._params.flat
        self.frozen_slices: list[slice] = []
        self.optimizer = self._build_optimizer(optimizer, optimizer_kwargs or {})
        self.world = World.current()
        self.generation = 0
        self.history: dict[str, list[float]] = {}
        self.best_fitness = -math.inf
        self._best: dict[str, Any] | None = None
        self._member: tuple[nn.Module, torch.Tensor] | None = None

    # -- strategy hooks -------------------------------------------------------------------------
    @abstractmethod
    def sample_perturbations(self, population_size: int) -> Any:
        """Return this generation's perturbations; ``p[i]`` is member i's flat offset."""

    @abstractmethod
    def compute_update(self, perturbations: Any, fitnesses: torch.Tensor) -> torch.Tensor:
        """Return the flat update direction from the members' raw fitness."""

    def make_population(self, perturbations: Any, indices: torch.Tensor) -> Population:
        """Return the batched model of the members ``indices`` (dense perturbations: vmap)."""
        center = self._params.views(self.current_params)
        return FullRankPopulation(
            center, perturbations[indices], self._params.views, **self._population_kwargs(indices)
        )

    # -- the loop -------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """Run one generation and return its statistics."""
        gen = self.generation
        self.sigma, self.learning_rate = self._sigma_at(gen), self._lr_at(gen)
        t0 = time.perf_counter()
        perturbations = self.sample_perturbations(self.population_size)
        t1 = time.perf_counter()
        fitness = self._evaluate(perturbations)
        t2 = time.perf_counter()
        finite = _check_finite(fitness, gen, warn=self.world.is_main)
        kept = fitness[finite]
        best = int(torch.argmax(torch.where(finite, fitness, -math.inf)))
        if fitness[best] > self.best_fitness:
            self._remember_best(perturbations[best], float(fitness[best]))
        update = self.compute_update(perturbations, fitness)
        self._apply(update)
        # Per-rank fitness stats (env steps, episodes...) combined so every rank records the same.
        fitness_stats = self.world.reduce_stats(
            getattr(self.fitness_fn, "stats", None) or {}, getattr(self.fitness_fn, "stats_reduction", None)
        )
        t3 = time.perf_counter()
        self.generation += 1
        stats = {
            "generation": float(self.generation),
            "fitness": float(fitness[best]),
            "mean_fitness": float(kept.mean()),
            "std_fitness": float(kept.std(correction=0)),
            "nonfinite_fitness": float(len(fitness) - len(kept)),
            "best_fitness": self.best_fitness,
            "sigma": self.sigma,
            "learning_rate": self.learning_rate,
            "time": t3 - t0,
            "time_sample": t1 - t0,
            "time_evaluate": t2 - t1,
            "time_update": t3 - t2,
            **fitness_stats,
        }
        self._record(stats)
        return stats

    def train(
        self,
        num_generations: int,
        log_every: int | None = None,
        callback: Callable[[int, list[float]], Any] | None = None,
    ) -> dict[str, list[float]]:
        """Run ``num_generations`` generations; return the history.

        ``callback(generation, fitness_history)`` (``fitness_history``: per-generation mean
        fitness) is called every ``log_every`` generations, or every generation when ``log_every``
        is None; returning ``True`` stops training. ``log_every`` also prints a progress line.
        """
        _integer("num_generations", num_generations, 0)
        if log_every is not None:
            _integer("log_every", log_every, 1)
        for k in range(num_generations):
            stats = self.step()
            due = log_every is None or self.generation % log_every == 0 or k == num_generations - 1
            if log_every is not None and due and self.world.is_main:
                print(
                    f"gen {self.generation:5d} | mean {stats['mean_fitness']:10.3f} | "
                    f"best {stats['fitness']:10.3f} | best ever {self.best_fitness:10.3f} | "
                    f"{stats['time'] * 1e3:7.1f} ms",
                    flush=True,
                )
            if (
                callback is not None
                and due
                and callback(self.generation, self.history["mean_fitness"]) is True
            ):
                break
        return self.history

    # -- models -----------------------------------------------------------------------------------
    def get_best_model(self) -> nn.Module:
        """Return a copy of the model holding the best member ever evaluated, exactly."""
        if self._best is None:
            raise RuntimeError("no generation has been evaluated yet: call step() or train() first")
        model = self._params.clone_model(self.model, self._best["params"])
        for buf, saved in zip(model.buffers(), self._best["buffers"]):
            buf.copy_(saved)
        return model

    def get_center_model(self) -> nn.Module:
        """Return an independent copy of the current center (mean) model."""
        return self._params.clone_model(self.model, self.current_params)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to continue bit-exactly (loadable with weights_only=True)."""
        fitness_state = self.fitness_fn.state_dict() if hasattr(self.fitness_fn, "state_dict") else {}
        return {
            "trainer": type(self).__name__,
            "config": self._config(),
            "generation": self.generation,
            "center": self.current_params.detach().cpu().clone(),
            "buffers": {k: v.detach().cpu().clone() for k, v in self.model.named_buffers()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "best_fitness": self.best_fitness,
            "best": None
            if self._best is None
            else {
                "params": self._best["params"].cpu(),
                "buffers": [b.cpu() for b in self._best["buffers"]],
            },
            "history": {k: list(v) for k, v in self.history.items()},
            "fitness_fn": fitness_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the configuration must match this trainer's."""
        if state.get("trainer") != type(self).__name__ or state.get("config") != self._config():
            raise ValueError(
                f"checkpoint was made by {state.get('trainer')} with {state.get('config')}, "
                f"this trainer is {type(self).__name__} with {self._config()}"
            )
        with torch.no_grad():
            self.current_params.copy_(state["center"])
            buffers = dict(self.model.named_buffers())
            for k, v in state["buffers"].items():
                buffers[k].copy_(v)
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.generation = int(state["generation"])
        self.best_fitness = float(state["best_fitness"])
        best = state["best"]
        self._best = (
            None
            if best is None
            else {
                "params": best["params"].to(self.device),
                "buffers": [b.to(self.device) for b in best["buffers"]],
            }
        )
        self.history = {k: list(v) for k, v in state["history"].items()}
        if state.get("fitness_fn") and hasattr(self.fitness_fn, "load_state_dict"):
            self.fitness_fn.load_state_dict(state["fitness_fn"])

    # -- internals --------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "population_size": self.population_size,
            "seed": self.seed,
            "numel": self._params.numel,
            "noise_reuse": self.noise_reuse,
            "group_size": self.group_size,
        }

    def _population_kwargs(self, indices: torch.Tensor) -> dict[str, Any]:
        return {
            "model": self.model,
            "indices": indices,
            "size": self.population_size,
            "generation": self.generation,
            "seed": self.seed,
            "noise_reuse": self.noise_reuse,
            "group_size": self.group_size,
            "world": self.world,
        }

    def _build_optimizer(
        self, spec: OptimizerSpec | None, kwargs: dict[str, Any]
    ) -> torch.optim.Optimizer | None:
        if spec is None:
            return None
        params = [self.current_params]
        if isinstance(spec, str):
            if spec.lower() not in OPTIMIZERS:
                raise ValueError(
                    f"optimizer must be one of {sorted(OPTIMIZERS)}, a torch.optim "
                    f"class or a factory, got {spec!r}"
                )
            spec = OPTIMIZERS[spec.lower()]
        if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
            return spec(params, lr=self.learning_rate, **kwargs)
        if callable(spec):
            opt = spec(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}"
                )
            return opt
        raise TypeError(f"optimizer must be a name, a torch.optim class or a factory, got {spec!r}")

    def _apply(self, update: torch.Tensor) -> None:
        if not isinstance(update, torch.Tensor) or update.shape != self.current_params.shape:
            raise ValueError(
                f"compute_update must return a tensor of shape {tuple(self.current_params.shape)}, "
                f"got {getattr(update, 'shape', type(update).__name__)}"
            )
        if not bool(torch.isfinite(update).all()):
            raise ValueError(
                f"compute_update returned non-finite values at generation {self.generation}; "
                "the center is unchanged (non-finite fitness must be shaped to finite weights)"
            )
        with torch.no_grad():
            if self.optimizer is None:
                self.current_params.add_(update, alpha=self.learning_rate)
                return
            frozen = [self.current_params[s].clone() for s in self.frozen_slices]
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate
            self.current_params.grad = -update.to(self.current_params.dtype)
            self.optimizer.step()
            self.current_params.grad = None
            for s, value in zip(self.frozen_slices, frozen):
                self.current_params[s] = value  # weight decay must not move frozen parameters

    def _evaluate(self, perturbations: Any) -> torch.Tensor:
        part = self.world.member_slice(self.population_size)
        indices = torch.arange(part.start, part.stop, device=self.device)
        error: Exception | None = None
        try:
            if self.batched:
                raw = self.fitness_fn(self.make_population(perturbations, indices))
                local = _fitness_vector(raw, len(indices))
            else:
                local = torch.tensor(
                    [self._evaluate_member(perturbations[i]) for i in indices.tolist()],
                    dtype=torch.float64,
                )
        except Exception as exc:
            if self.world.size == 1:
                raise
            # Tell the other ranks inside the fitness gather, so all of them stop with the same
            # error instead of waiting for this rank until the collective times out.
            error, local = exc, torch.zeros(len(indices), dtype=torch.float64)
        return self.world.all_gather(local.to(self.device), self.population_size, error=error)

    def _evaluate_member(self, delta: torch.Tensor) -> float:
        if self._member is None:
            twin = self._params.clone_model(self.model, self.current_params)
            flat = self.current_params.clone()
            bind(twin, self._params.specs, flat)
            self._member = (twin, flat)
        twin, flat = self._member
        with torch.no_grad():
            torch.add(self.current_params, delta, out=flat)
            for dst, src in zip(twin.buffers(), self.model.buffers()):
                dst.copy_(src)
            value = self.fitness_fn(twin)
        return _fitness_scalar(value)

    def _remember_best(self, delta: torch.Tensor, fitness: float) -> None:
        self.best_fitness = fitness
        self._best = {
            "params": (self.current_params + delta).detach().clone(),
            "buffers": [b.detach().clone() for b in self.model.buffers()],
        }

    def _record(self, stats: dict[str, float]) -> None:
        n = len(self.history.get("generation", []))
        for key in stats.keys() | self.history.keys():
            column = self.history.setdefault(key, [math.nan] * n)
            column.append(stats.get(key, math.nan))


def _fitness_scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor | np.ndarray):
        if value.size == 1 if isinstance(value, np.ndarray) else value.numel() == 1:
            return float(value.reshape(-1)[0])
        raise ValueError(
            f"fitness_fn(model) must return one number, got an array of shape {tuple(value.shape)}"
        )
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"fitness_fn(model) must return a number, got {type(value).__name__}")
    return float(value)


def _fitness_vector(value: Any, expected: int) -> torch.Tensor:
    if isinstance(value, list | tuple):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
            raise TypeError(f"batched fitness_fn must return real numbers, got dtype {value.dtype}")
        value = torch.from_numpy(value.astype(np.float64))
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"batched fitness_fn must return a tensor, array or list of {expected} numbers, "
            f"got {type(value).__name__}"
        )
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"batched fitness_fn must return real numbers, got dtype {value.dtype}")
    if value.shape != (expected,):
        raise ValueError(
            f"batched fitness_fn must return shape ({expected},) — one fitness per member "
            f"— got {tuple(value.shape)}"
        )
    return value.detach().to(torch.float64)


class NonFiniteFitnessError(ValueError):
    """Raised by ``step`` when no member of a generation has a finite fitness (nothing is updated)."""


def _check_finite(fitness: torch.Tensor, generation: int, warn: bool = True) -> torch.Tensor:
    """Return the mask of finite fitness; warn about the others, raise when none is finite."""
    finite = torch.isfinite(fitness)
    if bool(finite.all()):
        return finite
    if not bool(finite.any()):
        raise NonFiniteFitnessError(
            f"fitness_fn returned no finite fitness at generation {generation} (all NaN/inf)"
        )
    if warn:  # every rank sees the same gathered fitness; the main rank warns
        warnings.warn(
            f"{int((~finite).sum())} non-finite fitness value(s) at generation {generation}: "
            "ranked strictly below every finite member by the shaping and left out of the "
            "fitness statistics",
            RuntimeWarning,
            stacklevel=3,
        )
    return finite


class _TableES(ESTrainer):
    """Shared machinery of the built-in trainers: counter-based noise, noise reuse and shaped updates.

    The update follows the EGGROLL reference implementation (ESHyperscale/HyperscaleES,
    ``noiser/eggroll.py`` and ``noiser/open_es.py``, ``_do_update``), for both trainers::

        update = sigma * sqrt(N) * mean_i(f~_i * E_i),      member i at  theta + sigma * E_i

    with ``f~`` the shaped fitness and ``E_i`` the unit-variance direction: full Gaussian noise
    (Vanilla / OpenES) or ``A_i B_i^T / sqrt(r)`` per matrix (EGGROLL). The plain step (no
    ``optimizer``, or ``"sgd"``) is ``theta += learning_rate * update``, the reference's
    ``optax.sgd(lr)``; an optimizer receives ``-update`` as the gradient, as the reference hands
    its solver. So ``learning_rate``, ``sigma`` and ``population_size`` mean what they mean in
    the reference (and the seed's ``EGGROLLTrainer``). ``update / (sigma^2 sqrt(N))`` is the
    Gaussian-smoothing gradient estimate ``mean_i(f~_i E_i) / sigma``.
    """

    def __init__(
        self,
        model: nn.Module,
        fitness_fn: Callable[..., Any],
        population_size: int,
        learning_rate: Schedule = 0.01,
        sigma: Schedule = 0.1,
        *,
        noise_reuse: int = 0,
        group_size: int = 0,
        fitness_shaping: str | Shaper = "zscore",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, fitness_fn, population_size, learning_rate, sigma, seed, **kwargs)
        if noise_reuse != 0:
            _integer("noise_reuse", noise_reuse, 2, " (or 0 for no reuse)")
            if noise_reuse != 2:
                # A draw has two signs, so a third member sharing it would duplicate the first.
                raise ValueError(
                    f"noise_reuse must be 0 (independent members) or 2 (antithetic pairs), got "
                    f"{noise_reuse!r}: a shared draw gives only two distinct members (+E, -E)"
                )
        if group_size != 0:
            _integer("group_size", group_size, 2, " (or 0 for global normalisation)")
        for name, k in (("noise_reuse", noise_reuse), ("group_size", group_size)):
            if k and self.population_size % k:
                raise ValueError(
                    f"population_size ({self.population_size}) must be divisible by {name} ({k})"
                )
        if noise_reuse and group_size and group_size % noise_reuse:
            raise ValueError(
                f"group_size ({group_size}) must be a multiple of noise_reuse ({noise_reuse}): "
                "members that share a draw (antithetic pairs) must fall in the same group"
            )
        self.noise_reuse, self.group_size = int(noise_reuse), int(group_size)
        self.shaper = make_shaper(fitness_shaping, self.group_size)
        self.draws, self.draw_index, self.signs = reuse_pattern(
            self.population_size, self.noise_reuse, self.device
        )
        self.noise = NoiseGenerator(self.seed, self._noise_layout(), self.device)
        # Every rank must draw the same numbers for the same member (same seed, layout, code and
        # bits): compare a hash of a probe of the noise and the configuration once, up front.
        if self.world.size > 1:
            probe = hashlib.sha256(repr(self._config()).encode() + self.noise.fingerprint().encode())
            check_agreement(self.world, "noise and configuration", probe.hexdigest())

    def _noise_layout(self) -> NoiseLayout:
        """Lay out one draw: every parameter, full rank, one block each."""
        return NoiseLayout.from_sizes({s.name: s.numel for s in self._params.specs})

    def _draw_noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return this generation's ``(draws, width)`` noise: float16, and in the parameters' dtype."""
        return self.noise.sample(self.generation, self.draws, self.current_params.dtype)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "noise": SCHEME}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuse one made with another noise scheme."""
        made_with = state.get("config", {}).get("noise", "the float16 table (eggroll-rl <= 0.1)")
        if made_with != SCHEME:
            raise ValueError(
                f"checkpoint was made with noise {made_with!r}, this version draws {SCHEME!r}: "
                "its members cannot be rebuilt, so it cannot resume; start a new run"
            )
        super().load_state_dict(state)

    def compute_update(self, perturbations: Any, fitnesses: torch.Tensor) -> torch.Tensor:
        """Return ``sigma * sqrt(N) * mean_i(f~_i E_i)`` (flat, ``(numel,)``), ``f~`` the shaped fitness.

        ``fitnesses`` is the raw ``(N,)`` fitness; non-finite entries are shaped strictly worst.
        """
        shaped = self.shaper(fitnesses).to(self.current_params.dtype)
        return perturbations.contract(shaped) * (perturbations.sigma / math.sqrt(self.population_size))


class VanillaESTrainer(_TableES):
    """OpenAI-style ES: every member perturbs every parameter with full-rank Gaussian noise."""

    def sample_perturbations(self, population_size: int) -> FullRankPerturbations:
        """Return ``p[i] = sign_i * sigma * eps_draw(i)`` with eps a full Gaussian vector."""
        return FullRankPerturbations(self._draw_noise()[1], self.sigma, self.draw_index, self.signs)


class EGGROLLTrainer(_TableES):
    """EGGROLL: each matrix is perturbed by ``sigma/sqrt(r) * A_i B_i^T`` (rank r), vectors fully.

    With a batched fitness the population runs as one forward per call, ``x W^T`` shared by all
    members plus an ``O(N r (m + n))`` low-rank term; ``freeze_nonlora=True`` perturbs and
    trains only the matrices.
    """

    def __init__(
        self,
        model: nn.Module,
        fitness_fn: Callable[..., Any],
        population_size: int,
        learning_rate: Schedule = 0.01,
        sigma: Schedule = 0.1,
        rank: int = 1,
        noise_reuse: int = 0,
        group_size: int = 0,
        freeze_nonlora: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self.rank = _integer("rank", rank, 1)
        self.freeze_nonlora = bool(freeze_nonlora)
        super().__init__(
            model,
            fitness_fn,
            population_size,
            learning_rate,
            sigma,
            noise_reuse=noise_reuse,
            group_size=group_size,
            seed=seed,
            **kwargs,
        )
        if self.batched:
            check_lowrank_model(model)

    def _noise_layout(self) -> NoiseLayout:
        """Lay out one draw: ``A`` and ``B`` per matrix, full noise per other (unfrozen) parameter."""
        norm_params = {
            id(p)
            for m in self.model.modules()
            if isinstance(m, nn.LayerNorm)
            for p in m.parameters(recurse=False)
        }
        named = dict(self.model.named_parameters())
        self.param_names = {named[s.name]: s.name for s in self._params.specs}
        lowrank, frozen, sizes = set(), set(), {}
        for s in self._params.specs:
            if len(s.shape) == 2 and id(named[s.name]) not in norm_params:
                lowrank.add(s.name)
                sizes[s.name + ":A"] = s.shape[0] * self.rank
                sizes[s.name + ":B"] = s.shape[1] * self.rank
            elif self.freeze_nonlora:
                frozen.add(s.name)
                self.frozen_slices.append(s.slice)
            else:
                sizes[s.name] = s.numel
        if not lowrank and self.freeze_nonlora:
            raise ValueError("freeze_nonlora=True but the model has no matrix parameters to train")
        self.lowrank, self.frozen = frozenset(lowrank), frozenset(frozen)
        self.layout = NoiseLayout.from_sizes(sizes)
        return self.layout

    def sample_perturbations(self, population_size: int) -> LowRankPerturbations:
        """Return this generation's low-rank factors (one noise row per draw)."""
        half, full = self._draw_noise()
        return LowRankPerturbations(
            full,
            self.layout,
            self._params.specs,
            self.lowrank,
            self.frozen,
            self.rank,
            self.sigma,
            self.draw_index,
            self.signs,
            self._params.numel,
            # The CPU kernel reads member j's row at j * width of the flat float16 copy.
            source=None if half.device.type != "cpu" else (half.view(-1), self._row_starts(half)),
        )

    def _row_starts(self, half: torch.Tensor) -> torch.Tensor:
        return torch.arange(half.shape[0], dtype=torch.int64) * half.shape[1]

    def make_population(self, perturbations: Any, indices: torch.Tensor) -> Population:
        """Return the low-rank batched model of the members ``indices``."""
        return LowRankPopulation(perturbations, self.param_names, **self._population_kwargs(indices))

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "rank": self.rank, "freeze_nonlora": self.freeze_nonlora}
