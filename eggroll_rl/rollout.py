"""Gymnasium rollouts: vector-env construction, the population rollout fitness, and evaluation.

Every episode loop here is `run_episodes`: all sub-envs step in lockstep, one batched policy
forward and one `env.step` per step, and returns are counted with an alive mask so they are exact
under every autoreset mode (NEXT_STEP, SAME_STEP, DISABLED).

Seeding (common random numbers). `RolloutFitness` lays its sub-envs out member-major: sub-env
``i * k + j`` plays episode ``j`` of local member ``i`` (``k = episodes_per_member``). At
generation ``g`` it resets sub-env ``i * k + j`` with seed ``episode_seed(seed, g, j)``, the same
for every member, so all members (in particular an antithetic pair and a shaping group) start
their ``j``-th episode from the same state, and the states change every generation. Envs whose
reset cannot seed sub-envs individually (e.g. envpool) get no such guarantee: they are reset once
with ``episode_seed(seed, g, 0)`` (envpool: seeded once at construction) and a warning says so.
`CartPoleVectorEnv` (the native CartPole) only takes one seed for all sub-envs, so its start
states are set directly to what ``CartPole-v1`` reset with the same seed would give.
`evaluate` resets sub-env ``i`` with ``derive_seed(1, seed, i)``; its further episodes continue
that sub-env's random stream (deterministic given ``seed``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv

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
# The episode cap of an env registered without max_episode_steps (a warning says it was applied).
DEFAULT_MAX_EPISODE_STEPS = 1000

# Seed domains, so training, evaluation and sampling streams never coincide.
_TRAIN, _EVAL, _SAMPLE, _ACT = 0, 1, 2, 3

EnvLike = str | gym.envs.registration.EnvSpec | VectorEnv | Callable[[int], VectorEnv]


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
    ``SyncVectorEnv``; ``sync``/``async``/``vector_entry_point`` force one; ``envpool`` needs the
    ``envpool`` extra. `seed` is only used by backends seeded at construction (envpool).
    Episodes are capped at :func:`episode_cap` steps (a ``TimeLimit``: truncation).
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

    envpool seeds sub-env ``i`` with ``seed + i`` at construction and ignores reset seeds, so
    sub-envs cannot share start states (no common random numbers); it autoresets on the step after
    an episode ends (NEXT_STEP).
    """

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.NEXT_STEP}
    seeded_reset = False

    def __init__(self, pool: Any, num_envs: int) -> None:
        self._pool = pool
        self.num_envs = num_envs
        self.single_observation_space = pool.observation_space
        self.single_action_space = pool.action_space
        self.observation_space = gym.vector.utils.batch_space(pool.observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(pool.action_space, num_envs)

    def reset(self, *, seed: Any = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset every sub-env (seeds are fixed at construction)."""
        return self._pool.reset()

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict]:
        """Step every sub-env."""
        return self._pool.step(actions)

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
            "backend='envpool' needs envpool, which is not installed: pip install 'eggroll-rl[envpool]'",
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


# -- the episode loop -----------------------------------------------------------------------------


@dataclass
class EpisodeBatch:
    """Per-episode results of `run_episodes`: row ``i`` holds sub-env ``i``'s episodes."""

    returns: np.ndarray  # (num_envs, max quota) float64; unused slots are 0
    lengths: np.ndarray  # (num_envs, max quota) int64
    env_steps: int  # counted steps (sub-envs inside an episode they are accounting for)
    seconds: float
    observations: torch.Tensor | None  # sampled preprocessed observations, (count, obs_dim)
    steps: int = 0  # lockstep iterations (vector-env steps)


def run_episodes(
    env: VectorEnv,
    preprocess: Callable[[Any], torch.Tensor],
    forward: Callable[[torch.Tensor], torch.Tensor],
    act: Callable[[torch.Tensor], np.ndarray],
    quota: np.ndarray | int,
    seeds: np.ndarray | list[int],
    max_episode_steps: int | None = None,
    record: slice | None = None,
) -> EpisodeBatch:
    """Play ``quota[i]`` episodes on sub-env ``i`` in lockstep and count exact undiscounted returns.

    Each step is ``act(forward(preprocess(obs)))`` and one ``env.step``. A sub-env's reward counts
    only while it is inside an episode it still owes; under NEXT_STEP the autoreset step after an
    episode is skipped, under DISABLED finished sub-envs are reset with a mask, and `final_info`
    is never needed. `max_episode_steps` truncates the accounting (a sub-env that still owes
    episodes then needs DISABLED autoreset or an env with the same time limit). `record` selects
    sub-envs whose preprocessed observations are returned (for the observation normaliser).
    """
    n = env.num_envs
    quota = np.broadcast_to(np.asarray(quota, dtype=np.int64), (n,))
    mode = AutoresetMode(env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP))
    disabled = mode is AutoresetMode.DISABLED
    width = max(int(quota.max()), 1)
    returns = np.zeros((n, width))
    lengths = np.zeros((n, width), dtype=np.int64)
    ret = np.zeros(n)
    length = np.zeros(n, dtype=np.int64)
    episode = np.zeros(n, dtype=np.int64)
    alive = quota > 0
    n_alive = int(alive.sum())
    reward = np.empty(n)
    skip: np.ndarray | None = None  # NEXT_STEP: sub-envs whose next step is an autoreset step
    cap = math.inf if max_episode_steps is None else int(max_episode_steps)
    seen: list[tuple[torch.Tensor, np.ndarray]] = []
    t0 = time.perf_counter()
    obs = reset_with_seeds(env, seeds)
    t = 0
    while n_alive:
        x = preprocess(obs)
        if record is not None:
            counted_now = alive if skip is None else alive & ~skip
            seen.append((x[record].clone(), counted_now[record].copy()))
        actions = act(forward(x))
        obs, r, terminated, truncated, _ = env.step(actions)
        t += 1
        counted = alive if skip is None else alive & ~skip
        np.multiply(r, counted, out=reward)
        ret += reward
        length += counted
        ended = terminated | truncated
        done = ended & counted
        if t >= cap:  # cheap guard: no sub-env can reach the cap before step `cap`
            forced = (length >= cap) & counted & ~done
            done |= forced
        else:
            forced = None
        skip = None
        if disabled:
            # Every finished sub-env is reset, counted or not: stepping it again is invalid here.
            finished = ended | done
            if finished.any():
                obs, _ = env.reset(options={"reset_mask": finished})
        if not done.any():
            continue
        idx = np.flatnonzero(done)
        slot = episode[idx]
        returns[idx, slot] = ret[idx]
        lengths[idx, slot] = length[idx]
        ret[idx] = 0.0
        length[idx] = 0
        episode[idx] += 1
        alive[idx] = episode[idx] < quota[idx]
        n_alive = int(alive.sum())
        again = idx[alive[idx]]
        if forced is not None and not disabled and forced[again].any():
            raise ValueError(
                "max_episode_steps cut an episode short on a sub-env that owes more episodes; "
                "build the env with the same time limit or use AutoresetMode.DISABLED."
            )
        if mode is AutoresetMode.NEXT_STEP and again.size:
            skip = np.zeros(n, dtype=bool)
            skip[again] = True
    seconds = time.perf_counter() - t0
    observations = None
    if record is not None:
        if seen:
            xs = torch.stack([s for s, _ in seen])
            mask = torch.from_numpy(np.stack([m for _, m in seen]))
            observations = xs[mask]
        else:
            observations = torch.zeros(0, 0)
    return EpisodeBatch(returns, lengths, int(lengths.sum()), seconds, observations, t)


# -- the rollout fitness ---------------------------------------------------------------------------


class RolloutFitness(BatchedFitness):
    """Batched fitness: every member plays `episodes_per_member` episodes; fitness = mean return.

    One vector env with ``len(population) * episodes_per_member`` sub-envs is built on the first
    call and reused. Sub-env ``i * k + j`` plays member ``i``'s episode ``j`` from the start state
    of seed ``episode_seed(seed, generation, j)`` (shared by all members: see the module doc).
    With `obs_norm`, the policy's `ObservationNormalizer` is fed a sample of the generation's
    observations (from ``ceil(obs_norm_fraction * num_envs)`` sub-envs, summed over ranks) and
    refreshed at the start of the next call, so each generation sees one fixed normaliser and
    the trainer's best-member snapshot holds exactly the normaliser that member used.
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
    ) -> None:
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
        self.autoreset_mode = autoreset_mode
        self.env_kwargs = dict(env_kwargs or {})
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
        num_envs = members * k
        env = self._vector_env(num_envs)
        norm = getattr(policy, "obs_norm", None) if self.obs_norm else None
        if norm is not None:
            norm.freeze()  # statistics gathered up to the previous generation
        gen = population.generation
        seeds = np.tile([episode_seed(self.seed, gen, j) for j in range(k)], members)
        record = self._sample_block(population) if norm is not None else None
        device = population.device
        on_cpu = device.type == "cpu"

        # Discrete actions are the outputs' argmax: the population computes it with the forward
        # (in the fused CPU kernel, without materialising the outputs).
        offset = getattr(policy, "argmax_offset", None)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not on_cpu:
                x = x.to(device, non_blocking=True)
            if k > 1:  # member-major rows: member i plays rows i*k .. i*k+k-1
                x = x.view(members, k, -1)
            y = population(x) if offset is None else population.argmax(x)
            return y.reshape(num_envs, *y.shape[2:]) if k > 1 else y

        def act(y: torch.Tensor) -> np.ndarray:
            if offset is None:
                return policy.act(y)
            a = y.numpy() if y.device.type == "cpu" else y.cpu().numpy()
            return a + offset if offset else a

        with torch.no_grad():
            batch = run_episodes(
                env, policy.preprocess, forward, act, 1, seeds, self.max_episode_steps, record
            )
        returns = batch.returns[:, 0]
        fitness = torch.from_numpy(returns.reshape(members, k).mean(axis=1))

        # One all-reduce for the episode totals and the normaliser sample, so every rank agrees.
        dim = norm.dim if norm is not None else 0
        totals = torch.zeros(3 + 1 + 2 * dim, dtype=torch.float64)
        totals[0], totals[1], totals[2] = batch.env_steps, num_envs, float(returns.sum())
        if norm is not None and batch.observations is not None and batch.observations.numel():
            obs = batch.observations.to(torch.float64)
            totals[3] = obs.shape[0]
            totals[4 : 4 + dim] = obs.sum(0)
            totals[4 + dim :] = obs.square().sum(0)
        totals = population.reduce_sum(totals.to(device)).cpu()
        if norm is not None:
            norm.add_stats(totals[3], totals[4 : 4 + dim], totals[4 + dim :])
        steps, episodes = int(totals[0]), float(totals[1])
        self.total_env_steps += steps
        self.stats = {
            "env_steps": float(steps),
            "total_env_steps": float(self.total_env_steps),
            "episode_length_mean": steps / episodes,
            "return_mean": float(totals[2]) / episodes,
            "steps_per_second": batch.env_steps / max(batch.seconds, 1e-9),
            "episode_length_max": float(batch.lengths.max()),
            # Lockstep iterations: every sub-env steps until the slowest episode ends.
            "lockstep_steps": float(batch.steps),
            "rollout_seconds": batch.seconds,
        }
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
    """Per-episode returns and lengths of an evaluation, with summary statistics."""

    returns: np.ndarray
    lengths: np.ndarray
    mean: float
    std: float
    length_mean: float

    @property
    def episodes(self) -> int:
        """Number of episodes played."""
        return int(self.returns.size)

    def __str__(self) -> str:
        return f"{self.mean:.2f} +/- {self.std:.2f} over {self.episodes} episodes"


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
) -> EvalResult:
    """Play the policy for exactly `episodes` episodes and return their returns and lengths.

    Episodes are spread over `num_envs` sub-envs (default: one each, at most 128 sub-envs) with a
    fixed quota per sub-env, so short episodes cannot crowd out long ones and bias the mean.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}.")
    if isinstance(env, VectorEnv):
        num_envs = num_envs or env.num_envs
    num_envs = num_envs or min(episodes, 128)
    # Sub-envs beyond `episodes` (possible with a given VectorEnv) get a quota of 0 and only idle.
    playing = min(num_envs, episodes)
    quota = np.zeros(num_envs, dtype=np.int64)
    quota[:playing] = episodes // playing
    quota[: episodes % playing] += 1
    owned = not isinstance(env, VectorEnv)
    vec = make_vec_env(
        env,
        num_envs,
        backend=backend,
        max_episode_steps=max_episode_steps,
        seed=seed,
        **dict(env_kwargs or {}),
    )
    seeds = [derive_seed(_EVAL, seed, i) for i in range(num_envs)]
    rng = None if deterministic else np.random.default_rng(derive_seed(_ACT, seed))
    device = next(policy.parameters(), torch.empty(0)).device

    def forward(x: torch.Tensor) -> torch.Tensor:
        return policy(x.to(device))

    def act(out: torch.Tensor) -> np.ndarray:
        return policy.act(out, deterministic=deterministic, rng=rng)

    try:
        with torch.no_grad():
            batch = run_episodes(vec, policy.preprocess, forward, act, quota, seeds, max_episode_steps)
    finally:
        if owned:
            vec.close()
    played = np.arange(batch.returns.shape[1]) < quota[:, None]
    returns, lengths = batch.returns[played], batch.lengths[played]
    return EvalResult(
        returns=returns,
        lengths=lengths,
        mean=float(returns.mean()),
        std=float(returns.std()),
        length_mean=float(lengths.mean()),
    )
