"""Training presets: one TOML file per environment in ``envs/``, plus announced defaults.

A preset file is ``envs/<ENV_ID>.toml`` (``/`` in namespaced ids becomes ``__``)::

    env_id = "CartPole-v1"
    tuned = false              # true once the values below were measured to solve the env
    target = 475.0             # mean evaluation return that counts as solved (omit: env spec's)
    notes = "..."
    reference = "..."          # a published result to compare with (shown by `eggroll-rl envs`)

    [env_kwargs]               # keyword arguments of gym.make(env_id, ...), e.g. continuous = true
    [trainer]                  # TrainerSettings
    [rollout]                  # RolloutSettings
    [policy]                   # PolicySettings
    [eval]                     # EvalSettings
    [run]                      # RunSettings
    [measured]                 # Measured: filled in by tuning, never read by training

Every key has a default (the dataclasses below), so an env with no preset trains on the
defaults and a preset lists only what it changes. TOML has no null: an omitted optional key is
None. Overrides (``--set key=value``) use the same schema, addressed as ``section.key``, a bare
``key`` when it is unique among the run sections, or a top-level key; ``env_kwargs.NAME=value``
sets (``none``: removes) one keyword argument of the env, its value read as TOML.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from eggroll_rl.atomic import atomic_write_text

__all__ = [
    "SECTIONS",
    "EvalSettings",
    "Measured",
    "PolicySettings",
    "Preset",
    "PresetError",
    "RolloutSettings",
    "RunSettings",
    "TrainerSettings",
    "apply_overrides",
    "check_env_id",
    "default_presets_dir",
    "dependency_hint",
    "dump_preset",
    "list_presets",
    "load_preset",
    "preset_keys",
    "preset_path",
    "save_preset",
    "similar_env_ids",
    "split_env_id",
]

PRESETS_DIR_ENV = "EGGROLL_RL_PRESETS_DIR"

Algorithm = Literal["eggroll", "vanilla"]
Shaping = Literal["centered_rank", "zscore"]
Optimizer = Literal["sgd", "adam", "adamw"]
# These mirror policies.ACTIVATIONS, rollout.BACKENDS, rollout.CRN_MODES, core.OPTIMIZERS and shaping.SHAPERS
# (tests keep them in sync) so that reading a preset never imports torch-heavy modules.
Activation = Literal["tanh", "relu", "elu", "gelu", "silu", "leaky_relu", "sigmoid", "softsign", "identity"]
Backend = Literal["auto", "sync", "async", "vector_entry_point", "envpool"]
Crn = Literal["population", "pair"]
Device = Literal["auto", "cpu", "cuda"]


class PresetError(ValueError):
    """A preset or override that cannot be used; the message is one readable line."""


@dataclass(frozen=True)
class TrainerSettings:
    """Hyperparameters of the ES trainer (the names map onto the trainer constructors)."""

    algorithm: Algorithm = "eggroll"  # eggroll (low-rank) or vanilla (full-rank Gaussian)
    population: int = 128  # members per generation
    sigma: float = 0.1  # noise scale
    lr: float = 0.05  # learning rate of the optimizer step
    rank: int = 1  # EGGROLL perturbation rank (ignored by vanilla)
    noise_reuse: int = 2  # 0: independent members; 2: antithetic pairs (+E, -E share a draw)
    group_size: int = 0  # 0: global fitness shaping; G: shape within groups of G members
    fitness_shaping: Shaping = "centered_rank"
    optimizer: Optimizer = "adam"
    weight_decay: float = 0.0
    generations: int = 300  # budget; training stops earlier once the target is reached
    seed: int = 0
    lr_decay: float = 1.0  # lr multiplied by this after every generation
    sigma_decay: float = 1.0  # sigma multiplied by this after every generation
    freeze_nonlora: bool = False  # EGGROLL: perturb and update only weight matrices
    top_directions: int = 0  # ARS top-b: step along the b best antithetic pairs only; 0: all


@dataclass(frozen=True)
class RolloutSettings:
    """How each member's fitness is measured."""

    episodes_per_member: int = 1  # fitness = mean return over this many episodes
    max_episode_steps: int | None = None  # the run's cap, evaluations included; None: the env spec's limit
    train_max_episode_steps: int | None = None  # training episodes only; None: max_episode_steps
    # Horizon curriculum: only generations 0 .. N-1 cap training episodes at train_max_episode_steps,
    # later ones play them to max_episode_steps; 0: every generation uses the training cap.
    train_cap_generations: int = 0
    backend: Backend = "auto"  # auto: the env's own vector implementation if any, else sync
    obs_norm_fraction: float = 0.01  # share of sub-envs whose observations feed the normaliser
    reward_shift: float = 0.0  # ARS's shift: subtracted from every training reward (evaluations: none)
    crn: Crn = "population"  # members sharing start states: all, or each noise draw's (antithetic pair)


@dataclass(frozen=True)
class PolicySettings:
    """The policy network; passed as keyword arguments to ``policies.make_policy``."""

    hidden_sizes: tuple[int, ...] = (32, 32)  # () is a linear policy
    activation: Activation = "tanh"
    normalize_obs: bool = True  # running mean/std observation normaliser stored in the policy


@dataclass(frozen=True)
class EvalSettings:
    """Periodic evaluation of the center policy on fresh episodes."""

    every: int = 10  # generations between evaluations; 0: only after training
    episodes: int = 100  # episodes per evaluation (the solved test averages over these)
    stop_on_target: bool = True  # stop training once an evaluation reaches the target
    # Stop only when the evaluation's mean clears the target by this many standard errors
    # (mean - stop_margin_se * std / sqrt(episodes) >= target): a lower confidence bound, so a
    # center whose returns vary a lot is not stopped on a lucky evaluation (0: the mean alone).
    stop_margin_se: float = 0.0
    # Stop only when a second evaluation of the same center, on fresh episodes, clears the target
    # too: the stopping evaluation is the first of many tries to pass, so its mean overstates the
    # center's; a center that fails the confirmation trains on.
    confirm: bool = False
    # Also evaluate every generation whose mean training fitness reaches this value: a cheap
    # signal that the center may be solved, so short runs need not wait for the next `every`.
    from_fitness: float | None = None
    # Screen the evaluations that `from_fitness` triggers: first play this many fresh episodes
    # and run the full `episodes` only when their mean reaches the target (0: no screen).
    screen_episodes: int = 0


@dataclass(frozen=True)
class RunSettings:
    """Budget and bookkeeping of one training run."""

    max_seconds: float | None = None  # wall-clock budget; None: only the generation budget
    checkpoint_every: int = 25  # generations between checkpoints; 0: only on exit
    device: Device = "auto"  # auto: cuda when available, else cpu


@dataclass(frozen=True)
class Measured:
    """What tuning measured with this preset (median over seeds); informational only."""

    seconds: float | None = None  # wall-clock to solve (training and evaluations)
    env_steps: int | None = None  # env steps to solve
    generations: int | None = None  # generations to solve
    eval_mean: float | None = None  # final evaluation mean return
    eval_std: float | None = None
    eval_episodes: int | None = None
    seeds: int | None = None  # how many seeds were measured
    solved_seeds: int | None = None  # how many of them solved
    machine: str = ""  # e.g. "2 CPU cores"
    date: str = ""


SECTIONS: dict[str, type] = {
    "trainer": TrainerSettings,
    "rollout": RolloutSettings,
    "policy": PolicySettings,
    "eval": EvalSettings,
    "run": RunSettings,
    "measured": Measured,
}
# Sections that configure a run; bare keys resolve only here, so "generations" means the budget,
# not what tuning measured.
RUN_SECTIONS = ("trainer", "rollout", "policy", "eval", "run")
TOP_LEVEL = ("env_id", "tuned", "target", "notes", "reference")
ENV_KWARGS = "env_kwargs"  # the [env_kwargs] table: gym.make keyword arguments
ALIASES = {
    "trainer": "trainer.algorithm",
    "learning_rate": "trainer.lr",
    "population_size": "trainer.population",
    "hidden": "policy.hidden_sizes",
    "episodes_per_eval": "eval.episodes",
}


@dataclass(frozen=True)
class Preset:
    """A complete training configuration for one environment."""

    env_id: str
    tuned: bool = False
    target: float | None = None  # None: the env spec's reward_threshold
    notes: str = ""
    reference: str = ""  # a published baseline, e.g. "ARS (rl-baselines3-zoo): 355.3 in 2M steps"
    # Keyword arguments of gym.make(env_id, ...) for every env the run makes (training,
    # evaluation, the agent's eval and video): part of the task, recorded in the agent's config.
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    run: RunSettings = field(default_factory=RunSettings)
    measured: Measured = field(default_factory=Measured)
    # Provenance, not schema: where the values came from and which keys were overridden.
    source: Path | None = field(default=None, compare=False)
    overridden: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_default(self) -> bool:
        """Return whether no preset file was found (the announced defaults apply)."""
        return self.source is None

    def get(self, key: str) -> Any:
        """Return the value of a key given as ``section.key`` or a top-level key."""
        section, name = _resolve_key(key)
        return getattr(self if section is None else getattr(self, section), name)

    def to_dict(self) -> dict[str, Any]:
        """Return the schema values as plain TOML/JSON data (tuples become lists)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in TOP_LEVEL}
        out[ENV_KWARGS] = dict(self.env_kwargs)
        for section in SECTIONS:
            out[section] = {
                f.name: _plain(getattr(getattr(self, section), f.name))
                for f in dataclasses.fields(SECTIONS[section])
            }
        return out

    def flat(self) -> dict[str, Any]:
        """Return every run key as ``{"section.key": value}`` (for tables and diffs)."""
        data = self.to_dict()
        out = {name: data[name] for name in (*TOP_LEVEL, ENV_KWARGS)}
        for section in SECTIONS:
            out.update({f"{section}.{k}": v for k, v in data[section].items()})
        return out

    def to_config(self) -> dict[str, Any]:
        """Return the resolved run config recorded in an agent's ``config.json``."""
        from eggroll_rl.agents import library_version

        data = self.to_dict()
        # They describe the preset, not this run.
        del data["measured"], data["notes"], data["tuned"], data["reference"]
        return {
            **data,
            "preset": None if self.source is None else self.source.name,
            "overrides": list(self.overridden),
            "version": library_version(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "config") -> Preset:
        """Build a validated preset from TOML/JSON data (a preset file or an agent's config)."""
        return _from_mapping(data, origin=origin, ignore=("preset", "overrides", "version"))

    def validate(self) -> Preset:
        """Check value ranges and consistency; raise PresetError naming the key; return self."""
        _validate(self)
        return self


# --------------------------------------------------------------------------------------------
# Schema introspection and coercion


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def preset_keys(*, include_measured: bool = True) -> list[str]:
    """Return every addressable key (``section.key`` and top-level) in schema order."""
    keys = list(TOP_LEVEL)
    for section, cls in SECTIONS.items():
        if section == "measured" and not include_measured:
            continue
        keys.extend(f"{section}.{f.name}" for f in dataclasses.fields(cls))
    return keys


def _leaf_index() -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for section in RUN_SECTIONS:
        for f in dataclasses.fields(SECTIONS[section]):
            index.setdefault(f.name, []).append(f"{section}.{f.name}")
    return index


def _resolve_key(key: str) -> tuple[str | None, str]:
    """Map a user-given key onto (section or None, field name); raise PresetError if unknown."""
    norm = key.strip().replace("-", "_")
    norm = ALIASES.get(norm, norm)
    if norm in TOP_LEVEL:
        return None, norm
    if "." in norm:
        section, _, name = norm.partition(".")
        if section in SECTIONS and name in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            return section, name
    else:
        matches = _leaf_index().get(norm, [])
        if len(matches) == 1:
            section, _, name = matches[0].partition(".")
            return section, name
        if len(matches) > 1:
            raise PresetError(f"key {key!r} is ambiguous; use one of {', '.join(matches)}")
    candidates = [*preset_keys(), *_leaf_index(), *ALIASES]
    close = difflib.get_close_matches(norm, candidates, n=3, cutoff=0.6)
    if not close and "." in norm:
        close = difflib.get_close_matches(norm.rpartition(".")[2], candidates, n=3, cutoff=0.6)
    hint = (
        f"; did you mean {', '.join(close)}?"
        if close
        else f"; valid keys: {', '.join(preset_keys(include_measured=False))}"
    )
    raise PresetError(f"unknown key {key!r}{hint}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _describe(tp: Any) -> str:
    """Name a schema type the way a user would read it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{_describe(inner[0])} or none"
    if origin is tuple:
        return "a list of integers (e.g. 64,64)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(key: str, value: Any, tp: Any, *, text: bool) -> Any:
    """Convert ``value`` to schema type ``tp``; ``text`` means it came from a command line."""

    def fail() -> typing.NoReturn:
        raise PresetError(f"{key}: expected {_describe(tp)}, got {value!r}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (
            text and isinstance(value, str) and value.strip().lower() in {"", "none", "null"}
        ):
            return None
        inner = next(a for a in args if a is not type(None))
        try:
            return _coerce(key, value, inner, text=text)
        except PresetError:
            fail()  # re-raised so the message says "or none"
    if origin is Literal:
        if not isinstance(value, str):
            fail()
        choice = value.strip().lower().replace("-", "_")
        if choice not in args:
            close = difflib.get_close_matches(choice, args, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PresetError(f"{key}: expected one of {', '.join(args)}, got {value!r}{hint}")
        return choice
    if origin is tuple:
        if text and isinstance(value, str):
            body = value.strip().strip("()[]").replace(",", " ").split()
            try:
                return tuple(int(v) for v in body)
            except ValueError:
                fail()
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, list | tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return tuple(value)
        fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
        fail()
    if tp in (int, float):
        # An int is a valid float; a float is not a valid int; bools are neither.
        numeric = int if tp is int else int | float
        if isinstance(value, numeric) and not isinstance(value, bool):
            return tp(value)
        if text and isinstance(value, str):
            try:
                return tp(value.strip())
            except ValueError:
                fail()
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    raise TypeError(f"unsupported schema type {tp!r} for {key}")  # a schema bug, not user input


# --------------------------------------------------------------------------------------------
# Building, overriding, validating


def _from_mapping(
    data: Mapping[str, Any], *, origin: str, ignore: Iterable[str] = (), env_id: str | None = None
) -> Preset:
    """Build a Preset from nested TOML/JSON data with strict types; ``origin`` prefixes errors."""

    def err(message: str) -> PresetError:
        return PresetError(f"{origin}: {message}")

    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    top_types = _field_types(Preset)
    skip = set(ignore)
    for key, value in data.items():
        if key in skip:
            continue
        if key in SECTIONS:
            if not isinstance(value, Mapping):
                raise err(f"[{key}] must be a table, got {type(value).__name__}")
            cls = SECTIONS[key]
            types_ = _field_types(cls)
            kwargs = {}
            for name, item in value.items():
                if name not in types_:
                    close = difflib.get_close_matches(name, list(types_), n=3)
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    raise err(f"unknown key {key}.{name}{hint}")
                try:
                    kwargs[name] = _coerce(f"{key}.{name}", item, types_[name], text=False)
                except PresetError as exc:
                    raise err(str(exc)) from None
            sections[key] = cls(**kwargs)
        elif key in TOP_LEVEL:
            try:
                top[key] = _coerce(key, value, top_types[key], text=False)
            except PresetError as exc:
                raise err(str(exc)) from None
        elif key == ENV_KWARGS:
            try:
                top[key] = check_env_kwargs(value)
            except PresetError as exc:
                raise err(str(exc)) from None
        else:
            close = difflib.get_close_matches(key, [*TOP_LEVEL, ENV_KWARGS, *SECTIONS], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise err(f"unknown key {key!r}{hint}")
    top.setdefault("env_id", env_id)
    if not top["env_id"]:
        raise err("missing env_id")
    if env_id is not None and top["env_id"] != env_id:
        raise err(f"env_id is {top['env_id']!r} but the file is for {env_id!r}")
    preset = Preset(**top, **sections)
    try:
        return preset.validate()
    except PresetError as exc:
        raise err(str(exc)) from None


def apply_overrides(preset: Preset, overrides: Iterable[str] | Mapping[str, Any]) -> Preset:
    """Return a copy of ``preset`` with overrides applied, coerced and validated.

    ``overrides`` is either ``["key=value", ...]`` (strings from ``--set``; values parsed by the
    key's type: ``true``, ``64,64``, ``none``) or a mapping of keys to values (typed flags). Keys
    are ``section.key``, a bare key unique among the run sections (``sigma``), or top-level
    (``target``). ``env_id`` cannot be overridden.
    """
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise PresetError(f"override {item!r} is not key=value (e.g. trainer.sigma=0.2)")
            items.append((key, value))

    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    env_kwargs = dict(preset.env_kwargs)
    applied = list(preset.overridden)
    for key, value in items:
        if key.strip().startswith(ENV_KWARGS + "."):
            name = _kwarg_name(key.strip()[len(ENV_KWARGS) + 1 :])
            parsed = _parse_env_kwarg(value) if isinstance(value, str) else value
            if parsed is None:
                env_kwargs.pop(name, None)
            else:
                env_kwargs[name] = _env_kwarg(name, parsed)
            top[ENV_KWARGS] = env_kwargs
            if f"{ENV_KWARGS}.{name}" not in applied:
                applied.append(f"{ENV_KWARGS}.{name}")
            continue
        section, name = _resolve_key(key)
        full = name if section is None else f"{section}.{name}"
        if full == "env_id":
            raise PresetError("env_id cannot be overridden; pass the env id as the argument")
        cls = Preset if section is None else SECTIONS[section]
        coerced = _coerce(full, value, _field_types(cls)[name], text=isinstance(value, str))
        (top if section is None else sections.setdefault(section, {}))[name] = coerced
        if full not in applied:
            applied.append(full)
    for section, changes in sections.items():
        top[section] = dataclasses.replace(getattr(preset, section), **changes)
    return dataclasses.replace(preset, **top, overridden=tuple(applied)).validate()


def check_env_kwargs(value: Any) -> dict[str, Any]:
    """Return ``value`` as ``env_kwargs``: a table of keyword argument names to TOML values."""
    if not isinstance(value, Mapping):
        raise PresetError(f"[{ENV_KWARGS}] must be a table, got {type(value).__name__}")
    return {_kwarg_name(str(name)): _env_kwarg(str(name), item) for name, item in value.items()}


def _kwarg_name(name: str) -> str:
    """Return ``name`` if it can be a keyword argument; raise PresetError naming it otherwise."""
    if not name.isidentifier():
        raise PresetError(f"{ENV_KWARGS}.{name}: the name must be a keyword argument name")
    return name


def _env_kwarg(name: str, value: Any) -> Any:
    """Check one ``env_kwargs`` value: a TOML scalar or a list of them."""
    scalar = (bool, int, float, str)
    if isinstance(value, scalar) or (
        isinstance(value, list | tuple) and all(isinstance(v, scalar) for v in value)
    ):
        if isinstance(value, float) and not math.isfinite(value):
            raise PresetError(f"{ENV_KWARGS}.{name}: expected a finite number, got {value!r}")
        return list(value) if isinstance(value, tuple) else value
    raise PresetError(
        f"{ENV_KWARGS}.{name}: expected a boolean, number, string or a list of them, got {value!r}"
    )


def _parse_env_kwarg(text: str) -> Any:
    """Read a command-line value as TOML (``true``, ``0.5``, ``[1, 2]``, ``"x"``); else a bare string."""
    stripped = text.strip()
    if stripped.lower() in {"none", "null"}:
        return None
    try:
        return tomllib.loads(f"v = {stripped}")["v"]
    except tomllib.TOMLDecodeError:
        return stripped


def _validate(p: Preset) -> None:
    """Raise PresetError for the first out-of-range or inconsistent value, naming its key."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise PresetError(f"{key}: {message}, got {p.get(key)!r}")

    def finite(key: str) -> bool:
        value = p.get(key)
        return value is None or math.isfinite(value)

    t, r, pol, ev, run, m = p.trainer, p.rollout, p.policy, p.eval, p.run, p.measured
    need(bool(p.env_id), "env_id", "must be a non-empty env id")
    need(finite("target"), "target", "must be a finite number or none")
    need(t.population >= 2, "trainer.population", "must be >= 2")
    need(finite("trainer.sigma") and t.sigma > 0, "trainer.sigma", "must be > 0")
    need(finite("trainer.lr") and t.lr > 0, "trainer.lr", "must be > 0")
    need(t.rank >= 1, "trainer.rank", "must be >= 1")
    need(
        t.noise_reuse in (0, 2),
        "trainer.noise_reuse",
        "must be 0 (independent members) or 2 (antithetic pairs)",
    )
    if t.noise_reuse:
        need(
            t.population % t.noise_reuse == 0,
            "trainer.population",
            f"must be divisible by trainer.noise_reuse = {t.noise_reuse}",
        )
    need(t.group_size == 0 or t.group_size >= 2, "trainer.group_size", "must be 0 (global shaping) or >= 2")
    if t.group_size:
        need(
            t.population % t.group_size == 0,
            "trainer.population",
            f"must be divisible by trainer.group_size = {t.group_size}",
        )
    if t.group_size and t.noise_reuse:
        need(
            t.group_size % t.noise_reuse == 0,
            "trainer.group_size",
            f"must be a multiple of trainer.noise_reuse = {t.noise_reuse} (pairs share a group)",
        )
    need(finite("trainer.weight_decay") and t.weight_decay >= 0, "trainer.weight_decay", "must be >= 0")
    need(t.generations >= 1, "trainer.generations", "must be >= 1")
    need(0 <= t.seed < 2**63, "trainer.seed", "must be in [0, 2**63)")
    need(0 < t.lr_decay <= 1, "trainer.lr_decay", "must be in (0, 1]")
    need(0 < t.sigma_decay <= 1, "trainer.sigma_decay", "must be in (0, 1]")
    if t.top_directions:
        need(t.noise_reuse == 2, "trainer.noise_reuse", "must be 2 (antithetic pairs) with top_directions")
        need(t.group_size == 0, "trainer.group_size", "must be 0 with top_directions")
        need(
            1 <= t.top_directions <= t.population // 2,
            "trainer.top_directions",
            f"must be 0 (all) or in [1, population/2 = {t.population // 2}]",
        )
    need(
        finite("rollout.obs_norm_fraction") and 0 < r.obs_norm_fraction <= 1,
        "rollout.obs_norm_fraction",
        "must be in (0, 1]",
    )
    need(finite("rollout.reward_shift"), "rollout.reward_shift", "must be a finite number")
    need(r.episodes_per_member >= 1, "rollout.episodes_per_member", "must be >= 1")
    need(
        r.max_episode_steps is None or r.max_episode_steps >= 1,
        "rollout.max_episode_steps",
        "must be >= 1 or none",
    )
    need(
        r.train_max_episode_steps is None or r.train_max_episode_steps >= 1,
        "rollout.train_max_episode_steps",
        "must be >= 1 or none",
    )
    need(r.train_cap_generations >= 0, "rollout.train_cap_generations", "must be >= 0 (0: every generation)")
    need(
        not r.train_cap_generations or r.train_max_episode_steps is not None,
        "rollout.train_cap_generations",
        "needs rollout.train_max_episode_steps (the cap of those generations)",
    )
    if r.train_max_episode_steps is not None and r.max_episode_steps is not None:
        need(
            r.train_max_episode_steps <= r.max_episode_steps,
            "rollout.train_max_episode_steps",
            f"must be <= rollout.max_episode_steps = {r.max_episode_steps} (the cap evaluations use; "
            "lower it too, or set it to none)",
        )
    need(all(h >= 1 for h in pol.hidden_sizes), "policy.hidden_sizes", "every layer needs >= 1 unit")
    need(ev.every >= 0, "eval.every", "must be >= 0 (0: evaluate only after training)")
    need(
        not (p.env_kwargs and r.backend == "envpool"),
        "rollout.backend",
        f"cannot be envpool with env_kwargs {dict(p.env_kwargs)} (gym.make's keyword arguments; envpool "
        "takes its own): use auto or sync",
    )
    need(ev.screen_episodes >= 0, "eval.screen_episodes", "must be >= 0 (0: no screen)")
    need(
        math.isfinite(ev.stop_margin_se) and ev.stop_margin_se >= 0,
        "eval.stop_margin_se",
        "must be a finite number >= 0 (0: the evaluation's mean alone decides)",
    )
    need(ev.episodes >= 1, "eval.episodes", "must be >= 1")
    need(
        run.max_seconds is None or (math.isfinite(run.max_seconds) and run.max_seconds > 0),
        "run.max_seconds",
        "must be > 0 or none",
    )
    need(run.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0")
    for name in ("seconds", "env_steps", "generations", "eval_episodes", "seeds", "solved_seeds"):
        value = getattr(m, name)
        need(value is None or (math.isfinite(value) and value >= 0), f"measured.{name}", "must be >= 0")
    for name in ("eval_mean", "eval_std"):
        need(finite(f"measured.{name}"), f"measured.{name}", "must be finite")
    if p.tuned:
        # A tuned preset is a claim; it must carry the measurement that backs it.
        for name in ("seconds", "env_steps"):
            need(getattr(m, name) is not None, f"measured.{name}", "is required when tuned = true")


# --------------------------------------------------------------------------------------------
# Files


def default_presets_dir() -> Path | None:
    """Return the presets directory: $EGGROLL_RL_PRESETS_DIR, the repo's envs/, or ./envs."""
    env = os.environ.get(PRESETS_DIR_ENV)
    if env:
        return Path(env)
    # A source checkout or editable install keeps envs/ beside the package; an installed wheel
    # does not ship it, so fall back to the working directory's envs/.
    for candidate in (Path(__file__).resolve().parent.parent / "envs", Path.cwd() / "envs"):
        if candidate.is_dir():
            return candidate
    return None


def preset_path(env_id: str, presets_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the file a preset for ``env_id`` lives in (None when there is no presets dir)."""
    directory = Path(presets_dir) if presets_dir is not None else default_presets_dir()
    if directory is None:
        return None
    return directory / (env_id.replace("/", "__") + ".toml")


def _read_preset_file(path: Path, env_id: str | None) -> Preset:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path}: invalid TOML ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"{path}: cannot read ({exc})") from exc
    preset = _from_mapping(data, origin=str(path), env_id=env_id)
    return dataclasses.replace(preset, source=path)


def load_preset(env_id: str, presets_dir: str | os.PathLike[str] | None = None) -> Preset:
    """Return the preset for ``env_id``, or the defaults (``is_default``) when it has none.

    A preset file naming ``rollout.backend = "envpool"`` when envpool is not installed gets the
    ``sync`` backend instead, with one RuntimeWarning (an override of the backend, applied after
    this, still fails without envpool).
    """
    path = preset_path(env_id, presets_dir)
    if path is None or not path.is_file():
        return Preset(env_id=env_id).validate()
    return _installed_backend(_read_preset_file(path, env_id))


def _installed_backend(preset: Preset) -> Preset:
    """Return ``preset`` with its envpool backend replaced by ``sync`` if envpool is missing."""
    if preset.rollout.backend != "envpool":
        return preset
    from eggroll_rl.rollout import _import_envpool

    try:
        _import_envpool()
    except ImportError:
        warnings.warn(
            f"{preset.env_id}'s preset uses rollout.backend=envpool, which is not installed "
            "(pip install 'eggroll-rl[envpool]'): training on backend=sync instead, so the run "
            "differs from the preset's [measured] numbers",
            RuntimeWarning,
            stacklevel=3,
        )
        return dataclasses.replace(preset, rollout=dataclasses.replace(preset.rollout, backend="sync"))
    return preset


def list_presets(presets_dir: str | os.PathLike[str] | None = None) -> list[Preset]:
    """Return every preset in the presets directory, sorted by env id."""
    directory = Path(presets_dir) if presets_dir is not None else default_presets_dir()
    if directory is None or not directory.is_dir():
        return []
    presets = []
    for path in sorted(directory.glob("*.toml")):
        presets.append(_read_preset_file(path, path.stem.replace("__", "/")))
    return sorted(presets, key=lambda p: p.env_id.lower())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _omitted(value: Any) -> bool:
    # TOML has no null, and every optional or string key defaults to None or "": leaving them
    # out reads back as the same value.
    return value is None or value == ""


def dump_preset(preset: Preset, *, only_changed: bool = False) -> str:
    """Render a preset as TOML (None values omitted; ``only_changed`` drops defaults)."""
    data = preset.to_dict()
    defaults = Preset(env_id=preset.env_id).to_dict()
    lines = []
    for name in TOP_LEVEL:
        value = data[name]
        if _omitted(value) or (only_changed and name != "env_id" and value == defaults[name]):
            continue
        lines.append(f"{name} = {_toml_value(value)}")
    if data[ENV_KWARGS]:
        lines += ["", f"[{ENV_KWARGS}]", *(f"{k} = {_toml_value(v)}" for k, v in data[ENV_KWARGS].items())]
    for section in SECTIONS:
        body = [
            f"{k} = {_toml_value(v)}"
            for k, v in data[section].items()
            if not _omitted(v) and not (only_changed and v == defaults[section][k])
        ]
        if body:
            lines += ["", f"[{section}]", *body]
    return "\n".join(lines) + "\n"


def save_preset(preset: Preset, path: str | os.PathLike[str] | None = None) -> Path:
    """Write a preset as TOML atomically (default: its own file in the presets directory)."""
    target = Path(path) if path is not None else (preset.source or preset_path(preset.env_id))
    if target is None:
        raise PresetError("no presets directory; pass a path")
    atomic_write_text(target, dump_preset(preset.validate()))
    return target


# --------------------------------------------------------------------------------------------
# Env ids


def split_env_id(env_id: str) -> str:
    """Return the registry id of ``env_id``, importing ``module`` first for ``module:EnvId``.

    ``module:EnvId`` is Gymnasium's own form (``gym.make`` accepts it): importing the module
    registers the env. Raises PresetError (one line) when the module cannot be imported.
    """
    if ":" not in env_id:
        return env_id
    import importlib

    module, _, name = env_id.partition(":")
    try:
        importlib.import_module(module)
    except Exception as exc:  # the user's module may fail in any way while registering
        raise PresetError(
            f"env id {env_id!r}: cannot import module {module!r} ({type(exc).__name__}: {exc})"
        ) from None
    return name


# Which of our extras (or which package) brings what an environment family needs.
_EXTRAS = {"box2d": "pip install 'eggroll-rl[box2d]'", "mujoco": "pip install 'eggroll-rl[mujoco]'"}
_PACKAGES = {"jax": "pip install jax", "envpool": "pip install 'eggroll-rl[envpool]'"}


def dependency_hint(exc: BaseException) -> str:
    """Turn a missing-dependency error into one line naming what to install."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    lowered = f"{first} {getattr(exc, 'name', '') or ''}".lower()
    for key, command in {**_EXTRAS, **_PACKAGES}.items():
        if key in lowered:
            return f"needs {key}, which is not installed: {command} ({first})"
    return f"a dependency is missing: {first}"


def _missing_dependency(env_id: str) -> str | None:
    """Return what ``env_id`` needs that is not installed (None when its entry point imports)."""
    import importlib

    import gymnasium as gym

    entry = gym.registry[env_id].entry_point
    if not isinstance(entry, str):
        return None
    try:
        importlib.import_module(entry.partition(":")[0])
    except (ImportError, gym.error.DependencyNotInstalled) as exc:
        return dependency_hint(exc)
    except Exception:  # anything else is the env's own business, reported when it is made
        return None
    return None


def similar_env_ids(env_id: str, candidates: Iterable[str] | None = None) -> list[str]:
    """Return up to three ids close to ``env_id`` that can run here (default: gymnasium's registry).

    Registry ids whose dependencies are missing (``phys2d/*`` without jax) are left out.
    """
    import gymnasium as gym

    registry = candidates is None
    names = list(gym.registry if candidates is None else candidates)
    close = difflib.get_close_matches(env_id, names, n=10, cutoff=0.5)
    if not close:  # a case slip ("cartpole-v1") is too far for difflib on the raw strings
        lowered = {k.lower(): k for k in names}
        close = [lowered[k] for k in difflib.get_close_matches(env_id.lower(), lowered, n=10)]
    if registry:
        close = [c for c in close if _missing_dependency(c) is None]
    return close[:3]


def check_env_id(env_id: str) -> None:
    """Raise PresetError unless ``env_id`` (or ``module:EnvId``) is registered and can run here.

    The message suggests close matches for an unknown id, and names what to install for an id
    whose dependencies are missing.
    """
    import gymnasium as gym

    name = split_env_id(env_id)
    if name in gym.registry:
        missing = _missing_dependency(name)
        if missing is not None:
            raise PresetError(f"{env_id} {missing}")
        return
    close = similar_env_ids(name)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise PresetError(f"unknown environment {env_id!r}{hint}")
