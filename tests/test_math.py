"""The ES maths against independent references: update scale, non-finite values, shaping, grouping.

The update convention is the EGGROLL reference implementation's (ESHyperscale/HyperscaleES,
``_do_update``): ``update = sigma * sqrt(N) * mean_i(f~_i E_i)``, plain step ``lr * update``.
"""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from eggroll_rl import (
    EGGROLLTrainer,
    RolloutFitness,
    VanillaESTrainer,
    batched_fitness,
    evaluate,
    make_policy,
)
from eggroll_rl.policies import ObservationNormalizer
from eggroll_rl.rollout import episode_seed
from eggroll_rl.shaping import centered_rank, make_shaper, zscore

from toy import make_trainer, mlp

TRAINERS = {"vanilla": VanillaESTrainer, "eggroll": EGGROLLTrainer}
X = torch.linspace(-1, 1, 12).reshape(3, 4)
C = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, -1.0], [2.0, 1.0, -0.5]])


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def objective(out: torch.Tensor) -> torch.Tensor:
    """A fitness linear in the parameters of ``linear_model``."""
    return (out * C).sum(dim=(-2, -1))


def per_model_linear(model: nn.Module) -> float:
    with torch.no_grad():
        return float(objective(model(X)))


@batched_fitness
def batched_linear(population) -> torch.Tensor:
    return objective(population(X.expand(len(population), *X.shape)))


def gradient() -> torch.Tensor:
    """Return the fitness gradient by autograd, flat in parameter order."""
    model = linear_model()
    objective(model(X)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


# -- §5: the step's scale is the reference's ------------------------------------------------------
@pytest.mark.parametrize("kind", ["vanilla", "eggroll"])
@pytest.mark.parametrize(
    ("batched", "shaping"),
    [(True, "identity"), (True, "zscore"), pytest.param(False, "identity", marks=pytest.mark.slow)],
)
def test_plain_step_matches_the_reference_scale_on_a_known_gradient(kind, batched, shaping):
    """One generation on a linear fitness moves the center by the reference's step on average.

    Raw fitness (identity shaping, antithetic pairs cancel f(theta)): E[f_i E_i] = sigma g, so the
    step ``lr * sigma * sqrt(N) * mean_i(f_i E_i)`` is ``lr sigma^2 sqrt(N) g``. Z-scored fitness
    f~ = g.E / std(g.E): the step along g/|g| is ``lr sigma sqrt(N) std(g.E)/|g|``, about
    ``lr sigma sqrt(N)``. (The former ``lr/sigma`` scale is 4.4x off here: sigma^2 sqrt(N) = 0.23.)
    Over seeds 0-7 the ratio stays within 0.96-1.06 for both trainers; the bound is 0.15.
    """
    n, lr, sigma = 8192, 0.5, 0.05
    trainer = TRAINERS[kind](
        model=linear_model(),
        fitness_fn=batched_linear if batched else per_model_linear,
        population_size=n,
        learning_rate=lr,
        sigma=sigma,
        noise_reuse=2,
        fitness_shaping=(lambda f: f) if shaping == "identity" else "zscore",
        seed=0,
    )
    g = gradient().double()
    start = trainer.current_params.clone()
    trainer.step()
    step = (trainer.current_params - start).double()
    along = float(step @ g) / float(g.norm())
    expected = lr * sigma * math.sqrt(n) * (sigma * float(g.norm()) if shaping == "identity" else 1.0)
    assert along / expected == pytest.approx(1.0, abs=0.15)
    assert _cos(step, g) > 0.95


@pytest.mark.parametrize("kind", ["vanilla", "eggroll"])
def test_sgd_optimizer_takes_the_plain_step(kind):
    """``optimizer="sgd"`` receives ``-update`` as the gradient: the same step as no optimizer."""
    plain = make_trainer(kind, learning_rate=0.3, noise_reuse=2)
    sgd = make_trainer(kind, learning_rate=0.3, noise_reuse=2, optimizer="sgd")
    plain.train(3)
    sgd.train(3)
    assert torch.allclose(plain.current_params, sgd.current_params, atol=1e-6)


def _explicit_directions(trainer, p) -> torch.Tensor:
    """Rebuild every member's unit-variance direction E_i from the drawn factors, one by one."""
    rows = []
    for i in range(len(p)):
        j, sign = int(p.draw_index[i]), float(p.signs[i])
        if isinstance(trainer, VanillaESTrainer):
            rows.append(sign * p.noise[j].double())
            continue
        parts = []
        for spec in trainer._params.specs:
            if spec.name in p.lowrank:
                a, b = p.factors(spec.name)
                e = a[j].double() @ b[j].double().T / math.sqrt(trainer.rank)
            elif spec.name in p.frozen:
                e = torch.zeros(spec.shape, dtype=torch.float64)
            else:
                e = p.vector(spec.name)[j].double()
            parts.append(sign * e.reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("vanilla", {}),
        ("vanilla", {"noise_reuse": 2, "group_size": 4}),
        ("eggroll", {"rank": 1}),
        ("eggroll", {"rank": 3, "noise_reuse": 2}),
        ("eggroll", {"rank": 2, "freeze_nonlora": True, "group_size": 6}),
    ],
)
def test_update_is_the_reference_estimator(kind, kw):
    """update == sigma sqrt(N) mean_i(f~_i E_i), E_i rebuilt by hand, f~ the reference z-score."""
    n = 12
    trainer = make_trainer(kind, population_size=n, **kw)
    p = trainer.sample_perturbations(n)
    eps = _explicit_directions(trainer, p)
    for i in range(n):  # member i is evaluated at center + sigma * E_i
        assert torch.allclose(p[i].double(), trainer.sigma * eps[i], atol=1e-6)
    f = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = kw.get("group_size", 0) or n
    groups = f.view(-1, g)
    shaped = ((groups - groups.mean(1, keepdim=True)) / f.std(correction=0)).reshape(-1)
    expected = trainer.sigma * math.sqrt(n) * (shaped[:, None] * eps).mean(0)
    assert torch.allclose(trainer.compute_update(p, f).double(), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["vanilla", "eggroll"])
def test_member_directions_have_unit_variance(kind):
    """Members sit at sigma * E with E of unit variance (not 2 sigma, not sigma / sqrt(r))."""
    model = nn.Linear(32, 32)
    trainer = TRAINERS[kind](model=model, fitness_fn=per_model_linear, population_size=256, sigma=0.3, seed=7)
    p = trainer.sample_perturbations(256)
    eps = torch.stack([p[i] for i in range(256)]) / 0.3
    assert float(eps.var()) == pytest.approx(1.0, abs=0.05)


def test_group_size_reaches_the_shaper():
    """Group offsets (e.g. per-group start states) vanish under grouped shaping, not under global."""

    @batched_fitness
    def offset_linear(population):
        return objective(population(X.expand(len(population), *X.shape))) + 1e3 * (population.indices // 8)

    g = gradient().double()
    cosines = {}
    for group_size in (8, 0):
        trainer = EGGROLLTrainer(
            model=linear_model(),
            fitness_fn=offset_linear,
            population_size=2048,
            sigma=0.05,
            group_size=group_size,  # no antithetic pairs: they would cancel the offsets anyway
            seed=0,
        )
        p = trainer.sample_perturbations(2048)
        f = offset_linear(trainer.make_population(p, torch.arange(2048))).double()
        cosines[group_size] = _cos(trainer.compute_update(p, f).double(), g)
    assert cosines[8] > 0.9 > 0.5 > abs(cosines[0])


# -- §4: ties, grouping and reuse -------------------------------------------------------------------
def test_centered_rank_ties_share_the_average_rank():
    assert torch.equal(centered_rank(torch.ones(8)), torch.zeros(8))
    assert torch.equal(centered_rank(torch.ones(8), 4), torch.zeros(8))
    # ranks (0.5, 0.5, 2, 3) of 0..3
    expected = torch.tensor([0.5, 0.5, 2.0, 3.0]) / 3 - 0.5
    assert torch.allclose(centered_rank(torch.tensor([1.0, 1.0, 2.0, 3.0])), expected)
    f = torch.tensor([5.0, 1.0, 5.0, 5.0, 2.0, 2.0])
    assert torch.allclose(centered_rank(f, 3), torch.tensor([0.25, -0.5, 0.25, 0.5, -0.25, -0.25]))


@pytest.mark.parametrize("shaping", ["zscore", "centered_rank"])
@pytest.mark.parametrize("group_size", [0, 4])
def test_equal_fitness_leaves_the_center_alone(shaping, group_size):
    """All members tie: every weight is 0, so neither the plain step nor Adam moves the center."""
    for optimizer in (None, "adam"):
        trainer = EGGROLLTrainer(
            model=mlp(),
            fitness_fn=batched_fitness(lambda p: torch.full((len(p),), 3.0)),
            population_size=16,
            learning_rate=0.05,
            fitness_shaping=shaping,
            group_size=group_size,
            noise_reuse=2,
            optimizer=optimizer,
        )
        start = trainer.current_params.clone()
        trainer.train(3)
        assert torch.equal(trainer.current_params, start)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"population_size": 12, "noise_reuse": 2, "group_size": 3}, r"group_size \(3\) must be a multiple"),
        ({"population_size": 12, "noise_reuse": 3}, r"noise_reuse must be 0 .* or 2"),
        ({"population_size": 16, "noise_reuse": 4}, r"noise_reuse must be 0 .* or 2"),
    ],
)
@pytest.mark.parametrize("kind", ["vanilla", "eggroll"])
def test_reuse_and_grouping_refused_at_construction(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(kind, **kwargs)


# -- §3: non-finite fitness -------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("shaper", [zscore, centered_rank])
@pytest.mark.parametrize("group_size", [0, 2, 4])
def test_non_finite_fitness_shaped_strictly_worst(shaper, group_size):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        f = torch.randint(0, 3, (16,), generator=gen).double()  # many ties among the finite
        bad = torch.rand(16, generator=gen) < 0.3
        f[bad] = torch.tensor([NAN, INF, -INF], dtype=torch.float64)[
            torch.randint(0, 3, (int(bad.sum()),), generator=gen)
        ]
        w = shaper(f, group_size)
        assert bool(torch.isfinite(w).all())
        g = group_size or 16
        for fg, wg, bg in zip(f.view(-1, g), w.view(-1, g), bad.view(-1, g)):
            assert float(wg.sum()) == pytest.approx(0.0, abs=1e-9)  # still a baseline
            if bg.any() and (~bg).any():
                assert float(wg[bg].max()) < float(wg[~bg].min())
            finite = fg[~bg]
            for a in range(len(finite)):  # the finite members keep their order
                for b in range(len(finite)):
                    if finite[a] < finite[b]:
                        assert wg[~bg][a] < wg[~bg][b]


def test_non_finite_fitness_zscore_by_hand():
    # finite 1, 3, 2: mean 2, std sqrt(2/3); NaN and inf one std below the worst (1), then re-centred
    s = math.sqrt(2 / 3)
    raw = torch.tensor([-1 / s, -1 / s - 1, 1 / s, -1 / s - 1, 0.0], dtype=torch.float64)
    f = torch.tensor([1.0, NAN, 3.0, INF, 2.0], dtype=torch.float64)
    assert torch.allclose(zscore(f), raw - raw.mean())
    # a custom shaper sees a finite stand-in strictly below every finite fitness
    seen = make_shaper(lambda x: x)(f)
    assert bool(torch.isfinite(seen).all()) and float(seen[1]) == float(seen[3]) < 1.0


def test_stats_cover_finite_members_and_count_the_others():
    values = torch.tensor([1.0, NAN, 3.0, INF])
    trainer = EGGROLLTrainer(model=mlp(), fitness_fn=batched_fitness(lambda p: values), population_size=4)
    with pytest.warns(RuntimeWarning, match="2 non-finite fitness value.*strictly below every finite"):
        stats = trainer.step()
    assert stats["fitness"] == 3.0 and trainer.best_fitness == 3.0
    assert stats["mean_fitness"] == 2.0 and stats["std_fitness"] == 1.0
    assert trainer.history["nonfinite_fitness"] == [2.0]
    assert bool(torch.isfinite(trainer.current_params).all())


class Scalar(nn.Module):
    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))


def nan_below_zero(model: nn.Module) -> float:
    return math.nan if float(model.w) < 0 else 1.0


@pytest.mark.parametrize("kind", ["vanilla", "eggroll"])
@pytest.mark.parametrize("shaping", ["zscore", "centered_rank"])
@pytest.mark.parametrize("group_size", [0, 4])
@pytest.mark.parametrize("optimizer", [None, "adam"])
def test_center_leaves_a_nan_region(kind, shaping, group_size, optimizer):
    """Fitness NaN for w < 0 and 1 otherwise: from w = -0.05 the center must reach w >= 0."""
    trainer = TRAINERS[kind](
        model=Scalar(-0.05),
        fitness_fn=nan_below_zero,
        population_size=16,
        learning_rate=0.05 if optimizer else 0.5,
        sigma=0.1,
        noise_reuse=2,
        group_size=group_size,
        fitness_shaping=shaping,
        optimizer=optimizer,
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train(20)
    assert float(trainer.current_params[0]) >= 0.0


def test_custom_update_that_is_not_finite_is_refused():
    class NaiveES(VanillaESTrainer):
        def compute_update(self, perturbations, fitnesses):
            return perturbations.contract(fitnesses.float())  # NaN fitness -> NaN update

    values = torch.tensor([1.0, NAN, 3.0, 2.0])
    trainer = NaiveES(model=mlp(), fitness_fn=batched_fitness(lambda p: values), population_size=4)
    start = trainer.current_params.clone()
    with pytest.raises(ValueError, match="non-finite values at generation 0"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.step()
    assert torch.equal(trainer.current_params, start)


# -- §3: non-finite observations and returns ----------------------------------------------------------
class GlitchEnv(gym.Env):
    """Five steps; observation [t, 1]; on a coin flip per episode, t = 2's observation is NaN.

    ``reward`` (default 1 per step) lets an evaluation see non-finite returns.
    """

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, reward: float = 1.0, bad_reward: float = 1.0) -> None:
        self.reward, self.bad_reward = reward, bad_reward

    def _obs(self):
        x = np.array([self.t, 1.0], dtype=np.float32)
        if self.glitch and self.t == 2:
            x[0] = np.nan
        return x

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.glitch = 0, bool(self.np_random.random() < 0.5)
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        reward = self.bad_reward if self.glitch else self.reward
        return self._obs(), reward, False, self.t >= 5, {}


if "EggrollMath/Glitch-v0" not in gym.registry:
    gym.register(id="EggrollMath/Glitch-v0", entry_point=GlitchEnv)


def glitches(seed: int) -> bool:
    env = GlitchEnv()
    env.reset(seed=seed)
    return env.glitch


def test_normaliser_leaves_non_finite_observations_out():
    norm = ObservationNormalizer(2)
    batch = torch.tensor([[1.0, 2.0], [NAN, 5.0], [3.0, INF], [5.0, 4.0]])
    assert norm.update(batch) == 2
    norm.freeze()
    assert norm.count.item() == 2
    assert torch.allclose(norm.mean, torch.tensor([3.0, 3.0]))
    assert torch.allclose(norm.std, torch.tensor([2.0, 1.0]))


def test_rollout_normaliser_stays_finite_and_the_run_counts_what_it_left_out():
    env = GlitchEnv()
    torch.manual_seed(0)
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=())
    fitness = RolloutFitness("EggrollMath/Glitch-v0", episodes_per_member=4, obs_norm_fraction=1.0, seed=0)
    trainer = EGGROLLTrainer(model=policy, fitness_fn=fitness, population_size=8, seed=0)
    trainer.train(3)
    glitched = [sum(glitches(episode_seed(0, gen, j)) for j in range(4)) for gen in range(3)]
    assert 0 < sum(glitched) < 12  # the seeds do glitch some episodes and spare others
    assert trainer.history["obs_nonfinite"] == [8.0 * k for k in glitched]
    rows = 8 * 4 * 5 * 3 - 8 * sum(glitched)
    assert policy.obs_norm.count.item() == rows
    policy.obs_norm.freeze()
    # obs[0] runs 0..4 per episode (10 over 5 rows); a glitched one loses t = 2 (8 over 4 rows)
    clean, dirty = 8 * (12 - sum(glitched)), 8 * sum(glitched)
    assert float(policy.obs_norm.mean[0]) == pytest.approx((10 * clean + 8 * dirty) / rows)
    assert float(policy.obs_norm.mean[1]) == 1.0
    assert bool(torch.isfinite(policy.obs_norm.std).all())


@pytest.mark.parametrize(("bad", "mean"), [(NAN, "nan"), (INF, "inf")])
def test_evaluation_reports_non_finite_returns(bad, mean):
    env = GlitchEnv()
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=())
    result = evaluate(policy, "EggrollMath/Glitch-v0", episodes=20, seed=0, env_kwargs={"bad_reward": bad})
    expected = int((~np.isfinite(result.returns)).sum())
    assert 0 < result.nonfinite == expected < 20
    assert np.isfinite(result.returns).sum() == 20 - expected
    assert (math.isnan if mean == "nan" else math.isinf)(result.mean) and math.isnan(result.std)
    assert f"({expected} non-finite returns)" in str(result)
    clean = evaluate(policy, "EggrollMath/Glitch-v0", episodes=20, seed=0)
    assert clean.nonfinite == 0 and clean.mean == 5.0 and clean.std == 0.0


# -- the trainer against a single-env loop ------------------------------------------------------------
def test_generation_matches_single_env_loops_with_rebuilt_member_weights():
    """Member fitness = a plain CartPole loop with W + sigma/sqrt(r) sign A B^T; the step follows."""
    env = gym.make("CartPole-v1")
    torch.manual_seed(0)
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=(8,), normalize_obs=False)
    seen = {}

    class Recording(RolloutFitness):
        def __call__(self, population):
            seen["fitness"] = super().__call__(population)
            return seen["fitness"]

    n, lr, sigma = 16, 0.2, 0.3
    trainer = EGGROLLTrainer(
        model=policy,
        fitness_fn=Recording("CartPole-v1", seed=0),
        population_size=n,
        learning_rate=lr,
        sigma=sigma,
        rank=2,
        noise_reuse=2,
        seed=0,
    )
    center = {k: v.detach().clone() for k, v in policy.named_parameters()}
    p = trainer.sample_perturbations(n)
    trainer.step()
    members = []
    for i in range(n):
        j, sign = int(p.draw_index[i]), float(p.signs[i])
        weights = {}
        for name, value in center.items():
            if value.dim() == 2:
                a, b = p.factors(name)
                weights[name] = value + sign * sigma / math.sqrt(2) * a[j] @ b[j].T
            else:
                weights[name] = value + sign * sigma * p.vector(name)[j]
        members.append(weights)
        model = make_policy(env.observation_space, env.action_space, hidden_sizes=(8,), normalize_obs=False)
        model.load_state_dict(weights)
        obs, _ = env.reset(seed=episode_seed(0, 0, 0))
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = int(model(torch.as_tensor(obs).unsqueeze(0)).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + reward, terminated or truncated
        assert float(seen["fitness"][i]) == total
    f = seen["fitness"].double()
    shaped = (f - f.mean()) / f.std(correction=0)
    flat = [torch.cat([(m[k] - center[k]).reshape(-1) for k in center]).double() / sigma for m in members]
    expected_step = lr * sigma * math.sqrt(n) * sum(s * e for s, e in zip(shaped, flat)) / n
    moved = torch.cat([(v.detach() - center[k]).reshape(-1) for k, v in policy.named_parameters()])
    assert torch.allclose(moved.double(), expected_step, atol=1e-5)
