"""The command line: train end to end, eval --record, exact resume, Ctrl-C, envs, plot, bad input.

Commands run in-process through ``eggroll_rl.cli.main`` (the installed entry point) with their
output captured, except one subprocess check of ``python -m eggroll_rl``. Every test works in a
temporary directory; nothing touches the repository's agents/ or videos/.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from eggroll_rl.agents import load_agent, load_checkpoint, load_policy
from eggroll_rl.cli import main
from eggroll_rl.presets import load_preset
from eggroll_rl.rollout import evaluate
from eggroll_rl.run import TIMING_COLUMNS, RunInterrupted, train

ROOT = Path(__file__).resolve().parent.parent
# A small, quick CartPole run: evaluations every 2 generations on 5 episodes.
SMALL = ["--population", "16", "--set", "eval.every=2", "--set", "eval.episodes=5"]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``eggroll-rl ARGS`` in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EGGROLL_RL_AGENTS_DIR", str(tmp_path / "agents"))
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no truncated cells


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Train CartPole-v1 from its preset to the target (about 25 generations, ~2 s)."""
    out = tmp_path_factory.mktemp("trained") / "agents"
    # capsys is function-scoped, so this module-wide run captures its own output.
    buf = StringIO()
    with redirect_stdout(buf), redirect_stderr(buf), pytest.raises(SystemExit) as exc:
        main(["train", "CartPole-v1", "--out", str(out), "--generations", "60", "--no-progress"])
    assert exc.value.code == 0, buf.getvalue()
    return out / "CartPole-v1", buf.getvalue()


def test_train_cartpole_end_to_end_writes_an_honest_agent(trained: tuple[Path, str]) -> None:
    directory, output = trained
    assert sorted(p.name for p in directory.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "history.csv",
        "policy.safetensors",
        "results.json",
    ]
    results = json.loads((directory / "results.json").read_text())
    config = json.loads((directory / "config.json").read_text())
    with open(directory / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))

    assert config["env_id"] == "CartPole-v1" and config["preset"] == "CartPole-v1.toml"
    assert config["trainer"]["generations"] == 60 and "trainer.generations" in config["overrides"]
    assert results["stopped"] == "target" and results["solved"] is True
    assert results["episodes"] == load_preset("CartPole-v1").eval.episodes == 100
    assert results["mean"] >= results["target"] == 475.0
    assert results["stop_eval_mean"] >= 475.0  # the stopping evaluation, kept beside the fresh score
    # The numbers are the run's own: steps and generations match the history's last row, and
    # re-evaluating the saved policy with the recorded seed reproduces the recorded returns.
    assert results["generations"] == len(rows) == int(rows[-1]["generation"]) < 60
    assert results["env_steps"] == int(rows[-1]["env_steps"]) > 0
    # seconds include the final evaluation, the last row's time does not (no timing compared).
    assert 0 < float(rows[-1]["time"]) <= results["seconds"]
    assert float(rows[-1]["eval_mean"]) == results["mean"]
    again = evaluate(load_policy(directory), "CartPole-v1", episodes=100, seed=results["eval_seed"])
    assert again.mean == results["mean"] and again.std == pytest.approx(results["std"])
    evaluated = [r for r in rows if r["eval_mean"]]
    assert [int(r["generation"]) for r in evaluated] == list(range(5, len(rows) + 1, 5))
    assert "CartPole-v1: " in output and "solved (target 475)" in output and "Traceback" not in output
    assert "on the evaluation that stopped it" in output
    assert load_checkpoint(directory / "checkpoint.pt")["trainer"]["generation"] == len(rows)


def test_eval_prints_score_and_records_a_decodable_mp4(
    trained: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(trained[0], tmp_path / "agents" / "CartPole-v1")
    code, out, err = cli(capsys, "eval", "--record", "--episodes", "3")  # no argument: the latest agent
    assert code == 0, err
    assert "over 3 episodes" in out and "solved: yes (target 475)" in out
    video = tmp_path / "videos" / "CartPole-v1" / "CartPole-v1-seed0.mp4"
    assert f"to {Path('videos') / 'CartPole-v1' / 'CartPole-v1-seed0.mp4'}" in out
    import imageio.v3 as iio

    frames = sum(1 for _ in iio.imiter(video))
    assert frames > 0
    assert not [p for p in video.parent.iterdir() if p.name.startswith(".")]  # no temporaries left

    code, out, _ = cli(capsys, "eval", "CartPole-v1", "--episodes", "2", "--seed", "5")
    assert code == 0 and "over 2 episodes" in out


def test_resume_continues_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    small = [*SMALL, "--set", "optimizer=adam"]  # optimizer state must resume exactly too
    assert cli(capsys, "train", "CartPole-v1", "--out", whole, "--generations", "4", *small)[0] == 0
    assert cli(capsys, "train", "CartPole-v1", "--out", split, "--generations", "2", *small)[0] == 0
    code, out, err = cli(capsys, "train", "CartPole-v1", "--out", split, "--resume", "--generations", "4")
    assert code == 0, err
    assert "resumed at generation 2" in out

    a, b = whole / "CartPole-v1", split / "CartPole-v1"
    wa, wb = load_file(a / "policy.safetensors"), load_file(b / "policy.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert torch.equal(ca["trainer"]["center"], cb["trainer"]["center"])
    assert ca["trainer"]["optimizer"]["state"][0]["exp_avg"].equal(
        cb["trainer"]["optimizer"]["state"][0]["exp_avg"]
    )

    def untimed(path: Path) -> list[dict[str, str]]:
        with open(path, newline="") as fh:
            return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(fh)]

    assert untimed(a / "history.csv") == untimed(b / "history.csv")
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for key in ("mean", "std", "episodes", "env_steps", "generations", "eval_seed"):
        assert ra[key] == rb[key], key
    assert (
        json.loads((a / "config.json").read_text())["trainer"]
        == json.loads((b / "config.json").read_text())["trainer"]
    )

    # A resumed run may extend its budget, but not change what it is.
    code, _, err = cli(capsys, "train", "CartPole-v1", "--out", split, "--resume", "--population", "32")
    assert code == 2 and "trainer.population cannot change" in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_saves_a_valid_agent_and_checkpoint_then_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from eggroll_rl import progress

    shown = progress.LogProgress.update

    def press_ctrl_c_at_generation_3(self, row):
        shown(self, row)
        if row["generation"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, as from the terminal

    monkeypatch.setattr(progress.LogProgress, "update", press_ctrl_c_at_generation_3)
    out_dir = tmp_path / "runs"
    # The run must still be going at generation 3, whatever the preset's solve speed.
    small = [*SMALL, "--set", "eval.stop_on_target=false"]
    code, out, err = cli(capsys, "train", "CartPole-v1", "--out", out_dir, "--generations", "10", *small)
    assert code == 130, err
    assert "Interrupted at generation 4" in out and "--resume" in out and "Traceback" not in out + err
    directory = out_dir / "CartPole-v1"
    agent = load_agent(directory, "CartPole-v1")
    assert agent.results["stopped"] == "interrupted" and agent.results["generations"] == 4
    assert agent.results["episodes"] == 5
    assert load_checkpoint(directory / "checkpoint.pt")["trainer"]["generation"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    monkeypatch.setattr(progress.LogProgress, "update", shown)
    code, out, err = cli(capsys, "train", "CartPole-v1", "--out", out_dir, "--resume", "--generations", "6")
    assert code == 0, err
    assert load_agent(directory).results["generations"] == 6


def test_library_run_interrupts_between_and_within_generations(tmp_path: Path) -> None:
    from eggroll_rl.presets import apply_overrides

    preset = apply_overrides(
        load_preset("CartPole-v1"),
        {"population": 16, "generations": 8, "eval.every": 0, "eval.episodes": 3, "checkpoint_every": 2},
    )

    def stop_at_3(row):
        if row["generation"] == 3:
            raise KeyboardInterrupt  # between generations: a clean stop

    result = train(preset, tmp_path / "a", callback=stop_at_3)
    assert result.stopped == "interrupted" and result.generations == 3
    assert load_agent(result.directory).results["generations"] == 3

    # Within a generation the trainer may be half-updated: nothing new is saved, the last
    # periodic checkpoint (generation 2) stays, and the old agent is untouched. The new run
    # goes to its own directory (CartPole-v1_2): the first run's is never reused.
    calls = {"n": 0}
    from eggroll_rl.rollout import RolloutFitness

    original = RolloutFitness.__call__

    def interrupted_rollout(self, population):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, population)

    before = (result.directory / "policy.safetensors").read_bytes()
    try:
        RolloutFitness.__call__ = interrupted_rollout
        with pytest.raises(RunInterrupted, match="checkpoint at generation 2 is intact"):
            train(preset, tmp_path / "a")
    finally:
        RolloutFitness.__call__ = original
    assert (result.directory / "policy.safetensors").read_bytes() == before
    assert load_checkpoint(result.checkpoint)["trainer"]["generation"] == 3
    second = result.directory.with_name("CartPole-v1_2")
    assert load_checkpoint(second / "checkpoint.pt")["trainer"]["generation"] == 2
    assert not (second / "policy.safetensors").exists()


def test_envs_table_and_plot(
    trained: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(trained[0], tmp_path / "agents" / "CartPole-v1")
    code, out, err = cli(capsys, "envs")
    assert code == 0, err
    score = json.loads((trained[0] / "results.json").read_text())["mean"]
    line = next(row for row in out.splitlines() if "CartPole-v1" in row)
    assert "475" in line and f"{score:.1f} +/- " in line and "solved" in line
    for env_id in ("Acrobot-v1", "Pendulum-v1", "MountainCarContinuous-v0", "LunarLander-v3"):
        assert env_id in out

    code, out, err = cli(capsys, "plot", "CartPole-v1", "-o", tmp_path / "curve.png")
    assert code == 0, err
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_preset_is_announced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(
        capsys,
        "train",
        "MountainCar-v0",
        "--out",
        tmp_path / "runs",
        "--generations",
        "1",
        "--population",
        "4",
        "--set",
        "eval.episodes=1",
        "--set",
        "hidden_sizes=8",
    )
    assert code == 0, err
    assert "No preset for MountainCar-v0" in out and "[trainer]" in out and "population = 4" in out
    assert load_agent(tmp_path / "runs" / "MountainCar-v0").results["solved"] is False


@pytest.fixture
def bad_agents(trained: tuple[Path, str], tmp_path: Path) -> Path:
    """An agents root with a good agent, one for the wrong env, and corrupt ones."""
    root = tmp_path / "agents"
    shutil.copytree(trained[0], root / "CartPole-v1")
    shutil.copytree(trained[0], root / "Acrobot-v1")  # a CartPole agent filed under Acrobot
    shutil.copytree(trained[0], root / "corrupt-weights")
    (root / "corrupt-weights" / "policy.safetensors").write_bytes(b"not safetensors at all")
    shutil.copytree(trained[0], root / "corrupt-config")
    (root / "corrupt-config" / "config.json").write_text("{ nope")
    (root / "empty").mkdir()
    return root


BAD_INPUTS = {
    "unknown env id": (["train", "CartPol-v1"], "did you mean CartPole-v1"),
    "unknown env id for eval": (["eval", "CartPol-v1"], "did you mean CartPole-v1"),
    "missing agent": (["eval", "Pendulum-v1"], "no agent for Pendulum-v1"),
    "missing agent dir files": (["eval", "{root}/empty"], "config.json: missing"),
    "corrupt weights": (["eval", "{root}/corrupt-weights"], "not a valid safetensors file"),
    "corrupt config": (["eval", "{root}/corrupt-config"], "invalid JSON"),
    "agent for another env": (["eval", "Acrobot-v1"], "trained on CartPole-v1, not Acrobot-v1"),
    "unknown --set key": (
        ["train", "CartPole-v1", "--set", "trainer.sigmaa=1"],
        "did you mean trainer.sigma",
    ),
    "--set without =": (["train", "CartPole-v1", "--set", "sigma"], "not key=value"),
    "invalid --set value": (["train", "CartPole-v1", "--set", "sigma=-1"], "trainer.sigma: must be > 0"),
    "invalid --set type": (["train", "CartPole-v1", "--set", "population=many"], "trainer.population"),
    "invalid flag value": (["train", "CartPole-v1", "--population", "1"], "must be >= 2"),
    "invalid device": (["train", "CartPole-v1", "--device", "gpu"], "run.device"),
    "invalid trainer": (["train", "CartPole-v1", "--trainer", "eggrol"], "did you mean eggroll"),
    "resume without checkpoint": (["train", "CartPole-v1", "--out", "nowhere", "--resume"], "no checkpoint"),
    "usage: not a number": (["train", "CartPole-v1", "--population", "abc"], "--population"),
    "usage: missing argument": (["train"], "Missing argument 'ENV_ID'"),
    "usage: unknown option": (["train", "CartPole-v1", "--bogus"], "No such option: --bogus"),
    "usage: unknown command": (["trian"], "No such command 'trian'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(
    case: str, bad_agents: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, expected = BAD_INPUTS[case]
    code, out, err = cli(capsys, *(a.format(root=bad_agents) for a in args))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in out + err


def test_missing_matplotlib_names_the_extra(
    trained: tuple[Path, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    code, _, err = cli(capsys, "plot", trained[0])
    assert code == 2 and err.count("\n") == 1
    assert "pip install 'eggroll-rl[plot]'" in err


def test_cuda_requested_without_cuda(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = cli(capsys, "train", "CartPole-v1", "--out", tmp_path, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err and err.count("\n") == 1


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [sys.executable, "-m", "eggroll_rl", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert ok.returncode == 0 and "train" in ok.stdout and "eval" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "eggroll_rl", "eval", "NoSuchEnv-v0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_nproc_2_matches_one_process_and_only_rank_0_talks(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "CartPole-v1", "--generations", "2", *SMALL]
    assert cli(capfd, *args, "--out", tmp_path / "one")[0] == 0
    code, out, err = cli(capfd, *args, "--out", tmp_path / "two", "--nproc", "2")
    assert code == 0, err
    assert out.count("Training CartPole-v1") == 1 and out.count("Saved the agent") == 1
    assert "2 processes" in out
    one, two = (load_file(tmp_path / d / "CartPole-v1" / "policy.safetensors") for d in ("one", "two"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert load_agent(tmp_path / "two" / "CartPole-v1").results["world_size"] == 2


def test_missing_env_dependency_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gymnasium as gym

    def no_box2d(**kwargs):
        raise gym.error.DependencyNotInstalled(
            "Box2D is not installed, you can install it by run `pip install swig`"
        )

    if "EggrollTest/NeedsBox2D-v0" not in gym.registry:
        gym.register(id="EggrollTest/NeedsBox2D-v0", entry_point=no_box2d)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "train", "EggrollTest/NeedsBox2D-v0", "--out", tmp_path / "a")
    assert code == 2 and "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'eggroll-rl[box2d]'" in lines[0], err
    assert not (tmp_path / "a").exists()


def test_evaluation_due_every_k_and_once_promising() -> None:
    from eggroll_rl.presets import apply_overrides
    from eggroll_rl.run import evaluation_due

    preset = apply_overrides(load_preset("CartPole-v1"), ["eval.every=5", "eval.from_fitness=400"])
    assert evaluation_due(preset, 5, 0.0) and evaluation_due(preset, 10, -1.0)
    assert evaluation_due(preset, 3, 400.0) and not evaluation_due(preset, 3, 399.9)
    only_end = apply_overrides(preset, ["eval.every=0", "eval.from_fitness=none"])
    assert not any(evaluation_due(only_end, g, 1e9) for g in range(1, 20))


def test_envs_reports_a_cost_only_for_solved_seeds() -> None:
    from eggroll_rl.cli import _measured_cell
    from eggroll_rl.presets import Measured

    solved = Measured(seconds=12.34, env_steps=48417, seeds=3, solved_seeds=2)
    assert _measured_cell(solved) == "12.3 s, 48,417 steps, 2/3 seeds"
    # A seconds/steps pair for a preset that never solved would read as a cost to solve.
    assert _measured_cell(Measured(seconds=1336.9, env_steps=9232000, seeds=2, solved_seeds=0)) == (
        "not solved (0/2 seeds)"
    )
    assert _measured_cell(Measured(seconds=5.0, seeds=2)) == "not solved (0/2 seeds)"
    assert _measured_cell(Measured(seconds=5.0)) == "5.0 s"
    assert _measured_cell(Measured()) == "-"


def test_env_kwargs_reach_every_env_the_run_and_its_agent_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`continuous=True` turns LunarLander's 4 discrete actions into a 2-d Box: train, eval, record."""
    pytest.importorskip("Box2D")
    from eggroll_rl.agents import load_agent

    args = ["--population", "4", "--generations", "1", "--set", "eval.episodes=2", "--no-progress"]
    args += [
        "--set",
        "env_kwargs.continuous=true",
        "--set",
        "max_episode_steps=60",
        "--set",
        "train_max_episode_steps=none",
        "--set",
        "backend=sync",  # the preset's envpool (where installed) has its own options
        "--set",
        "hidden_sizes=4",
    ]
    code, out, err = cli(capsys, "train", "LunarLander-v3", "--out", tmp_path / "runs", *args)
    assert code == 0, err
    agent = load_agent(tmp_path / "runs" / "LunarLander-v3")
    assert agent.config["env_kwargs"] == {"continuous": True} and agent.env_kwargs == {"continuous": True}
    out_layer = [v for k, v in agent.state_dict.items() if k.endswith("weight")][-1]
    assert out_layer.shape[0] == 2  # a Box(2) policy; the discrete game would need 4 outputs
    assert agent.build_policy()(torch.zeros(1, 8)).shape == (1, 2)

    code, out, err = cli(capsys, "eval", tmp_path / "runs" / "LunarLander-v3", "--episodes", "2", "--record")
    assert code == 0, err
    assert "over 2 episodes" in out and "recorded" in out

    # The env is part of the run: --resume cannot change it.
    code, _, err = cli(
        capsys,
        "train",
        "LunarLander-v3",
        "--out",
        tmp_path / "runs",
        "--resume",
        "--generations",
        "2",
        "--set",
        "env_kwargs.continuous=false",
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "env_kwargs cannot change" in lines[0], err


def test_env_kwargs_in_a_preset_file_round_trip(tmp_path: Path) -> None:
    from eggroll_rl.presets import PresetError, apply_overrides, dump_preset

    def load_preset_file(path: Path) -> Any:
        return load_preset("LunarLander-v3", presets_dir=path.parent)

    path = tmp_path / "LunarLander-v3.toml"
    path.write_text('env_id = "LunarLander-v3"\n\n[env_kwargs]\ncontinuous = true\ngravity = -9.0\n')
    preset = load_preset_file(path)
    assert preset.env_kwargs == {"continuous": True, "gravity": -9.0}
    path.write_text(dump_preset(preset))
    assert load_preset_file(path).env_kwargs == preset.env_kwargs
    changed = apply_overrides(preset, ["env_kwargs.gravity=none", "env_kwargs.wind_power=[1, 2]"])
    assert changed.env_kwargs == {"continuous": True, "wind_power": [1, 2]}
    assert apply_overrides(preset, ["env_kwargs.mode=hard"]).env_kwargs["mode"] == "hard"  # a bare string
    for bad, message in (
        ("env_kwargs.2x=1", "env_kwargs.2x: the name must be a keyword argument name"),
        ("env_kwargs.x={a = 1}", "env_kwargs.x: expected a boolean, number, string or a list of them"),
        ("env_kwargs.x=nan", "env_kwargs.x: expected a finite number"),
        ("backend=envpool", "rollout.backend: cannot be envpool with env_kwargs"),
    ):
        with pytest.raises(PresetError, match=re.escape(message)):
            apply_overrides(preset, [bad])
    path.write_text('env_id = "LunarLander-v3"\nenv_kwargs = 3\n')
    with pytest.raises(PresetError, match=r"\[env_kwargs\] must be a table"):
        load_preset_file(path)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_env_kwargs_the_env_does_not_take_exit_2_with_one_line(
    nproc: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "train", "CartPole-v1", "--set", "env_kwargs.bogus_arg=3", "--nproc", nproc)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "env_kwargs: CartPole-v1 does not take {'bogus_arg': 3}" in lines[0] and "bogus_arg" in lines[0]
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.parametrize(
    ("env_kwargs", "message"),
    [(3, "[env_kwargs] must be a table, got int"), ({"bogus_arg": 1}, "cannot make CartPole-v1")],
)
def test_an_agent_with_bad_env_kwargs_exits_2_with_one_line(
    env_kwargs: Any,
    message: str,
    trained: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent = tmp_path / "edited"
    shutil.copytree(trained[0], agent)
    config = json.loads((agent / "config.json").read_text())
    (agent / "config.json").write_text(json.dumps({**config, "env_kwargs": env_kwargs}))
    code, _, err = cli(capsys, "eval", agent, "--episodes", "1")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def _sized_endless(size: int) -> Any:
    """A factory entry point (no class metadata to read) that needs a keyword argument."""
    import endless_env

    return endless_env.Endless(reward=float(size))


def test_render_modes_of_a_factory_env_are_asked_with_the_agents_env_kwargs() -> None:
    import gymnasium as gym

    from eggroll_rl.cli import _render_modes

    if "EggrollTest/Sized-v0" not in gym.registry:
        gym.register(id="EggrollTest/Sized-v0", entry_point=_sized_endless)
    assert _render_modes("EggrollTest/Sized-v0", {"size": 3}) == ["rgb_array"]
