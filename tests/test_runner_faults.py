"""The runner under faults, signals and bad input (issue 11): nothing lost, nothing hangs.

Commands that could hang run in a subprocess with a timeout; signals are real (``os.kill``).
The tiny envs live in ``tests/endless_env.py`` (registered without ``max_episode_steps``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli import cli

from eggroll_rl.agents import load_agent, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TINY = ["--population", "8", "--set", "eval.episodes=2", "--set", "hidden_sizes=4", "--no-progress"]
ENDLESS = "endless_env:EggrollTest/Endless-v0"


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def env_vars(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EGGROLL_RL_AGENTS_DIR"}
    return {**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EGGROLL_RL_AGENTS_DIR", raising=False)
    monkeypatch.syspath_prepend(str(TESTS))


# -- 1. losing work ----------------------------------------------------------------------------------


def test_training_never_replaces_an_existing_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = ROOT / "agents" / "CartPole-v1"
    (tmp_path / "agents").mkdir()
    import shutil

    shutil.copytree(shipped, tmp_path / "agents" / "CartPole-v1")
    before = {p.name: p.read_bytes() for p in (tmp_path / "agents" / "CartPole-v1").iterdir()}
    args = ["train", "CartPole-v1", "--generations", "2", *TINY]

    code, out, err = cli(capsys, *args)  # the README's command, from a checkout
    assert code == 0, err
    assert "Saved the agent to runs/CartPole-v1 " in out
    assert {p.name: p.read_bytes() for p in (tmp_path / "agents" / "CartPole-v1").iterdir()} == before

    code, out, err = cli(capsys, *args, "--seed", "1")  # a second run gets its own directory
    assert code == 0, err
    assert "Saved the agent to runs/CartPole-v1_2 " in out
    assert load_agent("runs/CartPole-v1").config["trainer"]["seed"] == 0
    assert load_agent("runs/CartPole-v1_2").config["trainer"]["seed"] == 1

    # eval ENV takes the newest agent of that env (runs/ before the shipped agents/).
    code, out, err = cli(capsys, "eval", "CartPole-v1", "--episodes", "1")
    assert code == 0 and "(runs/CartPole-v1_2)" in out, err

    code, out, err = cli(capsys, *args, "--seed", "2", "--overwrite")
    assert code == 0 and "Saved the agent to runs/CartPole-v1 " in out, err
    assert load_agent("runs/CartPole-v1").config["trainer"]["seed"] == 2
    assert not Path("runs/CartPole-v1_3").exists()


def test_interrupted_run_keeps_the_existing_agent_and_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from eggroll_rl.presets import apply_overrides, load_preset
    from eggroll_rl.run import train

    preset = apply_overrides(
        load_preset("CartPole-v1"),
        {"population": 8, "generations": 6, "eval.every": 0, "eval.episodes": 2, "hidden_sizes": [4]},
    )
    first = train(preset, "runs")
    policy = (first.directory / "policy.safetensors").read_bytes()

    def stop_at_2(row):
        if row["generation"] == 2:
            raise KeyboardInterrupt

    again = train(apply_overrides(preset, {"seed": 5}), "runs", overwrite=True, callback=stop_at_2)
    assert again.stopped == "interrupted" and not again.saved and again.directory == first.directory
    assert (first.directory / "policy.safetensors").read_bytes() == policy  # the agent is untouched
    assert load_agent(first.directory).config["trainer"]["seed"] == 0
    assert load_checkpoint(first.directory / "checkpoint.pt")["trainer"]["generation"] == 2


@pytest.mark.parametrize("where", ["/proc/eggroll-x", "{file}/sub"])
def test_unwritable_out_fails_before_any_work(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("a regular file")
    out_dir = where.format(file=tmp_path / "file")
    code, out, err = cli(capsys, "train", "CartPole-v1", "--out", out_dir, *TINY)
    assert code == 2
    assert "cannot write the agent to" in one_error_line(err)
    assert "Training" not in out  # nothing trained


def test_other_output_paths_are_checked_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("a regular file")
    shipped = str(ROOT / "agents" / "CartPole-v1")
    from eggroll_rl import rollout

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated before checking the destination")

    monkeypatch.setattr(rollout, "evaluate", no_evaluation)
    code, _, err = cli(capsys, "eval", shipped, "--record", "--video-dir", tmp_path / "file" / "v")
    assert code == 2 and "--video-dir: cannot write" in one_error_line(err)
    code, _, err = cli(capsys, "plot", shipped, "-o", tmp_path / "file" / "x.png")
    assert code == 2 and "--output: cannot write" in one_error_line(err)


@pytest.mark.parametrize("fails", ["video dir", "everywhere"])
def test_a_video_write_that_fails_late_goes_elsewhere_or_is_one_line(
    fails: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    from eggroll_rl import video

    real = video.atomic_path

    @contextlib.contextmanager
    def disk_full(dest):
        if fails == "everywhere" or tmp_path in Path(dest).parents:
            raise OSError(28, "No space left on device")
        with real(dest) as tmp:
            yield tmp

    monkeypatch.setattr(video, "atomic_path", disk_full)
    shipped = str(ROOT / "agents" / "CartPole-v1")
    args = ["--episodes", "1", "--record", "--video-dir", tmp_path / "v"]
    code, out, err = cli(capsys, "eval", shipped, *args)
    assert "warning: could not write the video to" in out and "No space left on device" in out
    assert [p.name for p in (tmp_path / "v").rglob("*")] == ["CartPole-v1"]  # no partial file, no work dir
    if fails == "everywhere":
        assert code == 1 and "--record: could not write the video (No space left" in one_error_line(err)
        return
    assert code == 0, err
    saved = Path(out.rsplit(" to ", 1)[1].strip())
    assert saved.name == "CartPole-v1-seed0.mp4" and saved.stat().st_size > 0
    assert tmp_path not in saved.parents


def test_a_failed_write_at_the_end_keeps_the_agent_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from eggroll_rl import agents, run

    real = agents.save_agent

    def disk_full(directory, **kwargs):
        if Path(directory).parent.name == "runs":
            raise OSError(28, "No space left on device")
        return real(directory, **kwargs)

    monkeypatch.setattr(run, "save_agent", disk_full)
    code, out, err = cli(capsys, "train", "CartPole-v1", "--generations", "1", *TINY)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("warning: could not write"))
    assert "No space left on device" in line
    saved = Path(line.rsplit("saved it to ", 1)[1].removesuffix(" instead"))
    assert saved != Path("runs/CartPole-v1") and load_agent(saved).env_id == "CartPole-v1"
    assert f"Saved the agent to {saved}" in out


# -- 3. episodes that never end ------------------------------------------------------------------------


def test_endless_env_trains_evaluates_and_records_under_one_cap(tmp_path: Path) -> None:
    def run_cli(*args: object) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "eggroll_rl", *map(str, args)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env_vars(), timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    done = run_cli("train", ENDLESS, "--generations", "1", *TINY)
    assert "capping its episodes at 1000 steps" in done.stderr
    agent = load_agent(tmp_path / "runs" / "endless_env:EggrollTest__Endless-v0")
    assert agent.results["mean"] == 1000.0  # reward 1 per step, cut at the default cap
    # A run's own cap holds everywhere: training, the final evaluation, eval, recording.
    run_cli("train", ENDLESS, "--generations", "1", "--set", "rollout.max_episode_steps=30", *TINY)
    capped = tmp_path / "runs" / "endless_env:EggrollTest__Endless-v0_2"
    assert load_agent(capped).results["mean"] == 30.0
    done = run_cli("eval", capped, "--episodes", "2", "--record")
    assert "30.00 +/- 0.00 over 2 episodes" in done.stdout
    assert "frames (return 30.00)" in done.stdout
    # The frame count said is the one the mp4 holds (30 steps, plus the reset frame if kept).
    import imageio.v3 as iio

    said = int(done.stdout.split("recorded ")[1].split(" frames")[0])
    video = tmp_path / done.stdout.rsplit(" to ", 1)[1].strip()
    assert said == sum(1 for _ in iio.imiter(video)) in (30, 31)


def test_library_evaluate_and_rollout_cap_an_endless_env() -> None:
    import endless_env  # noqa: F401
    import gymnasium as gym

    from eggroll_rl.policies import make_policy
    from eggroll_rl.rollout import DEFAULT_MAX_EPISODE_STEPS, evaluate

    env = gym.make("EggrollTest/Endless-v0")
    policy = make_policy(env.observation_space, env.action_space, (4,))
    result = evaluate(policy, "EggrollTest/Endless-v0", episodes=2, max_episode_steps=7)
    assert result.returns.tolist() == [7.0, 7.0]
    with pytest.warns(RuntimeWarning, match="without max_episode_steps"):
        from eggroll_rl import rollout

        rollout._warned_uncapped.discard("EggrollTest/Endless-v0")
        result = evaluate(policy, "EggrollTest/Endless-v0", episodes=1)
    assert result.returns.tolist() == [float(DEFAULT_MAX_EPISODE_STEPS)]


def _limited_env() -> str:
    """Register Endless with a 40-step limit (reward 1 per step: a return is the episode's length)."""
    import endless_env
    import gymnasium as gym

    if "EggrollTest/Limited-v0" not in gym.registry:
        gym.register(id="EggrollTest/Limited-v0", entry_point=endless_env.Endless, max_episode_steps=40)
    return "EggrollTest/Limited-v0"


def test_training_cap_ends_training_episodes_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eggroll_rl.presets import Preset, apply_overrides
    from eggroll_rl.run import train

    env_id = _limited_env()
    base = apply_overrides(
        Preset(env_id),
        [
            "population=4",
            "generations=2",
            "eval.every=1",
            "eval.episodes=2",
            "hidden_sizes=4",
            "checkpoint_every=0",
        ],
    )
    for run_cap, train_cap, trained, evaluated in [
        (None, 7, 7, 40),  # evaluations run to the env's registered limit
        (20, 7, 7, 20),  # ... or to the run's own cap
        (20, None, 20, 20),  # no training cap: the run's cap everywhere
    ]:
        preset = apply_overrides(base, {"max_episode_steps": run_cap, "train_max_episode_steps": train_cap})
        result = train(preset, tmp_path / "runs")
        assert [r["episode_length"] for r in result.rows] == [trained, trained]
        assert result.env_steps == 2 * 4 * trained
        assert [r["eval_mean"] for r in result.rows] == [evaluated, evaluated]
        assert result.results["mean"] == result.results["eval_length_mean"] == evaluated
        rollout = load_agent(result.directory).config["rollout"]
        assert (rollout["max_episode_steps"], rollout["train_max_episode_steps"]) == (run_cap, train_cap)
        # `eggroll-rl eval` of the saved agent plays the run's cap, not the training one.
        code, out, err = cli(capsys, "eval", result.directory, "--episodes", "3")
        assert code == 0, err
        assert f"{evaluated:.2f} +/- 0.00 over 3 episodes" in out


@pytest.mark.parametrize(("target", "evaluated"), [(41.0, [None, None, None]), (40.0, [40.0])])
def test_screen_runs_the_full_evaluation_only_when_a_few_episodes_reach_the_target(
    target: float, evaluated: list[float | None], tmp_path: Path
) -> None:
    from eggroll_rl.presets import Preset, apply_overrides
    from eggroll_rl.run import train

    # Every step earns 1 and evaluations last the env's 40 steps, so a screen's mean is 40.
    preset = apply_overrides(
        Preset(_limited_env(), target=target),
        [
            "population=4",
            "generations=3",
            "train_max_episode_steps=7",
            "eval.every=0",
            "eval.from_fitness=0",  # every generation is promising
            "eval.screen_episodes=3",
            "eval.episodes=2",
            "hidden_sizes=4",
            "checkpoint_every=0",
        ],
    )
    result = train(preset, tmp_path / "runs")
    assert [r["eval_mean"] for r in result.rows] == evaluated
    screens = len(evaluated) * 3 * 40  # one 3-episode screen per generation
    # Full evaluations: the final one; after a passed screen, the stopping one and the fresh score.
    full = 2 * 40 * (2 if target == 40.0 else 1)
    assert result.results["eval_env_steps"] == screens + full
    assert result.results["solved"] is (target == 40.0)


def _script_evaluations(monkeypatch: pytest.MonkeyPatch, returns: list[Any]) -> list[int]:
    """Make the k-th evaluation play its episodes but report ``returns[k]`` (a list, or one value each).

    Returns the list that the evaluations' seeds are appended to, in call order.
    """
    import dataclasses

    import numpy as np

    from eggroll_rl import rollout

    real, seeds = rollout.evaluate, []

    def scripted(policy, env_id, *, episodes, seed, **kwargs):
        scripted_returns = np.broadcast_to(np.asarray(returns[len(seeds)], dtype=float), (episodes,))
        seeds.append(seed)
        played = real(policy, env_id, episodes=episodes, seed=seed, **kwargs)
        mean, std = float(scripted_returns.mean()), float(scripted_returns.std())
        return dataclasses.replace(played, returns=scripted_returns.copy(), mean=mean, std=std)

    monkeypatch.setattr(rollout, "evaluate", scripted)
    return seeds


@pytest.mark.parametrize("fresh", [40.0, 39.0])
def test_a_target_stop_is_scored_on_fresh_episodes_that_decided_nothing(
    fresh: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stopping evaluation passed as the first of many tries; the agent's score is a new one."""
    from eggroll_rl import cli as cli_module
    from eggroll_rl.presets import Preset, apply_overrides
    from eggroll_rl.run import _EVAL_SEED_DOMAIN, _REPORT_SEED_DOMAIN, _episodes_seed, train

    seeds = _script_evaluations(monkeypatch, [40.0, fresh])  # the first evaluation passes, then `fresh`
    preset = apply_overrides(
        Preset(_limited_env(), target=40.0),
        ["population=4", "generations=5", "eval.every=2", "eval.episodes=2", "hidden_sizes=4", "seed=3"],
    )
    result = train(preset, tmp_path / "runs")
    r = result.results
    assert result.stopped == r["stopped"] == "target" and result.generations == 2
    report = _episodes_seed(_REPORT_SEED_DOMAIN, 3, 2)
    assert seeds == [_episodes_seed(_EVAL_SEED_DOMAIN, 3, 2), report] and r["eval_seed"] == report
    assert (r["mean"], r["solved"]) == (fresh, fresh == 40.0)
    assert (r["stop_eval_mean"], r["stop_eval_std"]) == (40.0, 0.0)
    assert r["eval_env_steps"] == 2 * 2 * 40  # both evaluations, 2 episodes of 40 steps each
    assert load_agent(result.directory).results["mean"] == fresh
    cli_module._report_training(result, preset.env_id)
    out = capsys.readouterr().out
    assert f"{fresh:.2f} +/- 0.00 over 2 episodes, {'solved' if fresh == 40 else 'not solved'}" in out
    assert "reached the target (40.00 on the evaluation that stopped it) after 2 generations" in out
    assert ("--resume" in out) is (fresh != 40.0)  # not solved after all: say how to train on


@pytest.mark.parametrize("margin", [0.0, 2.0])
def test_a_stop_margin_needs_the_lower_confidence_bound_to_clear_the_target(
    margin: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mean 41, std 2 over 4 episodes: standard error 1, bound 41 - 2 = 39 < 40; mean 43: 41 >= 40."""
    from eggroll_rl.presets import Preset, apply_overrides
    from eggroll_rl.run import train

    _script_evaluations(monkeypatch, [[39.0, 39.0, 43.0, 43.0], [41.0, 41.0, 45.0, 45.0], 44.0])
    preset = apply_overrides(
        Preset(_limited_env(), target=40.0),
        [
            "population=4",
            "generations=5",
            "eval.every=1",
            "eval.episodes=4",
            "hidden_sizes=4",
            f"eval.stop_margin_se={margin}",
        ],
    )
    result = train(preset, tmp_path / "runs")
    # Without a margin the first evaluation (mean 41 >= 40) stops; with 2 standard errors the second.
    assert result.stopped == "target" and result.generations == (1 if margin == 0 else 2)
    assert result.results["stop_eval_mean"] == (41.0 if margin == 0 else 43.0)


def test_a_confirmation_on_fresh_episodes_must_clear_the_target_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gen 1 passes (41) but its confirmation fails (39): training goes on; gen 2 passes twice."""
    from eggroll_rl import run
    from eggroll_rl.presets import Preset, apply_overrides

    # eval, confirmation, eval, confirmation, the agent's score
    seeds = _script_evaluations(monkeypatch, [41.0, 39.0, 43.0, 42.0, 40.5])
    preset = apply_overrides(
        Preset(_limited_env(), target=40.0),
        [
            "population=4",
            "generations=5",
            "eval.every=1",
            "eval.episodes=2",
            "hidden_sizes=4",
            "seed=3",
            "eval.confirm=true",
        ],
    )
    result = run.train(preset, tmp_path / "runs")
    r = result.results
    assert result.stopped == "target" and result.generations == 2
    evaluation, confirm, report = run._EVAL_SEED_DOMAIN, run._CONFIRM_SEED_DOMAIN, run._REPORT_SEED_DOMAIN
    expected = [(evaluation, 1), (confirm, 1), (evaluation, 2), (confirm, 2), (report, 2)]
    assert seeds == [run._episodes_seed(domain, 3, gen) for domain, gen in expected]
    assert len(set(seeds)) == 5  # every evaluation plays episodes of its own
    assert (r["stop_eval_mean"], r["confirm_eval_mean"], r["mean"]) == (43.0, 42.0, 40.5)
    assert r["eval_env_steps"] == 5 * 2 * 40  # five evaluations of 2 episodes, 40 steps each
    assert [row["eval_mean"] for row in result.rows] == [41.0, 43.0]


def test_a_screen_asks_for_the_same_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    """A screen's mean must clear the target by the margin in standard errors of the full evaluation."""
    from types import SimpleNamespace

    import numpy as np

    from eggroll_rl import run
    from eggroll_rl.presets import Preset, apply_overrides

    preset = apply_overrides(
        Preset(_limited_env(), target=40.0),
        ["eval.episodes=100", "eval.screen_episodes=5", "eval.stop_margin_se=2"],
    )
    trainer = SimpleNamespace(generation=7)
    for (mean, std), passes in {(43.9, 20.0): False, (44.0, 20.0): True, (40.0, 0.0): True}.items():
        # bound = mean - 2 * std / sqrt(100): 39.9, 40.0, 40.0
        played = SimpleNamespace(mean=mean, std=std, lengths=np.full(5, 40))
        monkeypatch.setattr(run, "_evaluate_center", lambda *a, played=played, **k: played)
        assert run._screen_passes(trainer, preset, 40.0) == (passes, 200)
    assert not run.clears_target(39.99, 0.0, preset, 40.0)


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["train_max_episode_steps=0"], "rollout.train_max_episode_steps: must be >= 1 or none, got 0"),
        (["train_max_episode_steps=x"], "rollout.train_max_episode_steps: expected an integer or none"),
        (
            ["train_max_episode_steps=501"],  # the CartPole preset's max_episode_steps is 500
            "rollout.train_max_episode_steps: must be <= rollout.max_episode_steps = 500",
        ),
        (
            ["max_episode_steps=none", "train_max_episode_steps=501"],
            "rollout.train_max_episode_steps: must be <= the run's episode cap 500 (the env's registered",
        ),
    ],
)
@pytest.mark.parametrize("nproc", ["1", "2"])
def test_bad_training_cap_exits_2_with_one_line(
    sets: list[str], expected: str, nproc: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a for s in sets for a in ("--set", s)]
    code, _, err = cli(capsys, "train", "CartPole-v1", *args, "--nproc", nproc, "--no-progress")
    assert code == 2 and expected in one_error_line(err)
    assert not (tmp_path / "runs").exists()  # refused before any work


# -- 4. a rank that raises ---------------------------------------------------------------------------------


def _rollout_raises_on_rank_1() -> None:
    import endless_env  # noqa: F401
    import gymnasium as gym

    from eggroll_rl import EGGROLLTrainer, RolloutFitness, make_policy

    env = gym.make("EggrollTest/RaiseOnRank1-v0")
    policy = make_policy(env.observation_space, env.action_space, (4,), normalize_obs=False)
    fitness = RolloutFitness("EggrollTest/RaiseOnRank1-v0", max_episode_steps=10, obs_norm=False)
    EGGROLLTrainer(policy, fitness, 8, 0.05, 0.1, seed=0).train(2)


def test_a_rank_whose_rollout_raises_stops_every_rank_naming_it() -> None:
    from eggroll_rl.distributed import DistributedError
    from eggroll_rl.launch import run_distributed

    # Rank 0 waits in the rollout's all-reduce while rank 1 raised inside the rollout: with a
    # long timeout and grace, only a status exchange in every collective ends this with rank 1's
    # own exception (before, rank 0 timed out and was blamed for "Connection closed by peer").
    with pytest.raises(DistributedError) as info:
        run_distributed(2, _rollout_raises_on_rank_1, timeout=300, grace=300)
    assert info.value.failures.keys() == {1}
    assert "RuntimeError: env exploded on rank 1" in str(info.value)
    assert "rank 0 then stopped with: rank 1 failed: RuntimeError: env exploded" in "\n".join(
        info.value.__notes__
    )


# -- 5. signals --------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(c) for c in text.split()]
    return kids + [g for k in kids for g in _children(k)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _survivors(pids: list[int], within: float = 10.0) -> list[int]:
    """Return the pids still alive ``within`` seconds after the launcher exited.

    The launcher's children include multiprocessing's resource tracker, which exits on its own
    once the launcher's end of its pipe closes, a moment after the launcher itself.
    """
    deadline = time.monotonic() + within
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _start_training(tmp_path: Path, *extra: str, generations: int = 60) -> subprocess.Popen[str]:
    # 60 generations: the plain log prints every 2nd, and the run is still going at the 2nd.
    cmd = [sys.executable, "-u", "-m", "eggroll_rl", "train", "CartPole-v1"]
    cmd += ["--generations", str(generations)]
    cmd += ["--set", "eval.stop_on_target=false", "--set", "eval.every=0", "--set", "run.checkpoint_every=0"]
    cmd += [*TINY, *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_vars(), cwd=tmp_path
    )


def _wait_for_line(proc: subprocess.Popen[str], text: str, seen: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(
        f"never printed {text!r}: {''.join(seen)} {proc.stderr.read() if proc.stderr else ''}"
    )


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "nproc"), [(signal.SIGTERM, 143, 2), (signal.SIGHUP, 129, 1)])
def test_signal_to_the_run_saves_and_exits_128_plus_signal(
    sig: int, code: int, nproc: int, tmp_path: Path
) -> None:
    proc = _start_training(tmp_path, "--nproc", str(nproc))
    seen: list[str] = []
    try:
        _wait_for_line(proc, "gen  2/", seen)
        workers = _children(proc.pid)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + out
    assert proc.returncode == code, (out, err)
    assert "stopping after the current generation" in err and "Traceback" not in err
    assert "Interrupted at generation" in out and "--resume" in out
    generation = load_checkpoint(tmp_path / "runs" / "CartPole-v1" / "checkpoint.pt")["trainer"]["generation"]
    assert 2 <= generation < 60
    assert not _survivors(workers)  # no worker outlives the launcher


@pytest.mark.slow
def test_ctrl_c_during_launcher_start_up_is_an_interruption_not_a_rank_failure(tmp_path: Path) -> None:
    # A budget no run finishes before the signal, however slowly this process gets scheduled.
    proc = _start_training(tmp_path, "--nproc", "2", generations=10**6)
    try:
        deadline = time.monotonic() + 120
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "rank 0 failed" not in err and "Traceback" not in err
    assert not _survivors(workers)


# -- 6. one line, not a traceback -------------------------------------------------------------------------


def test_optional_dependencies_say_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "envpool", None)
    code, _, err = cli(capsys, "train", "CartPole-v1", "--set", "rollout.backend=envpool", *TINY)
    assert code == 2 and "pip install 'eggroll-rl[envpool]'" in one_error_line(err)
    code, _, err = cli(capsys, "train", "phys2d/CartPole-v1", *TINY)
    assert code == 2 and "needs jax" in one_error_line(err) and "pip install jax" in err
    # Suggestions name only ids that run here.
    code, _, err = cli(capsys, "train", "CartPol-v1")
    line = one_error_line(err)
    assert code == 2 and "CartPole-v1" in line and "phys2d" not in line


def test_preset_envpool_backend_falls_back_with_one_warning_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "envpool", None)  # not installed
    caps = ["--set", "max_episode_steps=20", "--set", "train_max_episode_steps=20"]
    tiny = ["--generations", "1", *caps, "--set", "eval.every=0", *TINY]
    code, _, err = cli(capsys, "train", "LunarLander-v3", "--out", tmp_path, *tiny)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "envpool" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: "), err
    assert "pip install 'eggroll-rl[envpool]'" in warned[0] and "[measured]" in warned[0]
    config = (tmp_path / "LunarLander-v3" / "config.json").read_text()
    assert '"backend": "sync"' in config
    code, _, err = cli(
        capsys, "train", "LunarLander-v3", "--out", tmp_path, "--set", "rollout.backend=envpool", *tiny
    )
    assert code == 2 and "pip install 'eggroll-rl[envpool]'" in one_error_line(err)


def test_record_without_rgb_array_and_no_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "train", "endless_env:EggrollTest/NoRender-v0", "--generations", "1", *TINY)
    assert code == 0, err
    code, out, err = cli(capsys, "eval", "endless_env:EggrollTest/NoRender-v0", "--record")
    assert code == 2 and "cannot render rgb_array frames" in one_error_line(err)
    assert "over" not in out  # checked before the evaluation
    code, out, err = cli(capsys)
    assert code == 0 and "Usage:" in out and "train" in out and "eval" in out and err == ""


def test_nan_returns_in_the_final_evaluation_are_reported(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from eggroll_rl import run
    from eggroll_rl.rollout import EvalResult

    def nan_evaluation(trainer, preset, **kwargs):
        returns = np.array([1.0, float("nan")])
        return EvalResult(returns, np.array([1, 1]), float("nan"), float("nan"), 1.0)

    monkeypatch.setattr(run, "_evaluate_center", nan_evaluation)
    code, out, err = cli(capsys, "train", "CartPole-v1", "--generations", "1", *TINY)
    assert code == 0, err
    assert "no finite mean (1 non-finite returns)" in out and "not solved" in out
    agent = load_agent("runs/CartPole-v1")  # the agent is written and loads
    assert agent.results["mean"] is None and agent.results["non_finite_episodes"] == 1
    assert agent.results["solved"] is False


def test_all_non_finite_fitness_is_one_line_and_saves_nothing_inconsistent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An env whose rewards are all NaN: exit 2, one line naming the cause, no agent written."""
    code, _, err = cli(capsys, "train", "endless_env:EggrollTest/NanReward-v0", "--generations", "2", *TINY)
    line = one_error_line(err)
    assert code == 2 and "no finite fitness at generation 0" in line and "NaN/inf rewards" in line
    assert "no agent written" in line and "Traceback" not in err
    assert not Path("runs/EggrollTest__NanReward-v0/policy.safetensors").exists()
    assert not any(Path("runs").glob("**/policy.safetensors"))


# -- 7. module:EnvId ------------------------------------------------------------------------------------


def test_module_colon_env_id_everywhere(tmp_path: Path) -> None:
    from eggroll_rl import RolloutFitness, evaluate, make_vec_env
    from eggroll_rl.presets import check_env_id

    sys.modules.pop("endless_env", None)  # the id itself must import the module
    import gymnasium as gym

    for name in ("EggrollTest/Endless-v0", "EggrollTest/NanReward-v0", "EggrollTest/NoRender-v0"):
        gym.registry.pop(name, None)
    gym.registry.pop("EggrollTest/RaiseOnRank1-v0", None)
    check_env_id(ENDLESS)
    vec = make_vec_env(ENDLESS, 2, max_episode_steps=3)
    assert vec.num_envs == 2
    vec.close()
    RolloutFitness(ENDLESS, max_episode_steps=3)
    from eggroll_rl.policies import make_policy

    policy = make_policy(gym.spaces.Box(-1, 1, (2,)), gym.spaces.Discrete(2), (4,))
    assert evaluate(policy, ENDLESS, episodes=1, max_episode_steps=4).returns.tolist() == [4.0]
    from eggroll_rl.presets import PresetError

    with pytest.raises(PresetError, match="cannot import module 'no_such_module_x'"):
        check_env_id("no_such_module_x:Foo-v0")


# -- smaller, same spirit ----------------------------------------------------------------------------------


def test_plot_refuses_empty_history_and_other_envs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    monkeypatch.setenv("EGGROLL_RL_AGENTS_DIR", str(tmp_path / "runs"))  # not the shipped agents

    shutil.copytree(ROOT / "agents" / "CartPole-v1", tmp_path / "runs" / "Acrobot-v1")
    code, _, err = cli(capsys, "plot", "Acrobot-v1", "-o", tmp_path / "x.png")
    assert code == 2 and "trained on CartPole-v1, not Acrobot-v1" in one_error_line(err)
    empty = tmp_path / "empty-history"
    shutil.copytree(ROOT / "agents" / "CartPole-v1", empty)
    (empty / "history.csv").write_text("generation,mean_fitness\n")
    code, _, err = cli(capsys, "plot", empty, "-o", tmp_path / "y.png")
    assert code == 2 and "no history.csv rows to plot" in one_error_line(err)
    assert not (tmp_path / "y.png").exists()
    code, _, err = cli(capsys, "plot", tmp_path / "no" / "such" / "agent")
    line = one_error_line(err)
    assert code == 2 and "not a known env id" in line and "train" not in line


def test_unknown_key_without_a_close_match_lists_the_valid_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "train", "CartPole-v1", "--set", "zzzqqq=1")
    line = one_error_line(err)
    assert (
        code == 2
        and "valid keys:" in line
        and "trainer.sigma" in line
        and "rollout.max_episode_steps" in line
        and "rollout.train_max_episode_steps" in line
    )


def test_make_policy_seed_gives_the_same_weights_every_time() -> None:
    import gymnasium as gym

    from eggroll_rl.policies import make_policy

    spaces = (gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))
    a = make_policy(*spaces, (8,), seed=3).state_dict()
    torch.manual_seed(123)  # the global generator does not matter
    b = make_policy(*spaces, (8,), seed=3).state_dict()
    c = make_policy(*spaces, (8,), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_box2d_hint_is_the_same_for_train_and_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gymnasium as gym

    def no_box2d(**kwargs):
        raise gym.error.DependencyNotInstalled("Box2D is not installed, run `pip install swig`")

    if "EggrollTest/NeedsBox2D2-v0" not in gym.registry:
        gym.register(id="EggrollTest/NeedsBox2D2-v0", entry_point=no_box2d)
    _, _, train_err = cli(capsys, "train", "EggrollTest/NeedsBox2D2-v0")
    from eggroll_rl.agents import save_agent
    from eggroll_rl.policies import make_policy

    agent = tmp_path / "an-agent"
    policy = make_policy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), (4,))
    config = {"env_id": "EggrollTest/NeedsBox2D2-v0", "policy": {"hidden_sizes": [4]}}
    save_agent(agent, policy=policy, config=config, history=[], results={"mean": 0.0, "episodes": 1})
    _, _, eval_err = cli(capsys, "eval", agent)
    hint = "pip install 'eggroll-rl[box2d]'"
    assert hint in one_error_line(train_err) and hint in one_error_line(eval_err), (train_err, eval_err)


def test_vanilla_trainer_with_the_observation_normaliser_does_not_warn() -> None:
    import warnings

    from eggroll_rl import RolloutFitness, VanillaESTrainer
    from eggroll_rl.policies import make_policy
    from eggroll_rl.rollout import _find_spec

    env = _find_spec("CartPole-v1").make()
    policy = make_policy(env.observation_space, env.action_space, (4,), normalize_obs=True, seed=0)
    fitness = RolloutFitness("CartPole-v1", max_episode_steps=20, obs_norm=True)
    trainer = VanillaESTrainer(policy, fitness, 4, 0.05, 0.1, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(2)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    fitness.close()
