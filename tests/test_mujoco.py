"""MuJoCo locomotion: the ES options these tasks need, headless recording, and the v5 presets.

The options are general (any env): ARS's top-b direction keeping, weight decay, the sigma
schedule, the running observation normaliser and linear policies; each is checked against
values computed here by hand or with numpy. The presets get a short smoke run each.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eggroll_rl import EGGROLLTrainer, VanillaESTrainer, batched_fitness, make_policy
from eggroll_rl.policies import ObservationNormalizer
from eggroll_rl.presets import PresetError, apply_overrides, list_presets, load_preset
from eggroll_rl.shaping import centered_rank, top_directions, zscore

ROOT = Path(__file__).resolve().parent.parent
MUJOCO_PRESETS = ["Ant-v5", "HalfCheetah-v5", "Hopper-v5", "Swimmer-v5", "Walker2d-v5"]
mujoco = pytest.importorskip("mujoco")


# --------------------------------------------------------------------------------------------
# Top-b direction keeping (ARS)


def test_top_directions_keeps_exactly_the_b_best_pairs_by_hand() -> None:
    # Pairs (f+, f-): (1, 5) (4, 2) (0, 0) (3, 7) -> max 5, 4, 0, 7: b = 2 keeps pairs 0 and 3.
    f = torch.tensor([1.0, 5.0, 4.0, 2.0, 0.0, 0.0, 3.0, 7.0], dtype=torch.float64)
    shaped = top_directions(2, "zscore")(f)
    kept = torch.tensor([1.0, 5.0, 3.0, 7.0], dtype=torch.float64)  # mean 4, std sqrt(5)
    scale = 8 / 4  # N / (2b)
    expected = torch.tensor(
        [-3 / 5**0.5, 1 / 5**0.5, 0, 0, 0, 0, -1 / 5**0.5, 3 / 5**0.5], dtype=torch.float64
    )
    torch.testing.assert_close(shaped, expected * scale)
    torch.testing.assert_close(shaped[[0, 1, 6, 7]], zscore(kept) * scale)
    # b = 1 keeps pair 3 only; b >= N/2 is the base shaper unchanged.
    one = top_directions(1, "zscore")(f)
    assert one[:6].abs().sum() == 0 and one[6] < 0 < one[7]
    torch.testing.assert_close(top_directions(4, "centered_rank")(f), centered_rank(f))
    torch.testing.assert_close(top_directions(9, "zscore")(f), zscore(f))


def test_top_directions_ties_keep_the_lower_pair_and_the_base_shaper_applies() -> None:
    f = torch.tensor([2.0, 1.0, 0.0, 2.0, 2.0, -1.0], dtype=torch.float64)  # every pair's max is 2
    shaped = top_directions(2, "zscore")(f)
    # Pairs 0 and 1 kept: (2, 1, 0, 2) has mean 1.25 and std sqrt(0.6875); scale N/(2b) = 6/4.
    kept = (torch.tensor([2.0, 1.0, 0.0, 2.0], dtype=torch.float64) - 1.25) / 0.6875**0.5
    torch.testing.assert_close(shaped, torch.cat([kept * 6 / 4, torch.zeros(2, dtype=torch.float64)]))


def test_top_directions_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="integer >= 1"):
        top_directions(0)
    with pytest.raises(ValueError, match="antithetic pairs"):
        top_directions(1)(torch.zeros(5))
    with pytest.raises(ValueError, match="fitness_shaping"):
        top_directions(1, "rank")


def _quadratic_trainer(shaping, cls=VanillaESTrainer, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    target = torch.linspace(-1, 1, 8)

    @batched_fitness
    def fitness(population):
        flat = torch.cat([p.reshape(len(population), -1) for p in population.params()], 1)
        return -((flat - target) ** 2).sum(1)

    return cls(model, fitness, 16, 0.1, 0.1, noise_reuse=2, fitness_shaping=shaping, seed=3, **kwargs)


def test_top_directions_update_ignores_the_dropped_pairs() -> None:
    trainer = _quadratic_trainer(top_directions(3, "zscore"))
    p = trainer.sample_perturbations(16)
    f = torch.arange(16, dtype=torch.float64)  # pairs' maxima 1, 3, ..., 15: pairs 5-7 kept
    base = trainer.compute_update(p, f)
    changed = f.clone()
    changed[:10] = torch.tensor([9.0, -4.0, 0.5, 3.0, -7.0, 8.0, 2.0, 2.0, 10.0, -1.0])  # still below
    torch.testing.assert_close(trainer.compute_update(p, changed), base)
    changed[0] = 100.0  # pair 0 now beats pair 5: the update changes
    assert not torch.allclose(trainer.compute_update(p, changed), base)
    # The update lies in the span of the kept directions: members 10..15's perturbations.
    dirs = torch.stack([p[i] for i in range(10, 16, 2)])
    coef = torch.linalg.lstsq(dirs.T, base.unsqueeze(1)).solution
    torch.testing.assert_close(dirs.T @ coef.squeeze(1), base, atol=1e-6, rtol=1e-5)


def test_sgd_at_lr_2alpha_over_sigma_sqrt_n_takes_ars_v2t_step() -> None:
    """ARS V2-t: theta += alpha / (b sigma_R) sum_k (r+_k - r-_k) delta_k over the b best pairs.

    With zscore-shaped top-b and plain SGD the trainer steps ``lr * sigma * sqrt(N) / (2b) *
    sum_k (r+_k - r-_k) / sigma_R * eps_k``: the same step when ``lr = 2 alpha / (sigma sqrt(N))``,
    how the MuJoCo presets carry ARS's step sizes over (Ant-v5: alpha 0.015, sigma 0.025, N 32).
    """
    alpha, sigma, n, b = 0.015, 0.025, 16, 3
    trainer = _quadratic_trainer(top_directions(b, "zscore"))
    p = trainer.sample_perturbations(n)
    r = torch.tensor([3.0, -1.0, 0.5, 2.5, 7.0, 1.0, -2.0, 0.0, 4.0, 6.5, 1.5, 1.0, 0.0, 2.0, 5.0, -3.0])
    lr = 2 * alpha / (sigma * math.sqrt(n))
    step = lr * trainer.compute_update(p, r.double()).double()
    # By hand: pairs (2j, 2j+1) ranked by max(r+, r-): maxima 3, 2.5, 7, 0, 6.5, 1.5, 2, 5 -> 2, 4, 7.
    top = [2, 4, 7]
    plus, minus = r[[2 * k for k in top]].double(), r[[2 * k + 1 for k in top]].double()
    sigma_r = torch.cat([plus, minus]).std(correction=0)
    eps = [p[2 * k].double() / sigma for k in top]  # member 2k is +sigma * eps_k, 2k+1 is -sigma * eps_k
    torch.testing.assert_close(p[2 * top[0] + 1].double(), -p[2 * top[0]].double())
    ars = alpha / (b * sigma_r) * sum((pk - mk) * e for pk, mk, e in zip(plus, minus, eps))
    torch.testing.assert_close(step, ars, rtol=1e-5, atol=1e-9)


def test_top_directions_preset_key_builds_the_shaper_and_is_validated() -> None:
    from eggroll_rl.run import build_trainer

    preset = apply_overrides(
        load_preset("CartPole-v1"),
        ["trainer.population=8", "trainer.top_directions=2", "trainer.fitness_shaping=zscore"],
    )
    trainer = build_trainer(preset)
    f = torch.tensor([1.0, 5.0, 4.0, 2.0, 0.0, 0.0, 3.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(trainer.shaper(f), top_directions(2, "zscore")(f))
    for sets, fragment in (
        (["trainer.top_directions=5", "trainer.population=8"], "population/2 = 4"),
        (["trainer.top_directions=2", "trainer.noise_reuse=0"], "trainer.noise_reuse: must be 2"),
        (["trainer.top_directions=2", "trainer.group_size=4"], "trainer.group_size: must be 0"),
    ):
        with pytest.raises(PresetError, match=fragment):
            apply_overrides(load_preset("CartPole-v1"), sets)


# --------------------------------------------------------------------------------------------
# Weight decay and the sigma schedule


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_shrinks_by_one_minus_lr_times_decay(optimizer: str) -> None:
    # Equal fitness: the ES step is zero, so a generation only applies the decay.
    model = nn.Linear(4, 3)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    @batched_fitness
    def flat(population):
        return torch.ones(len(population))

    lr, wd = 0.05, 0.1
    trainer = EGGROLLTrainer(
        model,
        flat,
        8,
        lr,
        0.1,
        noise_reuse=2,
        fitness_shaping="zscore",
        optimizer=optimizer,
        optimizer_kwargs={"weight_decay": wd},
    )
    trainer.train(3)
    torch.testing.assert_close(trainer.current_params, start * (1 - lr * wd) ** 3)


def test_weight_decay_preset_key_reaches_the_optimizer() -> None:
    from eggroll_rl.run import build_trainer

    preset = apply_overrides(load_preset("CartPole-v1"), ["optimizer=adamw", "weight_decay=0.01"])
    trainer = build_trainer(preset)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.01


def test_sigma_and_lr_schedules_from_a_preset() -> None:
    from eggroll_rl.run import train

    preset = apply_overrides(
        load_preset("CartPole-v1"),
        [
            "sigma=0.4",
            "sigma_decay=0.9",
            "lr=0.2",
            "lr_decay=0.5",
            "population=8",
            "generations=4",
            "eval.every=0",
            "eval.episodes=1",
            "stop_on_target=false",
        ],
    )
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        rows = train(preset, out).rows
    assert [r["sigma"] for r in rows] == pytest.approx([0.4 * 0.9**g for g in range(4)])
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.2 * 0.5**g for g in range(4)])


# --------------------------------------------------------------------------------------------
# Observation normaliser and linear policies


def test_normaliser_statistics_equal_numpy_over_every_batch_seen() -> None:
    rng = np.random.default_rng(0)
    norm = ObservationNormalizer(3)
    seen = []
    for n in (1, 7, 1000, 50_000):  # a long run: large offsets, tiny and huge batches
        batch = rng.normal([1e3, -2.0, 0.0], [1e-2, 3.0, 1e-3], size=(n, 3))
        norm.update(batch)
        seen.append(batch)
    norm.freeze()
    allobs = np.concatenate(seen)
    assert norm.count.item() == len(allobs)
    np.testing.assert_allclose(norm.mean.numpy(), allobs.mean(0).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(norm.std.numpy(), allobs.std(0).astype(np.float32), rtol=1e-4)


def test_rollout_feeds_the_normaliser_every_observation_with_fraction_one() -> None:
    from eggroll_rl.run import build_trainer

    preset = apply_overrides(
        load_preset("Swimmer-v5"),
        ["population=4", "train_max_episode_steps=30", "obs_norm_fraction=1", "normalize_obs=true"],
    )
    trainer = build_trainer(preset)
    trainer.step()
    norm = trainer.model.obs_norm
    assert norm.count.item() == trainer.fitness_fn.stats["env_steps"] == 4 * 30
    trainer.fitness_fn.close()


def test_reward_shift_and_crn_preset_keys_reach_the_fitness_and_reject_bad_values() -> None:
    from eggroll_rl.presets import PresetError
    from eggroll_rl.run import build_trainer

    keys = ["population=4", "top_directions=1", "reward_shift=1", "crn=pair"]
    trainer = build_trainer(apply_overrides(load_preset("Hopper-v5"), keys))
    assert trainer.fitness_fn.reward_shift == 1.0
    assert trainer.fitness_fn.crn == "pair"
    with pytest.raises(PresetError, match=r"rollout\.reward_shift"):
        apply_overrides(load_preset("Hopper-v5"), ["reward_shift=nan"])
    with pytest.raises(PresetError, match=r"rollout\.crn.*pair"):
        apply_overrides(load_preset("Hopper-v5"), ["crn=member"])


def test_train_cap_generations_is_a_horizon_curriculum() -> None:
    from eggroll_rl.presets import PresetError
    from eggroll_rl.run import build_trainer

    keys = ["population=4", "top_directions=1", "train_max_episode_steps=30", "train_cap_generations=2"]
    fitness = build_trainer(apply_overrides(load_preset("HalfCheetah-v5"), keys)).fitness_fn
    assert [fitness._cap(g) for g in range(4)] == [30, 30, None, None]  # None: the env's 1000 steps
    keys[-1] = "train_cap_generations=0"  # the default: every generation capped
    fitness = build_trainer(apply_overrides(load_preset("HalfCheetah-v5"), keys)).fitness_fn
    assert [fitness._cap(g) for g in (0, 5000)] == [30, 30]
    with pytest.raises(PresetError, match=r"rollout\.train_cap_generations: must be >= 0"):
        apply_overrides(load_preset("HalfCheetah-v5"), ["train_cap_generations=-1"])
    with pytest.raises(PresetError, match=r"rollout\.train_cap_generations: needs rollout\.train_max"):
        apply_overrides(
            load_preset("HalfCheetah-v5"), ["train_max_episode_steps=none", "train_cap_generations=5"]
        )


def test_linear_policy_is_one_matrix() -> None:
    import gymnasium as gym

    env = gym.make("Hopper-v5")
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=())
    env.close()
    linears = [m for m in policy.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(3, 11)]
    x = torch.randn(5, 11)
    lin = linears[0]
    normed = (x - policy.obs_norm.mean) / policy.obs_norm.std
    torch.testing.assert_close(policy(x), normed @ lin.weight.T + lin.bias)


# --------------------------------------------------------------------------------------------
# Headless recording


def test_choose_mujoco_gl_prefers_egl_then_osmesa_and_explains_when_none_works() -> None:
    from eggroll_rl.video import NO_GL_MESSAGE, RenderBackendError, choose_mujoco_gl

    tried: list[str] = []

    def probe(works):
        def run(name):
            tried.append(name)
            return name in works

        return run

    env: dict[str, str] = {}
    assert choose_mujoco_gl(env, probe({"egl", "osmesa"}), "linux") == "egl"
    assert env == {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl"} and tried == ["egl"]
    tried.clear()
    env = {}
    assert choose_mujoco_gl(env, probe({"osmesa"}), "linux") == "osmesa"
    assert env["MUJOCO_GL"] == "osmesa" and tried == ["egl", "osmesa"]
    # A user's choice and a display are left alone, unprobed.
    tried.clear()
    assert choose_mujoco_gl({"MUJOCO_GL": "glfw"}, probe(set()), "linux") == "glfw"
    assert choose_mujoco_gl({"DISPLAY": ":0"}, probe(set()), "linux") is None
    assert choose_mujoco_gl({}, probe(set()), "darwin") is None
    assert tried == []
    with pytest.raises(RenderBackendError) as info:
        choose_mujoco_gl({}, probe(set()), "linux")
    assert str(info.value) == NO_GL_MESSAGE and "\n" not in NO_GL_MESSAGE
    assert "libegl1" in NO_GL_MESSAGE and "libosmesa6" in NO_GL_MESSAGE


def _tiny_agent(env_id: str, out: Path) -> Path:
    from eggroll_rl.run import train

    preset = load_preset(env_id)
    top = 2 if preset.trainer.top_directions else 0  # keep top-b in play at a tiny population
    curriculum = preset.rollout.train_cap_generations > 0
    # A horizon curriculum stays in play: generation 0 plays 10 steps, generation 1 the run's 20.
    caps = (
        ["train_max_episode_steps=10", "train_cap_generations=1"]
        if curriculum
        else ["train_max_episode_steps=none"]
    )
    preset = apply_overrides(
        preset,
        [
            f"top_directions={top}",
            "population=8",
            "generations=2",
            "max_episode_steps=20",  # one 20-step cap, evaluations included
            *caps,
            "eval.every=0",
        ],
    )
    result = train(apply_overrides(preset, ["eval.episodes=1"]), out)
    assert result.generations == 2 and result.env_steps <= 2 * 8 * 20
    if curriculum:  # HalfCheetah never terminates: exactly 8 x 10 + 8 x 20 steps
        assert result.env_steps == 8 * 10 + 8 * 20
    return result.directory


def test_eval_record_without_any_gl_backend_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from eggroll_rl import video
    from eggroll_rl.cli import main

    agent = _tiny_agent("Swimmer-v5", tmp_path / "agents")
    for name in ("MUJOCO_GL", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(video, "_probe_gl", lambda name: False)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(agent), "--episodes", "1", "--record"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.strip() == f"error: {video.NO_GL_MESSAGE}"
    assert not (tmp_path / "videos" / "Swimmer-v5").exists() or not any(
        (tmp_path / "videos" / "Swimmer-v5").glob("*.mp4")
    )


@pytest.mark.slow
def test_recording_picks_a_headless_backend_and_writes_an_mp4(tmp_path: Path) -> None:
    # A child process without a display or MUJOCO_GL: the recorder picks a backend itself. A few
    # frames only: software OpenGL renders slowly on a loaded CPU.
    import os
    import subprocess
    import sys

    script = (
        "import os, sys, gymnasium as gym\n"
        "from eggroll_rl import make_policy\n"
        "from eggroll_rl.video import record_episode\n"
        "env = gym.make('Hopper-v5')\n"
        "policy = make_policy(env.observation_space, env.action_space, hidden_sizes=())\n"
        "r = record_episode(policy, 'Hopper-v5', sys.argv[1], max_steps=5)\n"
        "print(os.environ['MUJOCO_GL'], r.frames)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY", "WAYLAND_DISPLAY")}
    env["PYTHONPATH"] = str(ROOT)
    video = tmp_path / "hopper.mp4"
    done = subprocess.run(
        [sys.executable, "-c", script, str(video)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if "cannot render MuJoCo" in done.stderr:
        pytest.skip("no headless OpenGL on this machine")
    assert done.returncode == 0, done.stderr
    backend, frames = done.stdout.split()
    assert backend in ("egl", "osmesa") and int(frames) == 6  # the reset frame and 5 steps
    import imageio.v3 as iio

    assert sum(1 for _ in iio.imiter(video)) == 6


# --------------------------------------------------------------------------------------------
# Presets


def test_mujoco_presets_ship_with_their_ars_reference() -> None:
    presets = {p.env_id: p for p in list_presets(ROOT / "envs")}
    for env_id in MUJOCO_PRESETS:
        preset = presets[env_id]
        assert preset.reference.startswith("ARS"), env_id
        assert preset.policy.hidden_sizes == (), env_id  # linear, as ARS
        assert preset.rollout.max_episode_steps is None or preset.rollout.max_episode_steps <= 1000


@pytest.mark.slow
@pytest.mark.parametrize("env_id", MUJOCO_PRESETS)
def test_preset_smoke_run(env_id: str, tmp_path: Path) -> None:
    import json

    directory = _tiny_agent(env_id, tmp_path)
    results = json.loads((directory / "results.json").read_text())
    assert results["env_id"] == env_id and results["generations"] == 2
    assert math.isfinite(results["mean"])


def test_envs_table_lists_the_reference(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from eggroll_rl.cli import main

    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit) as exc:
        main(["envs"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if "Swimmer-v5" in row)
    assert "ARS" in line and "355.3" in line
