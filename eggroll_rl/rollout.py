"""Gymnasium rollouts: vector-env construction, the population rollout fitness, and evaluation.

Every episode loop here is `run_episodes`, a work-conserving engine: the owed episodes (member,
reset seed) are dealt to a pool of env slots (the vector env's sub-envs), a slot takes the next
owed episode as soon as its own ends, and each iteration forwards only the rows of live episodes
(``population(x, members=rows)``: any mix of members in one batch) and steps only their sub-envs
where the backend allows it:

- `SyncVectorEnv` (the ``sync`` backend, and ``auto`` for envs without a native vector env): its
  sub-envs are stepped one by one, only those with a live episode;
- envpool (`EnvpoolVectorEnv`): ``step(actions, env_id)`` steps only the live sub-envs, on
  envpool's own threads;
- any other vector env (the native CartPole, ``async``, a user's VectorEnv) steps all
  its sub-envs at each iteration; sub-envs without an episode repeat their last action and are
  ignored (cheap where stepping is vectorised or runs on other threads/processes).

Stepping and the forward run one after the other. Overlapping them was measured and did not pay
on 2 cores (LunarLander-v3, the shipped agent's policy perturbed with sigma 0.3, N = 128 and
256, paired medians over 4-8 interleaved repeats on the loaded VM; the envpool pipeline is
commit 6c4a2f9):

- envpool, the slots split in two halves and pipelined (envpool steps one half by
  ``send(actions, env_id)`` while this thread forwards the other; its synchronous mode, so the
  results were bit-identical, tested): 0.73-0.85x the sequential rate at N = 128, 0.85-0.91x at
  N = 256 over three runs (0.66-0.77x with ``num_threads=1``). envpool's two threads fill both cores: ``send``
  itself returned only when the step was nearly done (3.3-4.4 ms of a 3.7 ms step of 128
  sub-envs; 0.18 ms with one envpool thread), and the forward is 8-10 % of the rollout (the
  step ~86 %), so there is no idle core to hide it on, and the extra send/recv per iteration
  costs more than it hides. envpool's asynchronous mode (``batch_size < num_envs``) shares those
  cores too, and hands slots their next episodes in thread-timing order (results would depend on
  timing), so it was not built.
- a second Python thread beside a `SyncVectorEnv` (the same pipeline, one half's sub-envs
  stepped by a one-thread executor; results identical): 0.97x at N = 128, 0.84x at N = 256 (one
  run, 4 repeats). The forward, the only part that releases the GIL, is 3-4 % of the rollout
  (the rest is Python stepping the sub-envs under the GIL), so at most ~3 % could be hidden.
- `AsyncVectorEnv` (worker processes): raw LunarLander stepping at 1.2k / 1.5k sub-env steps/s
  with 8 / 32 sub-envs against 5.9k / 8.5k for `SyncVectorEnv` (a pipe round trip per sub-env
  and step, on 2 cores): it stays opt-in (``backend="async"``), never ``auto``.

Returns are float64 sums of each episode's own rewards, exact under every autoreset mode: a
sub-env starting a new episode is always reset explicitly with that episode's seed.

Seeding (common random numbers). `RolloutFitness` owes episode ``i * k + j`` for local member
``i``'s episode ``j`` (``k = episodes_per_member``) and resets it with
``episode_seed(seed, g, j)`` at generation ``g``, the same for every member, so all members (in
particular an antithetic pair and a shaping group) start their ``j``-th episode from the same
state, whichever slot plays it, and the states change every generation. With ``crn="pair"``
only members that share a noise draw (an antithetic pair: ``noise_reuse`` consecutive members)
share start states: draw ``d``'s ``j``-th episode starts from ``episode_seed(seed, g, d * k + j)``,
so one generation sees as many start states as draws (as ARS and OpenAI-ES sample them) while
each pair's difference stays free of start-state noise. `CartPoleVectorEnv` (the
native CartPole) only takes one seed for all sub-envs, so its start states are set directly to
what ``CartPole-v1`` reset with the same seed would give. envpool cannot seed a sub-env at reset
(seeds are fixed at construction, sub-env ``i`` gets ``seed + i``): there the start states are not
shared (no common random numbers; a warning says so), but each run is still deterministic.
`evaluate` resets its episode ``e`` with ``derive_seed(1, seed, e)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv

from . import kernels
from .distributed import World
from .noise import reuse_pattern
from .population import BatchedFitness, Population
from .presets import similar_env_ids, split_env_id

__all__ = [
    "BACKENDS",
    "DEFAULT_MAX_EPISODE_STEPS",
    "EnvpoolVectorEnv",
    "EpisodeBatch",
    "EvalResult",
    "RolloutFitness",
    "derive_seed",
    "episode_cap",
    "episode_seed",
    "evaluate",
    "make_vec_env",
    "reset_with_seeds",
    "run_episodes",
]

BACKENDS = ("auto", "sync", "async", "vector_entry_point", "envpool")
CRN_MODES = ("population", "pair")  # which members share start states (common random numbers)
# The episode cap of an env registered without max_episode_steps (a warning says it was applied).
DEFAULT_MAX_EPISODE_STEPS = 1000

# Seed domains, so training, evaluation and sampling streams never coincide.
_TRAIN, _EVAL, _SAMPLE, _ACT, _IDLE = 0, 1, 2, 3, 4

EnvLike = str | gym.envs.registration.EnvSpec | VectorEnv | Callable[[int], VectorEnv]
log = logging.getLogger(__name__)


def derive_seed(*keys: int) -> int:
    """Hash integer keys into a 32-bit seed (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint32)
    return int(state[0])


def episode_seed(seed: int, generation: int, episode: int) -> int:
    """Return the reset seed of every member's `episode`-th episode at `generation`."""
    return derive_seed(_TRAIN, seed, generation, episode)


# -- env construction ---------------------------------------------------------------------------


def _close_matches(name: str, candidates: Any) -> str:
    matches = similar_env_ids(name, candidates)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


def _find_spec(env_id: str | gym.envs.registration.EnvSpec) -> gym.envs.registration.EnvSpec:
    """Look up an env id (``module:Name-vN`` imports the module first) or raise ValueError."""
    if isinstance(env_id, gym.envs.registration.EnvSpec):
        return env_id
    name = split_env_id(env_id)
    try:
        return gym.spec(name)
    except gym.error.Error as exc:
        raise ValueError(
            f"Unknown environment id {env_id!r} ({exc}).{_close_matches(name, gym.registry)}"
        ) from exc


_warned_uncapped: set[str] = set()


def episode_cap(env: str | gym.envs.registration.EnvSpec, max_episode_steps: int | None = None) -> int:
    """Return the episode cap (steps) every rollout of ``env`` uses.

    ``max_episode_steps`` when given, else the spec's ``max_episode_steps``, else
    :data:`DEFAULT_MAX_EPISODE_STEPS` with a one-time warning (an env that never terminates
    would otherwise never end an episode). Raises ValueError for an unknown id or a cap < 1.
    """
    if max_episode_steps is not None:
        if isinstance(max_episode_steps, bool) or int(max_episode_steps) < 1:
            raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}.")
        return int(max_episode_steps)
    spec = _find_spec(env)
    if spec.max_episode_steps is not None:
        return int(spec.max_episode_steps)
    if spec.id not in _warned_uncapped:
        _warned_uncapped.add(spec.id)
        warnings.warn(
            f"{spec.id} is registered without max_episode_steps: capping its episodes at "
            f"{DEFAULT_MAX_EPISODE_STEPS} steps (set max_episode_steps / rollout.max_episode_steps)",
            RuntimeWarning,
            stacklevel=2,
        )
    return DEFAULT_MAX_EPISODE_STEPS


def make_vec_env(
    env: EnvLike,
    num_envs: int,
    *,
    backend: str = "auto",
    autoreset_mode: AutoresetMode | str | None = None,
    max_episode_steps: int | None = None,
    seed: int | None = None,
    **env_kwargs: Any,
) -> VectorEnv:
    """Build a vector env of `num_envs` sub-envs from an id, a factory or an existing VectorEnv.

    `env` is a registered id (including ids the user's code registered, or ``module:Id``), a
    callable ``f(num_envs) -> VectorEnv``, or a VectorEnv (returned as is). Backends: ``auto``
    uses the env's native vector implementation when it has one (CartPole) and otherwise
    ``SyncVectorEnv`` (the choice is logged at INFO); ``sync``/``async``/``vector_entry_point``
    force one; ``envpool`` needs the ``envpool`` extra. `seed` is only used by backends seeded
    at construction (envpool). Episodes are capped at :func:`episode_cap` steps (a
    ``TimeLimit``: truncation).
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {list(BACKENDS)}.")
    if isinstance(env, VectorEnv):
        return _check_num_envs(env, num_envs)
    if callable(env) and not isinstance(env, str | gym.envs.registration.EnvSpec):
        built = env(num_envs)
        if not isinstance(built, VectorEnv):
            raise TypeError(
                f"The env factory must return a gymnasium.vector.VectorEnv, got {type(built).__name__}."
            )
        return _check_num_envs(built, num_envs)
    if not isinstance(env, str | gym.envs.registration.EnvSpec):
        raise TypeError(
            f"env must be an env id, a VectorEnv or a callable returning one, got {type(env).__name__}."
        )
    mode = None if autoreset_mode is None else AutoresetMode(autoreset_mode)
    if backend == "envpool":
        if max_episode_steps is not None:
            env_kwargs["max_episode_steps"] = int(max_episode_steps)
        return _make_envpool(env if isinstance(env, str) else env.id, num_envs, mode, seed, env_kwargs)
    spec = _find_spec(env)
    # One episode cap for every env built from an id: the given one, the spec's, or the default.
    cap = episode_cap(spec, max_episode_steps)
    if cap != spec.max_episode_steps:
        env_kwargs["max_episode_steps"] = cap
    if backend in ("auto", "vector_entry_point") and spec.vector_entry_point is not None:
        vec = gym.make_vec(spec, num_envs, vectorization_mode="vector_entry_point", **env_kwargs)
        native = vec.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if mode is None or AutoresetMode(native) == mode:
            log.info("%s: backend %s -> the env's native vector env", spec.id, backend)
            return vec
        vec.close()
        if backend == "vector_entry_point":
            raise ValueError(
                f"{spec.id}'s native vector env only supports autoreset_mode={native}; "
                f"use backend='sync' for {mode}."
            )
    elif backend == "vector_entry_point":
        raise ValueError(f"{spec.id} has no native vector implementation; use backend='sync'.")
    vectorization = "async" if backend == "async" else "sync"
    # auto: SyncVectorEnv, whose sub-envs the engine steps only while they play an episode, and
    # which seeds every episode (envpool steps faster raw but cannot: see BENCHMARKS.md).
    log.info("%s: backend %s -> %s", spec.id, backend, vectorization)
    vector_kwargs = {} if mode is None else {"autoreset_mode": mode}
    return gym.make_vec(
        spec, num_envs, vectorization_mode=vectorization, vector_kwargs=vector_kwargs, **env_kwargs
    )


def _check_num_envs(env: VectorEnv, num_envs: int) -> VectorEnv:
    if env.num_envs != num_envs:
        raise ValueError(f"The vector env has {env.num_envs} sub-envs but {num_envs} are needed.")
    return env


class EnvpoolVectorEnv(VectorEnv):
    """Adapt an envpool (``env_type="gymnasium"``) pool to the gymnasium VectorEnv API.

    envpool seeds sub-env ``i`` with ``seed + i`` at construction and ignores reset seeds
    (envpool 1.2.5 warns that ``reset(seed=...)`` is ignored), so sub-envs cannot share start
    states (no common random numbers); each sub-env's episodes follow its own seeded stream, so a
    run is still deterministic. It autoresets on the step after an episode ends (NEXT_STEP);
    ``reset(options={"reset_mask": m})`` resets just those sub-envs (envpool's ``env_id``).
    """

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.NEXT_STEP}
    seeded_reset = False

    def __init__(self, pool: Any, num_envs: int) -> None:
        self._pool = pool
        self._obs: Any = None
        self.num_envs = num_envs
        self.single_observation_space = pool.observation_space
        self.single_action_space = pool.action_space
        self.observation_space = gym.vector.utils.batch_space(pool.observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(pool.action_space, num_envs)

    def reset(self, *, seed: Any = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset every sub-env, or those of ``options["reset_mask"]`` (seeds are fixed at construction)."""
        mask = (options or {}).get("reset_mask")
        if mask is None or self._obs is None:
            self._obs, info = self._pool.reset()
            return self._obs, info
        obs, info = self._pool.reset(np.flatnonzero(mask))
        self._obs = np.array(self._obs, copy=True)
        self._obs[mask] = obs
        return self._obs, info

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict]:
        """Step every sub-env."""
        obs, *rest = self._pool.step(actions)
        self._obs = obs
        return (obs, *rest)

    def close(self, **kwargs: Any) -> None:
        """Close the pool."""
        close = getattr(self._pool, "close", None)
        if close is not None:
            close()


def _import_envpool() -> Any:
    try:
        import envpool
    except ImportError as exc:
        raise ImportError(
            "backend='envpool' needs envpool, which is not installed: pip install 'eggroll-rl[envpool]', "
            "or use gymnasium's vector env with backend='sync' (CLI: --set rollout.backend=sync)",
            name="envpool",
        ) from exc
    return envpool


def _make_envpool(
    env_id: str,
    num_envs: int,
    mode: AutoresetMode | None,
    seed: int | None,
    env_kwargs: dict[str, Any],
) -> VectorEnv:
    envpool = _import_envpool()
    if mode not in (None, AutoresetMode.NEXT_STEP):
        raise ValueError(f"envpool only supports autoreset_mode=NEXT_STEP, not {mode}.")
    available = envpool.list_all_envs()
    if env_id not in available:
        raise ValueError(f"envpool has no environment {env_id!r}.{_close_matches(env_id, available)}")
    pool = envpool.make(
        env_id,
        env_type="gymnasium",
        num_envs=num_envs,
        # envpool seeds sub-env i with seed + i and wants every one to fit an int32.
        seed=derive_seed(_TRAIN, seed or 0) % (2**31 - num_envs),
        **env_kwargs,
    )
    return EnvpoolVectorEnv(pool, num_envs)


# -- resets ---------------------------------------------------------------------------------------


def reset_with_seeds(env: VectorEnv, seeds: np.ndarray | list[int]) -> Any:
    """Reset sub-env ``i`` with ``seeds[i]`` where the env allows it; return the observations."""
    seeds = [int(s) for s in seeds]
    base = env.unwrapped
    if env is base and type(base) is CartPoleVectorEnv:
        return _reset_cartpole(base, seeds)
    if getattr(base, "seeded_reset", True):
        try:
            return env.reset(seed=seeds)[0]
        except (TypeError, ValueError, AssertionError, gym.error.Error):
            pass
    warnings.warn(
        f"{type(base).__name__} cannot seed its sub-envs one by one: start states are not shared "
        "between members (no common random numbers).",
        RuntimeWarning,
        stacklevel=3,
    )
    return env.reset(seed=seeds[0])[0]


def _reset_cartpole(env: CartPoleVectorEnv, seeds: list[int]) -> np.ndarray:
    # CartPoleVectorEnv draws every start state from one generator; give each sub-env the state
    # CartPole-v1's reset(seed=s) would draw instead, so equal seeds mean equal start states.
    env.reset(seed=seeds[0])  # resets step counters, autoreset flags and the reset bounds
    unique, inverse = np.unique(seeds, return_inverse=True)
    starts = np.stack([seeding.np_random(int(s))[0].uniform(env.low, env.high, size=(4,)) for s in unique], 1)
    env.state = starts[:, inverse]
    return env.state.T.astype(np.float32)


# -- the episode engine ---------------------------------------------------------------------------


@dataclass
class EpisodeBatch:
    """Per-episode results of `run_episodes`: entry ``e`` is owed episode ``e``."""

    returns: np.ndarray  # (episodes,) float64 undiscounted returns
    lengths: np.ndarray  # (episodes,) int64
    env_steps: int  # counted steps (inside an owed episode)
    seconds: float
    observations: torch.Tensor | None  # sampled preprocessed observations, (count, obs_dim)
    steps: int = 0  # engine iterations (one batched forward each)
    stepped: int = 0  # sub-env steps the backend ran, idle sub-envs included


class _SubEnvs:
    """Drive a `SyncVectorEnv`'s sub-envs one by one: only those with a live episode are stepped.

    The sub-envs are plain `gym.Env`s (no vector autoreset), so every episode starts with an
    explicit ``reset(seed=...)`` and the vector env's autoreset mode plays no part.
    """

    def __init__(self, env: SyncVectorEnv) -> None:
        self.envs = env.envs
        self.obs = gym.vector.utils.create_empty_array(env.single_observation_space, len(self.envs))

    def reset(self, slots: np.ndarray, seeds: list[int | None]) -> None:
        for s, seed in zip(slots.tolist(), seeds, strict=True):
            if seed is not None:  # a slot with no episode left is simply no longer stepped
                self.obs[s] = self.envs[s].reset(seed=seed)[0]

    def step(self, live: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        n = live.size
        reward, terminated, truncated = np.empty(n), np.empty(n, bool), np.empty(n, bool)
        envs, obs = self.envs, self.obs
        for j, s in enumerate(live.tolist()):
            obs[s], reward[j], terminated[j], truncated[j], _ = envs[s].step(actions[j])
        return reward, terminated, truncated


class _Lockstep:
    """Drive any `VectorEnv` through its batched API: every sub-env steps at every iteration.

    Sub-envs without a live episode repeat their last action and are ignored. A sub-env that
    starts a new episode is reset explicitly with that episode's seed (``reset_mask``), which also
    cancels a pending NEXT_STEP autoreset, so returns are exact under every autoreset mode; under
    DISABLED every finished sub-env is reset, owed episode or not.
    """

    def __init__(self, env: VectorEnv) -> None:
        self.env = env
        mode = AutoresetMode(env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP))
        self.disabled = mode is AutoresetMode.DISABLED
        self.cartpole = env is env.unwrapped and type(env) is CartPoleVectorEnv
        self.obs: Any = None
        self.actions: np.ndarray | None = None

    def start(self, seeds: list[int]) -> None:
        self.obs = np.array(reset_with_seeds(self.env, seeds), copy=True)

    def reset(self, slots: np.ndarray, seeds: list[int | None]) -> None:
        if not self.disabled:  # idle sub-envs autoreset themselves; only new episodes need seeds
            keep = [i for i, s in enumerate(seeds) if s is not None]
            slots, seeds = slots[keep], [seeds[i] for i in keep]
        if not slots.size:
            return
        if self.cartpole:
            _reset_cartpole_slots(self.env, slots, seeds)
            self.obs[slots] = self.env.state[:, slots].T
            return
        n = self.env.num_envs
        mask = np.zeros(n, dtype=bool)
        mask[slots] = True
        full: list[int | None] = [None] * n
        for s, seed in zip(slots.tolist(), seeds, strict=True):
            full[s] = seed
        obs = self.env.reset(seed=full, options={"reset_mask": mask})[0]
        self.obs[mask] = obs[mask]

    def step(self, live: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.actions is None:  # sub-envs without an episode repeat a valid action
            self.actions = np.repeat(np.asarray(actions)[:1], self.env.num_envs, axis=0)
        self.actions[live] = actions
        obs, reward, terminated, truncated, _ = self.env.step(self.actions)
        self.obs = np.array(obs, copy=True)
        terminated, truncated = np.asarray(terminated), np.asarray(truncated)
        if self.disabled:  # an idle sub-env whose episode ended cannot step again unless reset
            idle = np.ones(self.env.num_envs, dtype=bool)
            idle[live] = False
            ended = np.flatnonzero(idle & (terminated | truncated))
            if ended.size:
                self.reset(ended, [None] * ended.size)
        return np.asarray(reward, dtype=np.float64)[live], terminated[live], truncated[live]


class _EnvpoolSubset:
    """Drive an envpool pool by ``env_id``: only sub-envs with a live episode step (on its threads).

    envpool steps a subset synchronously with ``step(actions, env_id)`` and resets one with
    ``reset(env_id)``, which also cancels its pending autoreset. Reset seeds are ignored (fixed at
    construction), so start states are not shared between members.
    """

    def __init__(self, env: EnvpoolVectorEnv) -> None:
        self.env, self.pool = env, env._pool
        self.obs: Any = None

    def start(self, seeds: list[int]) -> None:
        self.obs = np.array(reset_with_seeds(self.env, seeds), copy=True)

    def reset(self, slots: np.ndarray, seeds: list[int | None]) -> None:
        ids = np.array([s for s, seed in zip(slots.tolist(), seeds, strict=True) if seed is not None])
        if ids.size:
            obs, info = self.pool.reset(ids)
            self.obs[np.asarray(info.get("env_id", ids))] = obs

    def step(self, live: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        obs, reward, terminated, truncated, info = self.pool.step(np.asarray(actions), live)
        ids = np.asarray(info["env_id"])
        self.obs[ids] = obs
        pos = np.searchsorted(live, ids)  # results in the order of `live` (sorted)
        out = np.empty(live.size), np.empty(live.size, bool), np.empty(live.size, bool)
        out[0][pos], out[1][pos], out[2][pos] = reward, terminated, truncated
        return out


def _reset_cartpole_slots(env: CartPoleVectorEnv, slots: np.ndarray, seeds: list[int | None]) -> None:
    """Reset some sub-envs of the native CartPole to CartPole-v1's ``reset(seed)`` start state."""
    for s, seed in zip(slots.tolist(), seeds, strict=True):
        rng = seeding.np_random(seed)[0] if seed is not None else env.np_random
        env.state[:, s] = rng.uniform(env.low, env.high, size=(4,))
    env.steps[slots] = 0
    env.prev_done[slots] = False


def _driver(env: VectorEnv) -> _SubEnvs | _EnvpoolSubset | _Lockstep:
    """Pick how `run_episodes` steps `env`: only the live sub-envs where it can (see the module doc)."""
    if type(env) is EnvpoolVectorEnv:
        return _EnvpoolSubset(env)
    if (
        env is env.unwrapped
        and type(env) is SyncVectorEnv
        and isinstance(env.single_observation_space, gym.spaces.Box)
    ):
        return _SubEnvs(env)
    return _Lockstep(env)


def run_episodes(
    env: VectorEnv,
    preprocess: Callable[[Any], torch.Tensor],
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    act: Callable[[torch.Tensor], np.ndarray],
    members: np.ndarray | list[int],
    seeds: np.ndarray | list[int],
    max_episode_steps: int | None = None,
    record: np.ndarray | slice | None = None,
) -> EpisodeBatch:
    """Play owed episode ``e`` for member ``members[e]`` from ``reset(seed=seeds[e])``; count returns.

    The env's sub-envs are a pool of slots: each takes the next owed episode (in order) as soon
    as its own ends, so the batch stays full until the last episodes. Each iteration runs one
    ``act(forward(preprocess(obs), member_of_each_row))`` on the live slots only (rows ->
    member map, int64 tensor) and steps them; a `SyncVectorEnv` steps only those sub-envs, other
    vector envs step all of theirs (see `_Lockstep`). Returns are float64 sums of the rewards of
    the episode's own steps, exact under every autoreset mode; `max_episode_steps` ends an
    episode (truncation) after that many steps. `record` (a slice or boolean mask over episodes)
    selects the episodes whose preprocessed observations are returned, episode by episode in
    step order (for the observation normaliser). Raises ValueError if ``members`` and ``seeds``
    differ in length.
    """
    members = np.asarray(members, dtype=np.int64)
    seeds = [int(s) for s in seeds]
    count = members.size
    if len(seeds) != count:
        raise ValueError(f"run_episodes: {count} members but {len(seeds)} seeds (one per episode).")
    slots = env.num_envs
    returns = np.zeros(count)
    lengths = np.zeros(count, dtype=np.int64)
    slot_episode = np.full(slots, -1, dtype=np.int64)
    ret = np.zeros(slots)
    length = np.zeros(slots, dtype=np.int64)
    cap = None if max_episode_steps is None else int(max_episode_steps)
    recorded = np.zeros(count, dtype=bool)
    if record is not None:
        recorded[record] = True
    seen: list[tuple[np.ndarray, torch.Tensor]] = []
    t0 = time.perf_counter()
    driver = _driver(env)
    started = min(slots, count)
    slot_episode[:started] = np.arange(started)
    subset = not isinstance(driver, _Lockstep)  # steps only the live sub-envs
    if isinstance(driver, _SubEnvs):
        driver.reset(np.arange(started), seeds[:started])
    else:
        # Sub-envs beyond the owed episodes start from seeds no episode uses (they only idle).
        extra = [derive_seed(_IDLE, s) for s in range(slots - started)]
        driver.start(seeds[:started] + extra)
    steps = stepped = 0
    live = np.arange(started)
    while live.size:
        episode = slot_episode[live]
        x = preprocess(driver.obs[live])
        if record is not None:
            keep = recorded[episode]
            if keep.any():
                seen.append((episode[keep], x[torch.from_numpy(keep)].clone()))
        actions = act(forward(x, torch.from_numpy(members[episode])))
        reward, terminated, truncated = driver.step(live, actions)
        steps += 1
        stepped += live.size if subset else slots
        ret[live] += reward
        length[live] += 1
        ended = terminated | truncated
        if cap is not None:
            ended |= length[live] >= cap
        if not ended.any():
            continue
        done = live[ended]
        finished = slot_episode[done]
        returns[finished] = ret[done]
        lengths[finished] = length[done]
        ret[done] = 0.0
        length[done] = 0
        new = min(done.size, count - started)
        slot_episode[done] = -1
        slot_episode[done[:new]] = np.arange(started, started + new)
        driver.reset(done, seeds[started : started + new] + [None] * (done.size - new))
        started += new
        live = np.flatnonzero(slot_episode >= 0)
    seconds = time.perf_counter() - t0
    observations = None
    if record is not None:
        if seen:
            order = np.concatenate([e for e, _ in seen])
            xs = torch.cat([x for _, x in seen])
            observations = xs[torch.from_numpy(np.argsort(order, kind="stable"))]
        else:
            observations = torch.zeros(0, 0)
    return EpisodeBatch(returns, lengths, int(lengths.sum()), seconds, observations, steps, stepped)


# -- the rollout fitness ---------------------------------------------------------------------------


class _DeviceStaging:
    """Move a step's observations and rows -> member map to an accelerator in one pinned copy.

    Both are written into one page-locked host buffer (rows as int64 first, then the observations)
    and sent with a single non-blocking host-to-device copy; the device tensors are views of it.
    The buffer grows to the largest step seen and is reused: before it is rewritten, the event
    recorded after the previous copy is queried, and waited on only if that copy is still running
    (it has finished once the step's actions were read back, so no step synchronises here).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = torch.cuda.is_available() and device.type == "cuda"
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.done: Any = None

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, rows)`` on the device (x: ``(R, ..., in)`` float; rows: ``(R,)`` int64)."""
        if x.device.type != "cpu":
            return x, rows.to(self.device, non_blocking=True)
        n_rows, n_x = rows.numel() * 8, x.numel() * x.element_size()
        if self.buffer.numel() < n_rows + n_x:
            self.buffer = torch.empty(2 * (n_rows + n_x), dtype=torch.uint8, pin_memory=self.pinned)
            self.done = None
        if self.done is not None and not self.done.query():
            self.done.synchronize()  # the previous copy has not left the buffer yet (rare)
        host = self.buffer[: n_rows + n_x]
        host[:n_rows].view(torch.int64).copy_(rows)
        host[n_rows:].view(x.dtype).view(x.shape).copy_(x)
        dev = host.to(self.device, non_blocking=True)
        if self.pinned:
            self.done = torch.cuda.Event()
            self.done.record()
        return dev[n_rows:].view(x.dtype).view(x.shape), dev[:n_rows].view(torch.int64)


class RolloutFitness(BatchedFitness):
    """Batched fitness: every member plays `episodes_per_member` episodes; fitness = mean return.

    The owed episodes (``len(population) * episodes_per_member``; episode ``i * k + j`` is member
    ``i``'s ``j``-th) run through `run_episodes` on one vector env of `num_envs` slots (default:
    one per episode), built on the first call and reused. Every member's ``j``-th episode starts
    from the seed ``episode_seed(seed, generation, j)`` (see the module doc). With `obs_norm`,
    the policy's `ObservationNormalizer` is fed a sample of the generation's observations (the
    episodes of a block of ``ceil(obs_norm_fraction * episodes)``, summed over ranks) and
    refreshed at the start of the next call, so each generation sees one fixed normaliser and
    the trainer's best-member snapshot holds exactly the normaliser that member used.
    `reward_shift` is subtracted from every reward of a training episode, so a member's fitness
    is ``mean(return - reward_shift * length)``: ARS's ``shift`` (Mania et al. 2018, "Simple
    random search provides a competitive approach to reinforcement learning", MuJoCo
    experiments), which removes the survival bonus of Hopper, Walker2d and Ant so that standing
    still earns nothing. ``stats["return_mean"]`` stays the env's own (unshifted) return.
    `crn` picks which members share start states (common random numbers): ``"population"``
    (all members) or ``"pair"`` (the members of one noise draw; see the module doc).
    `horizon` (a function of the generation, e.g. ``lambda g: 250 if g < 300 else None``) caps
    the training episodes of generation ``g`` at that many steps (None: `max_episode_steps`, the
    cap the env is built with): a horizon curriculum, short episodes while the gait forms and
    full ones later, so the fitness sees what happens late in an episode.
    """

    # Per-rank rates add up to the run's throughput; every other stat is already reduced here.
    stats_reduction: ClassVar[dict[str, str]] = {
        "steps_per_second": "sum",
        "episode_length_max": "max",
        "lockstep_steps": "max",
        "rollout_seconds": "max",
    }

    def __init__(
        self,
        env: EnvLike,
        *,
        episodes_per_member: int = 1,
        max_episode_steps: int | None = None,
        seed: int = 0,
        backend: str = "auto",
        obs_norm: bool = True,
        obs_norm_fraction: float = 0.01,
        autoreset_mode: AutoresetMode | str | None = None,
        env_kwargs: Mapping[str, Any] | None = None,
        num_envs: int | None = None,
        reward_shift: float = 0.0,
        crn: str = "population",
        horizon: Callable[[int], int | None] | None = None,
    ) -> None:
        if crn not in CRN_MODES:
            raise ValueError(f"crn must be one of {list(CRN_MODES)}, got {crn!r}.")
        if not math.isfinite(reward_shift):
            raise ValueError(f"reward_shift must be a finite number, got {reward_shift}.")
        if num_envs is not None and num_envs < 1:
            raise ValueError(f"num_envs must be >= 1 (env slots), got {num_envs}.")
        if episodes_per_member < 1:
            raise ValueError(f"episodes_per_member must be >= 1, got {episodes_per_member}.")
        if not 0.0 < obs_norm_fraction <= 1.0:
            raise ValueError(f"obs_norm_fraction must be in (0, 1], got {obs_norm_fraction}.")
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; choose one of {list(BACKENDS)}.")
        if isinstance(env, str) and backend != "envpool":
            _find_spec(env)  # fail fast on a mistyped id
        if backend == "envpool":
            _import_envpool()  # fail fast, before any work, when it is not installed
        self.env_spec = env
        self.episodes_per_member = int(episodes_per_member)
        self.max_episode_steps = max_episode_steps
        self.seed = int(seed)
        self.backend = backend
        self.obs_norm = obs_norm
        self.obs_norm_fraction = float(obs_norm_fraction)
        self.reward_shift = float(reward_shift)
        self.crn = crn
        self.horizon = horizon
        self.autoreset_mode = autoreset_mode
        self.env_kwargs = dict(env_kwargs or {})
        self.num_envs = None if num_envs is None else int(num_envs)
        self.env: VectorEnv | None = None
        self.total_env_steps = 0
        self.stats: dict[str, float] = {}

    def _vector_env(self, num_envs: int) -> VectorEnv:
        if self.env is not None and self.env.num_envs == num_envs:
            return self.env
        if self.env is not None and self.env is not self.env_spec:
            self.env.close()
        self.env = make_vec_env(
            self.env_spec,
            num_envs,
            backend=self.backend,
            autoreset_mode=self.autoreset_mode,
            max_episode_steps=self.max_episode_steps,
            seed=self.seed,
            **self.env_kwargs,
        )
        return self.env

    def _cap(self, generation: int) -> int | None:
        """Return the step cap of generation `generation`'s training episodes (`horizon`)."""
        cap = self.max_episode_steps
        short = None if self.horizon is None else self.horizon(generation)
        if short is None:
            return cap
        if isinstance(short, bool) or int(short) != short or short < 1:
            raise ValueError(f"horizon({generation}) must be an integer >= 1 or None, got {short!r}.")
        return int(short) if cap is None else min(int(short), int(cap))

    def _sample_block(self, population: Population) -> slice | None:
        """Return the local sub-envs whose observations feed the normaliser this generation.

        The block is drawn over the whole population's sub-envs from (seed, generation), and each
        rank records its share of it, so the reduced sample is the same however many ranks run.
        """
        k, idx = self.episodes_per_member, population.indices
        local = len(population) * k
        # Ranks evaluate contiguous blocks of members; otherwise fall back to a local sample.
        contiguous = local > 0 and int(idx[-1]) - int(idx[0]) == len(population) - 1
        total = population.size * k if contiguous else local
        first = int(idx[0]) * k if contiguous else 0
        size = min(total, math.ceil(self.obs_norm_fraction * total))
        rng = np.random.default_rng(derive_seed(_SAMPLE, self.seed, population.generation))
        start = int(rng.integers(total - size + 1))
        lo, hi = max(start - first, 0), min(start + size - first, local)
        return slice(lo, hi) if lo < hi else None

    def __call__(self, population: Population) -> torch.Tensor:
        """Play every member's episodes in lockstep and return their mean returns."""
        policy = population.model
        if not (hasattr(policy, "preprocess") and hasattr(policy, "act")):
            raise TypeError(
                "RolloutFitness needs a policy with preprocess() and act() (see make_policy), "
                f"got {type(policy).__name__}."
            )
        members, k = len(population), self.episodes_per_member
        count = members * k
        env = self._vector_env(self.num_envs or count)
        norm = getattr(policy, "obs_norm", None) if self.obs_norm else None
        if norm is not None:
            norm.freeze()  # statistics gathered up to the previous generation
        gen = population.generation
        # Owed episode i * k + j is member i's j-th episode, from the seed its CRN unit shares.
        owner = np.repeat(np.arange(members, dtype=np.int64), k)
        if self.crn == "pair":
            draw_of = reuse_pattern(population.size, population.noise_reuse)[1]
            draws = draw_of[torch.as_tensor(population.indices).cpu()].tolist()
            seeds = np.array([episode_seed(self.seed, gen, d * k + j) for d in draws for j in range(k)])
        else:
            seeds = np.tile([episode_seed(self.seed, gen, j) for j in range(k)], members)
        record = self._sample_block(population) if norm is not None else None
        device = population.device
        on_cpu = device.type == "cpu"

        # Discrete actions are the outputs' argmax: the population computes it with the forward
        # (in the fused CPU kernel, without materialising the outputs).
        offset = getattr(policy, "argmax_offset", None)

        stage = None if on_cpu else _DeviceStaging(device)

        def forward(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            if stage is not None:
                x, rows = stage(x, rows)
            return population(x, members=rows) if offset is None else population.argmax(x, members=rows)

        def act(y: torch.Tensor) -> np.ndarray:
            if offset is None:
                return policy.act(y)
            a = y.numpy() if y.device.type == "cpu" else y.cpu().numpy()
            return a + offset if offset else a

        cap = self._cap(gen)
        with torch.no_grad():
            batch = run_episodes(env, policy.preprocess, forward, act, owner, seeds, cap, record)
        returns = batch.returns
        shaped = returns - self.reward_shift * batch.lengths if self.reward_shift else returns
        fitness = torch.from_numpy(shaped.reshape(members, k).mean(axis=1))

        # One all-reduce for the episode totals and the normaliser sample, so every rank agrees.
        dim = norm.dim if norm is not None else 0
        totals = torch.zeros(4 + 1 + 2 * dim, dtype=torch.float64)
        totals[0], totals[1], totals[2] = batch.env_steps, count, float(returns.sum())
        if norm is not None and batch.observations is not None and batch.observations.numel():
            # Non-finite observations stay out of the statistics; totals[3] counts them.
            totals[3], totals[4:] = norm.sample_stats(batch.observations)
        totals = population.reduce_sum(totals.to(device)).cpu()
        if norm is not None:
            norm.add_stats(totals[4], totals[5 : 5 + dim], totals[5 + dim :])
        steps, episodes = int(totals[0]), float(totals[1])
        self.total_env_steps += steps
        self.stats = {
            "env_steps": float(steps),
            "total_env_steps": float(self.total_env_steps),
            "episode_length_mean": steps / episodes,
            "return_mean": float(totals[2]) / episodes,
            "steps_per_second": batch.env_steps / max(batch.seconds, 1e-9),
            "episode_length_max": float(batch.lengths.max()),
            # Engine iterations: one batched forward each.
            "lockstep_steps": float(batch.steps),
            "rollout_seconds": batch.seconds,
        }
        if norm is not None:
            self.stats["obs_nonfinite"] = float(totals[3])  # in this generation's sample
        return fitness

    def state_dict(self) -> dict[str, Any]:
        """Return the running env-step count (normaliser statistics live in the policy)."""
        return {"total_env_steps": self.total_env_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.total_env_steps = int(state.get("total_env_steps", 0))

    def close(self) -> None:
        """Close the vector env if this object built it."""
        if self.env is not None and self.env is not self.env_spec:
            self.env.close()
        self.env = None


# -- evaluation -----------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Per-episode returns and lengths of an evaluation, with summary statistics.

    ``nonfinite`` counts episodes whose return is NaN or +-inf; with any, ``mean`` is
    non-finite too (NaN, or the infinity when all of them share a sign) and ``std`` is NaN.
    """

    returns: np.ndarray
    lengths: np.ndarray
    mean: float
    std: float
    length_mean: float
    nonfinite: int = 0

    @property
    def episodes(self) -> int:
        """Number of episodes played."""
        return int(self.returns.size)

    def __str__(self) -> str:
        text = f"{self.mean:.2f} +/- {self.std:.2f} over {self.episodes} episodes"
        return text + (f" ({self.nonfinite} non-finite returns)" if self.nonfinite else "")


@contextlib.contextmanager
def _one_thread(active: bool = True) -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored after), where ``active``.

    An episode loop's forwards are small (at most a few hundred rows of a small MLP): torch's
    thread pool buys nothing there, and on a busy machine each forward waits for a descheduled
    pool thread (measured: 3-40 ms instead of ~0.15 ms per forward with 2 threads, load ~7).
    """
    threads = torch.get_num_threads()
    if not active or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _center_kernel(policy: torch.nn.Module) -> kernels.MLPKernel | None:
    """Return the fused CPU kernel computing ``policy(x)`` row by row, or None where it does not apply.

    Each output row is a fixed-order sum over that row's inputs only, so a row's result does not
    depend on the batch it is in (PyTorch's GEMM can round a row differently with another batch
    size). It applies to a float32 `Policy` whose module graph is exactly its ``mlp_plan()`` (a
    copy on the CPU when the policy lives on an accelerator), when the kernel is compiled here.
    """
    from .policies import exact_mlp_plan

    params = list(policy.parameters())
    if (
        not params
        or any(t.dtype != torch.float32 for t in params)
        or not callable(getattr(policy, "mlp_plan", None))
    ):
        return None
    if params[0].device.type != "cpu":
        import copy

        policy = copy.deepcopy(policy).cpu()
    plan = exact_mlp_plan(policy)
    if plan is None or not kernels.available():
        return None
    normalizer, stack = plan
    layers = [kernels.MLPLayer(mod.weight, mod.bias, activation) for mod, activation in stack]
    if normalizer is not None:  # the kernel reads these at every call: keep private copies
        mean, std, clip = normalizer
        normalizer = (mean.detach().clone(), std.detach().clone(), clip)
    try:
        return kernels.MLPKernel(layers, normalizer)
    except ValueError:  # a width or activation the kernel does not take
        return None


def evaluate(
    policy: torch.nn.Module,
    env: EnvLike,
    episodes: int = 100,
    seed: int = 0,
    num_envs: int | None = None,
    max_episode_steps: int | None = None,
    deterministic: bool = True,
    *,
    backend: str = "auto",
    env_kwargs: Mapping[str, Any] | None = None,
    world: World | None = None,
) -> EvalResult:
    """Play the policy for exactly `episodes` episodes and return their returns and lengths.

    Episode ``e`` starts from ``reset(seed=derive_seed(1, seed, e))`` whatever sub-env plays
    it; `num_envs` sub-envs (default ``min(episodes, 128)``, per process) take the next episode
    as soon as theirs ends (`run_episodes`), and every episode runs to its end (or
    `max_episode_steps`), so short episodes cannot crowd out long ones and bias the mean. With
    ``deterministic=False`` actions are sampled, episode ``e`` from its own generator seeded by
    ``(seed, e)``.

    Where the fused CPU kernel computes the policy (a float32 `Policy`, see `make_policy`), each
    row's outputs do not depend on which rows share its batch, so the result is the same bits
    however the episodes are batched or split; otherwise the policy's own forward runs.

    `world` (every rank of it calls `evaluate` with the same arguments): its ranks share the
    episodes (contiguous blocks of episode indices, gathered in episode order), so the result is
    bit-identical to a one-process evaluation and every rank returns it. The split needs an env
    id whose backend seeds every episode (not ``envpool``) and the fused kernel on every rank;
    otherwise rank 0 plays all episodes and sends the result to the others, so it still does not
    depend on the number of processes. A rank that raises stops every rank with a
    `~eggroll_rl.distributed.DistributedError` naming it. None: this process plays everything.

    Returns an `EvalResult` (returns float64 ``(episodes,)``, lengths int64 ``(episodes,)``).
    Raises ValueError if ``episodes < 1``.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}.")
    world = world if world is not None else World()
    try:
        kernel = _center_kernel(policy)
    except Exception as exc:
        world.fail(exc)  # every rank raises a DistributedError naming this one
    split = world.size > 1 and kernel is not None and isinstance(env, str | gym.envs.registration.EnvSpec)
    split = split and backend != "envpool"
    if world.size > 1:
        # Every rank must take the same path; one that cannot compute the kernel keeps rank 0 alone.
        split = all(world.all_gather_object(split))

    def play(first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if first >= stop:
            return np.zeros(0), np.zeros(0, np.int64)
        return _play(
            policy,
            kernel,
            env,
            first,
            stop,
            seed,
            num_envs,
            max_episode_steps,
            deterministic,
            backend,
            env_kwargs,
        )

    if split:
        block = world.member_slice(episodes)
        try:
            mine = play(block.start, block.stop)
        except Exception as exc:
            world.fail(exc)
        parts = world.all_gather_object(mine)
        returns = np.concatenate([r for r, _ in parts])
        lengths = np.concatenate([n for _, n in parts])
    else:
        played = None
        if world.is_main:
            try:
                played = play(0, episodes)
            except Exception as exc:
                world.fail(exc)
        returns, lengths = world.broadcast_object(played)
    nonfinite = int((~np.isfinite(returns)).sum())
    with np.errstate(invalid="ignore"):  # inf - inf: the mean is NaN, said by `nonfinite`
        mean = float(returns.mean())
    return EvalResult(
        returns=returns,
        lengths=lengths,
        mean=mean,
        std=float(returns.std()) if not nonfinite else math.nan,
        length_mean=float(lengths.mean()),
        nonfinite=nonfinite,
    )


def _play(
    policy: torch.nn.Module,
    kernel: kernels.MLPKernel | None,
    env: EnvLike,
    first: int,
    stop: int,
    seed: int,
    num_envs: int | None,
    max_episode_steps: int | None,
    deterministic: bool,
    backend: str,
    env_kwargs: Mapping[str, Any] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Play evaluation episodes ``first .. stop-1``; return their returns and lengths."""
    count = stop - first
    if isinstance(env, VectorEnv):
        num_envs = num_envs or env.num_envs
    num_envs = num_envs or min(count, 128)
    owned = not isinstance(env, VectorEnv)
    vec = make_vec_env(
        env,
        num_envs,
        backend=backend,
        max_episode_steps=max_episode_steps,
        seed=seed,
        **dict(env_kwargs or {}),
    )
    episodes = np.arange(first, stop, dtype=np.int64)
    seeds = [derive_seed(_EVAL, seed, int(e)) for e in episodes]
    device = next(policy.parameters(), torch.empty(0)).device
    on_cpu = kernel is not None or device.type == "cpu"

    def outputs(x: torch.Tensor) -> torch.Tensor:
        return kernel(x) if kernel is not None else policy(x.to(device))

    if deterministic:

        def forward(x: torch.Tensor, rows: torch.Tensor) -> Any:
            return outputs(x)

        def act(out: Any) -> np.ndarray:
            return policy.act(out, deterministic=True)

    else:
        # One generator per episode (the row -> member map carries the episode index), so an
        # episode's actions do not depend on which episodes share its batch or process.
        rngs = {int(e): np.random.default_rng(derive_seed(_ACT, seed, int(e))) for e in episodes}

        def forward(x: torch.Tensor, rows: torch.Tensor) -> Any:
            return outputs(x), rows.tolist()

        def act(out: Any) -> np.ndarray:
            y, rows = out
            return np.concatenate(
                [policy.act(y[i : i + 1], deterministic=False, rng=rngs[e]) for i, e in enumerate(rows)]
            )

    try:
        with torch.no_grad(), _one_thread(on_cpu):
            batch = run_episodes(vec, policy.preprocess, forward, act, episodes, seeds, max_episode_steps)
    finally:
        if owned:
            vec.close()
    return batch.returns, batch.lengths
