"""Rollout fitness, vector-env construction and evaluation, on tiny deterministic envs."""

from __future__ import annotations

import copy
import sys
import types

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from eggroll_rl import rollout
from eggroll_rl.core import EGGROLLTrainer
from eggroll_rl.policies import make_policy
from eggroll_rl.population import BatchedFitness
from eggroll_rl.rollout import (
    EvalResult,
    RolloutFitness,
    derive_seed,
    episode_seed,
    evaluate,
    make_vec_env,
    reset_with_seeds,
    run_episodes,
)

MODES = [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED]


class CountEnv(gym.Env):
    """Reward t at step t; action 1 ends the episode (terminated); truncated after `limit` steps.

    After reset(seed=s): limit = 2 + (s % 4 + e) % 4 for the e-th episode since that seeded reset.
    Stepping a finished episode is an error, so a rollout that does it fails loudly.
    """

    observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self) -> None:
        self._offset, self._episode, self._done = 0, 0, True

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._offset, self._episode = seed % 4, 0
        self.limit = 2 + (self._offset + self._episode) % 4
        self._episode += 1
        self.t, self._done = 0, False
        return self._obs(), {}

    def _obs(self):
        return np.array([self.t, self.limit], dtype=np.float32)

    def step(self, action):
        assert not self._done, "stepped a finished episode"
        self.t += 1
        terminated = bool(action == 1)
        truncated = self.t >= self.limit and not terminated
        self._done = terminated or truncated
        return self._obs(), float(self.t), terminated, truncated, {}


def count_limit(seed: int, episode: int = 0) -> int:
    return 2 + (seed % 4 + episode) % 4


class TargetEnv(gym.Env):
    """Observe a target in the action box; reward -|a - target|^2 per step for 5 steps."""

    observation_space = spaces.Box(-10.0, 10.0, (2,), np.float32)
    action_space = spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([1.0, 5.0], np.float32))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.target = self.np_random.uniform(self.action_space.low, self.action_space.high)
        self.t = 0
        return self.target.astype(np.float32), {}

    def step(self, action):
        assert self.action_space.contains(action), f"action {action} outside the box"
        self.t += 1
        reward = -float(np.square(action - self.target).sum())
        return self.target.astype(np.float32), reward, False, self.t >= 5, {}


class PickEnv(gym.Env):
    """Observe a one-hot target; reward 1 per step while the action names it; 4 steps.

    Actions start at 5 (``Discrete(3, start=5)``): an action outside the space is an error.
    """

    observation_space = spaces.Box(0.0, 1.0, (3,), np.float32)
    action_space = spaces.Discrete(3, start=5)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.target = 0, int(self.np_random.integers(3))
        return np.eye(3, dtype=np.float32)[self.target], {}

    def step(self, action):
        assert self.action_space.contains(action), f"action {action} outside {self.action_space}"
        reward = float(action == 5 + self.target)
        self.t, self.target = self.t + 1, (self.target + 1) % 3
        return np.eye(3, dtype=np.float32)[self.target], reward, False, self.t >= 4, {}


for env_id, entry in (
    ("EggrollTest/Count-v0", CountEnv),
    ("EggrollTest/Target-v0", TargetEnv),
    ("EggrollTest/Pick-v0", PickEnv),
):
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=entry)


class FakePopulation:
    """The population contract with a scripted ``forward(x, members)``; counts calls and rows."""

    def __init__(self, model, forward, members: int, generation: int = 0, indices=None) -> None:
        self.model, self._forward = model, forward
        self.size, self.generation, self.seed = members, generation, 0
        self.indices = torch.arange(members) if indices is None else indices
        self.device = torch.device("cpu")
        self.noise_reuse = self.group_size = 0
        self.calls = self.rows = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __call__(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        if members is None:
            assert x.shape[0] == len(self)
            members = torch.arange(len(self))
        assert members.dtype == torch.int64 and members.shape == x.shape[:1]
        assert ((members >= 0) & (members < len(self))).all()
        self.calls += 1
        self.rows += x.shape[0]
        return self._forward(x, members)

    def argmax(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        return self(x, members).argmax(-1)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def stopper(stops: list[float]):
    """Member i presses 'stop' (action 1) on its stops[i]-th step."""
    stop = torch.tensor(stops, dtype=torch.float32)

    def forward(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        s = stop[members].view(-1, *([1] * (x.dim() - 2)))
        go = (x[..., 0] + 1 >= s).float()
        return torch.stack([1 - go, go], dim=-1)

    return forward


def count_policy():
    env = CountEnv()
    return make_policy(env.observation_space, env.action_space, hidden_sizes=(4,))


def triangle(length: int) -> float:
    return length * (length + 1) / 2


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("k", [1, 3])
def test_rollout_returns_equal_hand_computed_sums(mode, k):
    stops = [1, 2, 3, 100, 4]
    fit = RolloutFitness("EggrollTest/Count-v0", episodes_per_member=k, seed=7, autoreset_mode=mode)
    for generation in (0, 1):
        pop = FakePopulation(count_policy(), stopper(stops), len(stops), generation)
        fitness = fit(pop)
        assert fit.env.metadata["autoreset_mode"] == mode
        limits = [count_limit(episode_seed(7, generation, j)) for j in range(k)]
        lengths = np.array([[min(s, lim) for lim in limits] for s in stops])
        expected = np.array([[triangle(L) for L in row] for row in lengths]).mean(1)
        np.testing.assert_allclose(fitness.numpy(), expected)
        assert pop.calls == lengths.max()  # one batched forward per engine iteration
        assert pop.rows == lengths.sum()  # only live episodes are forwarded
        assert fit.stats["env_steps"] == lengths.sum()
        assert fit.stats["episode_length_mean"] == pytest.approx(lengths.mean())
        assert fit.stats["episode_length_max"] == fit.stats["lockstep_steps"] == lengths.max()
        assert fit.stats["return_mean"] == pytest.approx(expected.mean())
        assert fit.stats["steps_per_second"] > 0
    first_env = fit.env
    fit(FakePopulation(count_policy(), stopper(stops), len(stops), 2))
    assert fit.env is first_env  # built once, reused across generations
    assert fit.stats["total_env_steps"] > fit.stats["env_steps"]
    fit.close()


def plain_loop(member_stops, seeds, cap):
    """Reference: each episode on a fresh single CountEnv, stepped until it ends or hits `cap`."""
    returns, lengths = [], []
    for stop, seed in zip(member_stops, seeds, strict=True):
        env = CountEnv()
        obs, _ = env.reset(seed=seed)
        total, t = 0.0, 0
        while True:
            obs, r, terminated, truncated, _ = env.step(int(obs[0] + 1 >= stop))
            total, t = total + r, t + 1
            if terminated or truncated or t >= cap:
                break
        returns.append(total)
        lengths.append(t)
    return np.array(returns), np.array(lengths)


def count_env(kind: str, slots: int, mode: AutoresetMode):
    env = make_vec_env("EggrollTest/Count-v0", slots, autoreset_mode=mode)
    return env if kind == "sub-envs" else gym.vector.VectorWrapper(env)  # the batched-API driver


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("kind", ["sub-envs", "lockstep"])
@pytest.mark.parametrize("slots", [3, 12, 15])  # a pool refilled as episodes end; one per episode; idle slots
def test_engine_equals_a_plain_single_env_loop(mode, kind, slots):
    """Members ending after 1-2 steps and members running to the cap (4) or their env limit."""
    stops = np.array([1, 2, 100, 2, 100, 3])
    members = np.array([0, 1, 2, 3, 4, 5, 2, 2, 0, 4, 1, 4])  # any order, repeats
    seeds = [derive_seed(9, e) for e in range(members.size)]
    expected = plain_loop(stops[members], seeds, cap=4)
    rows = []

    def forward(x, who):
        rows.append(who.clone())
        return stopper(stops.tolist())(x, who)

    env = count_env(kind, slots, mode)
    batch = run_episodes(env, torch.as_tensor, forward, lambda y: y.argmax(-1).numpy(), members, seeds, 4)
    np.testing.assert_array_equal(batch.returns, expected[0])
    np.testing.assert_array_equal(batch.lengths, expected[1])
    assert batch.env_steps == expected[1].sum() == sum(r.numel() for r in rows)  # live rows only
    assert {1, 2, 4} <= set(expected[1].tolist())  # short episodes, env limits and the cap
    if slots == 15:  # one slot per episode: iterations are the longest episode, as in lockstep
        assert batch.steps == expected[1].max()
    if kind == "sub-envs":
        assert batch.stepped == batch.env_steps  # finished sub-envs are not stepped
    with pytest.raises(ValueError, match="12 members but 2 seeds"):
        run_episodes(env, torch.as_tensor, forward, lambda y: y.argmax(-1).numpy(), members, seeds[:2])


def test_rollout_fitness_same_returns_on_every_backend_and_pool_size():
    """A real population on CartPole-v1: the native vector env (lockstep, one slot per episode),
    SyncVectorEnv stepping live sub-envs only, and a pool of 5 slots give bit-identical fitness
    (common random numbers on every backend, rows -> member map in the forward)."""
    env = gym.make("CartPole-v1")
    torch.manual_seed(1)
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=(8,))
    fits = {}
    for name, kw in {
        "native": {"backend": "vector_entry_point"},
        "sync": {"backend": "sync"},
        "pool": {"backend": "sync", "num_envs": 5},
        "pool-native": {"backend": "vector_entry_point", "num_envs": 7},
    }.items():
        fitness = RolloutFitness("CartPole-v1", episodes_per_member=2, seed=5, **kw)
        # A fresh copy each time: a rollout feeds the policy's observation normaliser.
        trainer = make_trainer(copy.deepcopy(policy), fitness, population_size=12, sigma=1.0)
        trainer.generation = 3
        pop = trainer.make_population(trainer.sample_perturbations(12), torch.arange(12))
        fits[name] = (fitness(pop).numpy(), fitness.stats["env_steps"])
        fitness.close()
    base = fits["native"]
    assert np.unique(base[0]).size > 3  # members differ: the test can tell them apart
    for name, got in fits.items():
        np.testing.assert_array_equal(got[0], base[0], err_msg=name)
        assert got[1] == base[1]


def test_episodes_average_over_different_start_states():
    # k=4 episodes see 4 different seeds; members share them (common random numbers).
    fit = RolloutFitness("EggrollTest/Count-v0", episodes_per_member=4, seed=3)
    pop = FakePopulation(count_policy(), stopper([100, 100]), 2, generation=5)
    fitness = fit(pop).numpy()
    limits = [count_limit(episode_seed(3, 5, j)) for j in range(4)]
    assert fitness[0] == fitness[1] == pytest.approx(np.mean([triangle(L) for L in limits]))


@pytest.mark.parametrize("first", [0, 2])  # the whole population, or a rank holding members 2..5
def test_pair_crn_shares_start_states_within_a_noise_draw_only(first):
    # Members 2d and 2d+1 (draw d) play episode j from episode_seed(3, 5, d * k + j); k = 2.
    fit = RolloutFitness("EggrollTest/Count-v0", episodes_per_member=2, seed=3, crn="pair")
    pop = FakePopulation(count_policy(), stopper([100] * 6), 6, generation=5, indices=torch.arange(first, 6))
    pop.noise_reuse = 2
    fitness = fit(pop).numpy()
    want = [
        np.mean([triangle(count_limit(episode_seed(3, 5, (i // 2) * 2 + j))) for j in range(2)])
        for i in range(first, 6)
    ]
    np.testing.assert_allclose(fitness, want)
    assert len(set(want)) > 1  # draws do see different start states
    with pytest.raises(ValueError, match="crn"):
        RolloutFitness("EggrollTest/Count-v0", crn="member")


def test_horizon_caps_the_early_generations_only():
    # Generations 0-2 stop every episode after 2 steps (return 1 + 2); from generation 3 on the
    # episodes run to the env's own end, count_limit(seed) steps (or the cap 4, whichever is first).
    fit = RolloutFitness(
        "EggrollTest/Count-v0", max_episode_steps=4, seed=1, horizon=lambda g: 2 if g < 3 else None
    )
    for gen in (0, 2, 3, 4):
        fitness = fit(FakePopulation(count_policy(), stopper([100, 100]), 2, generation=gen)).numpy()
        length = 2 if gen < 3 else min(count_limit(episode_seed(1, gen, 0)), 4)
        np.testing.assert_array_equal(fitness, [triangle(length)] * 2)
        assert fit.stats["env_steps"] == 2 * length
    assert {min(count_limit(episode_seed(1, g, 0)), 4) for g in (3, 4)} != {2}  # the switch is visible
    bad = RolloutFitness("EggrollTest/Count-v0", horizon=lambda g: 0)
    with pytest.raises(ValueError, match=r"horizon\(0\)"):
        bad(FakePopulation(count_policy(), stopper([100]), 1))


def test_max_episode_steps_caps_the_accounting():
    fit = RolloutFitness("EggrollTest/Count-v0", max_episode_steps=2, seed=1)
    fitness = fit(FakePopulation(count_policy(), stopper([1, 100]), 2))
    np.testing.assert_allclose(fitness.numpy(), [1.0, 3.0])


def test_reward_shift_subtracts_per_step_from_fitness_only():
    # Lengths 1 and 2 (capped): returns 1 and 1 + 2; ARS's shift takes 0.75 per step off each.
    fit = RolloutFitness("EggrollTest/Count-v0", max_episode_steps=2, seed=1, reward_shift=0.75)
    fitness = fit(FakePopulation(count_policy(), stopper([1, 100]), 2))
    np.testing.assert_allclose(fitness.numpy(), [1.0 - 0.75, 3.0 - 1.5])
    assert fit.stats["return_mean"] == 2.0  # the env's own returns, unshifted
    with pytest.raises(ValueError, match="reward_shift"):
        RolloutFitness("EggrollTest/Count-v0", reward_shift=float("nan"))


def test_rollout_feeds_and_freezes_the_normaliser():
    policy = count_policy()
    norm = policy.obs_norm
    fit = RolloutFitness("EggrollTest/Count-v0", seed=0, obs_norm_fraction=1.0)
    stops = [1, 3, 100]
    fit(FakePopulation(policy, stopper(stops), 3, 0))
    limit = count_limit(episode_seed(0, 0, 0))
    lengths = [min(s, limit) for s in stops]
    fed = np.array([[t, limit] for L in lengths for t in range(L)], dtype=np.float64)
    assert norm.count.item() == len(fed) == fit.stats["env_steps"]
    np.testing.assert_allclose(norm.sum.numpy(), fed.sum(0))
    np.testing.assert_allclose(norm.sumsq.numpy(), np.square(fed).sum(0))
    # Frozen within a generation: forward still uses the old mean/std until the next call.
    assert torch.equal(norm.mean, torch.zeros(2))
    fit(FakePopulation(policy, stopper(stops), 3, 1))
    np.testing.assert_allclose(norm.mean.numpy(), fed.mean(0), rtol=1e-6)
    off = RolloutFitness("EggrollTest/Count-v0", obs_norm=False)
    fresh = count_policy()
    off(FakePopulation(fresh, stopper(stops), 3))
    assert fresh.obs_norm.count.item() == 0


def test_normaliser_sample_is_the_same_when_members_are_split_over_ranks():
    stops = [1, 2, 3, 4, 5, 6, 100, 2]
    whole = count_policy()
    RolloutFitness("EggrollTest/Count-v0", obs_norm_fraction=0.5, seed=4)(
        FakePopulation(whole, stopper(stops), 8, generation=3)
    )
    parts = []
    for lo, hi in ((0, 3), (3, 8)):  # two "ranks" with uneven contiguous blocks of members
        policy = count_policy()
        pop = FakePopulation(policy, stopper(stops[lo:hi]), 8, 3, indices=torch.arange(lo, hi))
        RolloutFitness("EggrollTest/Count-v0", obs_norm_fraction=0.5, seed=4)(pop)
        parts.append(policy.obs_norm)
    assert 0 < whole.obs_norm.count.item() < 8 * 5  # a sample, not every observation
    for name in ("count", "sum", "sumsq"):
        torch.testing.assert_close(getattr(whole.obs_norm, name), sum(getattr(p, name) for p in parts))
    assert RolloutFitness.stats_reduction == {
        "steps_per_second": "sum",
        "episode_length_max": "max",
        "lockstep_steps": "max",
        "rollout_seconds": "max",
    }


def test_cartpole_reset_shares_start_states_like_the_single_env():
    env = CartPoleVectorEnv(num_envs=6)
    seeds = [11, 22, 11, 22, 11, 22]
    obs = reset_with_seeds(env, seeds)
    for i, s in enumerate(seeds):
        single, _ = gym.make("CartPole-v1").reset(seed=s)
        np.testing.assert_array_equal(obs[i], single)
    np.testing.assert_array_equal(obs[0], obs[2])
    assert not np.array_equal(obs[0], obs[1])
    obs2, *_ = env.step(np.zeros(6, dtype=np.int64))
    np.testing.assert_array_equal(obs2[0], obs2[2])  # the physics continues from the set state


def test_make_vec_env_backends_and_errors():
    cartpole = make_vec_env("CartPole-v1", 3)
    assert type(cartpole) is CartPoleVectorEnv and cartpole.num_envs == 3
    capped = make_vec_env("CartPole-v1", 2, max_episode_steps=10)
    assert capped.max_episode_steps == 10
    same = make_vec_env("CartPole-v1", 2, autoreset_mode="SameStep")
    assert isinstance(same, SyncVectorEnv) and same.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert isinstance(make_vec_env("EggrollTest/Count-v0", 2), SyncVectorEnv)
    assert isinstance(make_vec_env("CartPole-v1", 2, backend="sync"), SyncVectorEnv)
    with pytest.raises(ValueError, match="CartPole-v1"):
        make_vec_env("CartPol-v1", 2)
    with pytest.raises(ValueError, match="Did you mean: CartPole-v1"):
        make_vec_env("cartpole-v1", 2)  # same suggestions as the CLI's env-id check
    with pytest.raises(ValueError, match="Unknown environment id"):
        RolloutFitness("NoSuchEnvironment-v0")
    with pytest.raises(ValueError, match="backend"):
        make_vec_env("CartPole-v1", 2, backend="ray")
    with pytest.raises(ValueError, match="no native vector"):
        make_vec_env("EggrollTest/Count-v0", 2, backend="vector_entry_point")
    built = make_vec_env(lambda n: CartPoleVectorEnv(num_envs=n), 4)
    assert built.num_envs == 4
    assert make_vec_env(built, 4) is built
    with pytest.raises(ValueError, match="4 sub-envs but 5"):
        make_vec_env(built, 5)
    with pytest.raises(TypeError, match="VectorEnv"):
        make_vec_env(lambda n: CountEnv(), 2)


def test_envpool_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "envpool", None)  # not installed
    with pytest.raises(ImportError, match=r"eggroll-rl\[envpool\]"):
        make_vec_env("CartPole-v1", 2, backend="envpool")

    made = {}

    class FakePool:
        """envpool 1.2.5's API over CartPole-v1 envs: ``step(actions, env_id)``, ``reset(env_id)``,
        sub-env i seeded with ``seed + i`` once, NEXT_STEP autoreset."""

        def __init__(self, num_envs, seed, max_episode_steps):
            limit = max_episode_steps
            self.envs = [gym.make("CartPole-v1", max_episode_steps=limit) for _ in range(num_envs)]
            self.stepped = self.autoresets = 0
            self.seeds = [seed + i for i in range(num_envs)]
            self.done = np.zeros(num_envs, bool)
            self.observation_space = self.envs[0].observation_space
            self.action_space = self.envs[0].action_space

        def reset(self, env_id=None):
            ids = np.arange(len(self.envs)) if env_id is None else np.asarray(env_id)
            obs = []
            for i in ids:
                obs.append(self.envs[i].reset(seed=self.seeds[i])[0])
                self.seeds[i], self.done[i] = None, False
            return np.stack(obs), {"env_id": ids}

        def step(self, actions, env_id=None):
            ids = np.arange(len(self.envs)) if env_id is None else np.asarray(env_id)
            out = []
            self.stepped += len(ids)
            for a, i in zip(actions, ids, strict=True):
                if self.done[i]:  # the autoreset step
                    self.autoresets += 1
                    out.append((self.envs[i].reset()[0], 0.0, False, False))
                    self.done[i] = False
                    continue
                o, r, te, tr, _ = self.envs[i].step(int(a))
                self.done[i] = te or tr
                out.append((o, r, te, tr))
            o, r, te, tr = (np.array(v) for v in zip(*out, strict=True))
            return o, r, te, tr, {"env_id": ids}

    def fake_make(task_id, env_type, num_envs, seed, **kwargs):
        made.update(task_id=task_id, env_type=env_type, seed=seed, **kwargs)
        made["pool"] = FakePool(num_envs, seed, kwargs.get("max_episode_steps"))
        return made["pool"]

    fake = types.SimpleNamespace(make=fake_make, list_all_envs=lambda: ["CartPole-v1"])
    monkeypatch.setitem(sys.modules, "envpool", fake)
    env = make_vec_env("CartPole-v1", 4, backend="envpool", max_episode_steps=50, seed=3)
    assert made["env_type"] == "gymnasium" and made["max_episode_steps"] == 50
    with pytest.raises(ValueError, match="CartPole-v1"):
        make_vec_env("CartPole-v2", 4, backend="envpool")
    policy = make_policy(env.single_observation_space, env.single_action_space)
    with pytest.warns(RuntimeWarning, match="common random numbers"):
        result = evaluate(policy, env, episodes=4)
    assert result.episodes == 4 and (result.lengths <= 50).all()
    # Only sub-envs inside an episode step (by env_id), and explicit resets replace autoresets.
    assert made["pool"].stepped == result.lengths.sum() and made["pool"].autoresets == 0
    pooled = evaluate(policy, make_vec_env("CartPole-v1", 3, backend="envpool", seed=3), episodes=7)
    assert pooled.episodes == 7 and made["pool"].stepped == pooled.lengths.sum()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize(("episodes", "num_envs"), [(10, 4), (3, 3), (5, None)])
def test_evaluate_quota_gives_exact_episodes_and_mean(mode, episodes, num_envs):
    policy = count_policy()
    with torch.no_grad():  # never press stop: episodes run to their seed-given limit
        policy.net[-1].weight.zero_()
        policy.net[-1].bias.copy_(torch.tensor([1.0, 0.0]))
    env = make_vec_env("EggrollTest/Count-v0", num_envs or episodes, autoreset_mode=mode)
    lockstep = gym.vector.VectorWrapper(env)  # not a bare SyncVectorEnv: the batched-API driver
    result = evaluate(policy, env, episodes=episodes, seed=5)
    # Episode e starts from reset(seed=derive_seed(1, 5, e)) whichever sub-env plays it.
    lengths = [count_limit(derive_seed(1, 5, e)) for e in range(episodes)]
    returns = [triangle(L) for L in lengths]
    again = evaluate(policy, lockstep, episodes=episodes, seed=5)
    np.testing.assert_array_equal(again.returns, returns)
    np.testing.assert_array_equal(again.lengths, lengths)
    assert isinstance(result, EvalResult) and result.episodes == episodes
    np.testing.assert_array_equal(result.lengths, lengths)
    np.testing.assert_allclose(result.returns, returns)
    assert result.mean == pytest.approx(np.mean(returns))
    assert result.std == pytest.approx(np.std(returns))
    assert result.length_mean == pytest.approx(np.mean(lengths))


def test_evaluate_with_more_sub_envs_than_episodes_and_by_id():
    policy = count_policy()
    env = make_vec_env("EggrollTest/Count-v0", 6)
    assert evaluate(policy, env, episodes=4).episodes == 4
    by_id = evaluate(policy, "EggrollTest/Count-v0", episodes=7, seed=2, max_episode_steps=3)
    assert by_id.episodes == 7 and by_id.lengths.max() <= 3
    again = evaluate(policy, "EggrollTest/Count-v0", episodes=7, seed=2, max_episode_steps=3)
    np.testing.assert_array_equal(again.returns, by_id.returns)  # seeded: reproducible


def test_evaluate_forwards_on_one_torch_thread_and_restores_the_count():
    # Small per-step forwards on torch's thread pool stall on a busy machine (ms per forward):
    # evaluate runs its episode loop on one thread and gives the caller's setting back.
    policy = count_policy()
    seen = []
    policy.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = evaluate(policy, "EggrollTest/Count-v0", episodes=5, seed=1)
        assert result.episodes == 5 and seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "sampled"])
def test_evaluate_gives_the_same_bits_however_episodes_are_batched(deterministic):
    """Row-independent forward (fused kernel) and per-episode sampling: num_envs changes nothing.

    PyTorch's GEMM may round a row differently in another batch size; on Pendulum (continuous
    actions, chaotic) one different bit changes the returns, so equality here is a real check.
    """
    env = gym.make("Pendulum-v1")
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=(16,), seed=1)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    policy.obs_norm.update(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 2)
    policy.obs_norm.freeze()
    runs = [
        evaluate(policy, "Pendulum-v1", episodes=5, seed=3, num_envs=n, deterministic=deterministic)
        for n in (None, 1, 2)
    ]
    assert all(r.returns.tobytes() == runs[0].returns.tobytes() for r in runs)
    assert len(set(runs[0].returns.tolist())) == 5
    # What evaluate forwards through is the policy itself, up to float32 rounding.
    x = torch.randn(33, 3, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        torch.testing.assert_close(rollout._center_kernel(policy)(x), policy(x), rtol=1e-5, atol=1e-6)


def test_record_episode_forwards_on_one_torch_thread(tmp_path):
    pytest.importorskip("moviepy")
    from eggroll_rl.video import record_episode

    env = gym.make("CartPole-v1")
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=(4,))
    seen = []
    policy.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rec = record_episode(policy, "CartPole-v1", tmp_path / "a.mp4", seed=1, max_steps=5)
        assert rec.length == len(seen) and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_box_actions_stay_in_bounds_through_the_env():
    env = TargetEnv()
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=(8,))
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0, 10)  # wild outputs: only the squash keeps actions legal
    result = evaluate(policy, "EggrollTest/Target-v0", episodes=8, deterministic=False)
    assert result.episodes == 8  # TargetEnv asserts every action is inside its box


def make_trainer(policy, fitness, **kw):
    args = {"population_size": 32, "learning_rate": 0.2, "sigma": 0.3, "seed": 0, **kw}
    return EGGROLLTrainer(model=policy, fitness_fn=fitness, **args)


def test_user_registered_env_trains_through_the_library():
    env = TargetEnv()
    torch.manual_seed(0)
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=())
    before = evaluate(policy, "EggrollTest/Target-v0", episodes=50, seed=1).mean
    fitness = RolloutFitness("EggrollTest/Target-v0", episodes_per_member=2, seed=0)
    # lr 0.5 under the former lr / sigma scale, converted to lr / (sigma^2 sqrt(N)): the same steps
    history = make_trainer(policy, fitness, learning_rate=0.5 / (0.5**2 * 32**0.5), sigma=0.5).train(100)
    after = evaluate(policy, "EggrollTest/Target-v0", episodes=50, seed=1).mean
    assert history["env_steps"][-1] == 32 * 2 * 5
    assert history["total_env_steps"][-1] == 100 * 32 * 2 * 5
    assert after > before / 2, (before, after)  # the squared error at least halves


def test_user_fitness_wrapping_the_rollout_adds_a_penalty():
    class Penalised(BatchedFitness):
        """Mean return minus a penalty on each member's output size at a probe observation."""

        def __init__(self) -> None:
            self.rollout = RolloutFitness("EggrollTest/Count-v0", seed=0)
            self.stats: dict[str, float] = {}
            self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def __call__(self, population):
            returns = self.rollout(population).float()
            probe = torch.ones(len(population), 2)
            penalty = population(probe).square().sum(-1)
            self.seen.append((returns, penalty))
            self.stats = {**self.rollout.stats, "penalty_mean": float(penalty.mean())}
            return returns - penalty

    fitness = Penalised()
    trainer = make_trainer(count_policy(), fitness, population_size=8)
    history = trainer.train(3)
    assert len(fitness.seen) == 3
    returns, penalty = fitness.seen[-1]
    assert (penalty > 0).all() and penalty.std() > 0  # members differ: perturbed outputs
    assert history["mean_fitness"][-1] == pytest.approx(float((returns - penalty).mean()), rel=1e-5)
    assert history["penalty_mean"][-1] == pytest.approx(float(penalty.mean()))
    assert history["env_steps"][-1] > 0


def test_episodes_per_member_through_the_real_population():
    fitness = RolloutFitness("EggrollTest/Count-v0", episodes_per_member=3, seed=0)
    trainer = make_trainer(count_policy(), fitness, population_size=6, noise_reuse=2)
    stats = trainer.step()
    assert fitness.env.num_envs == 18
    assert stats["env_steps"] >= 18
    with pytest.raises(ValueError, match="num_envs must be >= 1"):
        RolloutFitness("EggrollTest/Count-v0", num_envs=0)
    assert fitness.state_dict() == {"total_env_steps": int(stats["env_steps"])}


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "torch"])
def test_discrete_actions_are_the_argmax_plus_start(fused, monkeypatch):
    """Members act with ``argmax + start`` (fused into the forward on CPU): a perfect picker scores 4."""
    from eggroll_rl import kernels

    if fused and not kernels.available():
        pytest.skip("no compiled kernel here")
    if not fused:
        monkeypatch.setattr(kernels, "available", lambda: False)
    calls = []
    real = kernels.MLPKernel.__call__
    monkeypatch.setattr(kernels.MLPKernel, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    env = PickEnv()
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=(), normalize_obs=False)
    with torch.no_grad():
        policy.net[0].weight.copy_(10 * torch.eye(3))
    fitness = RolloutFitness("EggrollTest/Pick-v0", seed=0)
    trainer = make_trainer(policy, fitness, population_size=6, sigma=0.01)
    population = trainer.make_population(trainer.sample_perturbations(6), torch.arange(6))
    np.testing.assert_array_equal(fitness(population).numpy(), np.full(6, 4.0))
    assert len(calls) == (4 if fused else 0)  # one fused call per lockstep step


def test_cartpole_solved_through_the_library_api():
    env = gym.make("CartPole-v1")
    torch.manual_seed(0)
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=())
    fitness = RolloutFitness("CartPole-v1", seed=0)
    trainer = make_trainer(policy, fitness, population_size=64)
    result = None
    for _ in range(30):
        stats = trainer.step()
        if stats["mean_fitness"] >= 400:
            result = evaluate(policy, "CartPole-v1", episodes=100, seed=123)
            if result.mean >= 475:
                break
    assert result is not None and result.mean >= 475, (trainer.generation, result)
    assert result.episodes == 100


@pytest.mark.filterwarnings("ignore:.*precision lowered:UserWarning")  # envpool's float64 bounds
def test_real_envpool_backend_trains_and_evaluates():
    """With envpool installed, its C++ pools drive the rollout and evaluation end to end."""
    pytest.importorskip("envpool")
    fitness = RolloutFitness("CartPole-v1", backend="envpool", seed=3)
    env = gym.make("CartPole-v1")
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=())
    trainer = make_trainer(policy, fitness, population_size=8)
    with pytest.warns(RuntimeWarning, match="no common random numbers"):
        history = trainer.train(2)
    assert type(fitness.env).__name__ == "EnvpoolVectorEnv" and fitness.env.num_envs == 8
    assert history["env_steps"][-1] >= 8 * 8  # every CartPole episode lasts at least 8 steps
    with pytest.warns(RuntimeWarning, match="no common random numbers"):
        result = evaluate(policy, "CartPole-v1", episodes=6, seed=1, backend="envpool")
    assert result.episodes == 6 and (result.lengths >= 8).all()
    np.testing.assert_allclose(result.returns, result.lengths)  # CartPole: +1 per step
