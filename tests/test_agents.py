"""Agent directories, checkpoints and atomic writes."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eggroll_rl import agents as agents_mod
from eggroll_rl import atomic
from eggroll_rl.agents import (
    Agent,
    AgentError,
    CheckpointError,
    agent_dir,
    checkpoint_path,
    latest_agent,
    load_agent,
    load_checkpoint,
    load_policy,
    make_results,
    read_history,
    resolve_agent,
    save_agent,
    save_checkpoint,
)
from eggroll_rl.atomic import atomic_path, atomic_write_json, atomic_write_text

ENV = "CartPole-v1"


class Policy(nn.Module):
    """A stand-in policy with a normaliser buffer, like the real ones."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        self.register_buffer("obs_mean", torch.zeros(4))
        self.register_buffer("obs_count", torch.zeros((), dtype=torch.int64))


def make_policy(seed: int = 0) -> Policy:
    torch.manual_seed(seed)
    policy = Policy()
    policy.obs_mean.uniform_()
    policy.obs_count.fill_(1234)
    return policy


def config(env_id: str = ENV) -> dict:
    return {
        "env_id": env_id,
        "policy": {"hidden_sizes": [8], "activation": "tanh", "normalize_obs": True},
        "trainer": {"algorithm": "eggroll", "population": 16, "sigma": 0.1, "seed": 3},
        "preset": "CartPole-v1.toml",
        "version": "0.1.0",
    }


def results(env_id: str = ENV, mean_of: tuple[float, ...] = (500.0, 490.0), **extra) -> dict:
    return make_results(
        env_id, mean_of, target=475.0, env_steps=1000, generations=7, seconds=1.5, seed=3, **extra
    )


HISTORY = [
    {"generation": 1, "fitness": 10.0, "mean_fitness": 5.5, "env_steps": 100},
    {"generation": 2, "fitness": 20.25, "mean_fitness": 7.0, "env_steps": 200, "eval_return": 30.5},
]


def save(directory: Path, seed: int = 0, **kw) -> Path:
    args = {"policy": make_policy(seed), "config": config(), "history": HISTORY, "results": results()}
    args.update(kw)
    return save_agent(directory, **args)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# Round trips


def test_agent_round_trip(tmp_path: Path) -> None:
    policy = make_policy()
    directory = save_agent(tmp_path / ENV, policy=policy, config=config(), history=HISTORY, results=results())
    assert sorted(os.listdir(directory)) == sorted(agents_mod.AGENT_FILES)

    agent = load_agent(directory, ENV)
    assert isinstance(agent, Agent)
    assert agent.env_id == ENV
    expected = policy.state_dict()
    assert agent.state_dict.keys() == expected.keys()
    for key, value in expected.items():
        assert agent.state_dict[key].dtype == value.dtype
        assert torch.equal(agent.state_dict[key], value), key
    assert agent.config == config()
    assert agent.results == results() | {"date": agent.results["date"]}
    assert agent.results["solved"] is True and agent.results["std"] == pytest.approx(5.0)
    assert agent.policy_config == config()["policy"]
    assert agent.metadata["env_id"] == ENV

    history = agent.history()
    assert list(history) == ["generation", "fitness", "mean_fitness", "env_steps", "eval_return"]
    assert history["fitness"] == [10.0, 20.25]
    assert history["generation"] == [1, 2]
    assert history["eval_return"] == [None, 30.5]  # only evaluated on generation 2


def test_history_accepts_trainer_columns(tmp_path: Path) -> None:
    columns = {"fitness": [1.0, 0.1 + 0.2], "sigma": [0.1, 0.1], "solved": [False, True]}
    directory = save(tmp_path / ENV, history=columns)
    history = read_history(directory / "history.csv")
    assert history["fitness"] == [1.0, 0.1 + 0.2]  # floats survive at full precision
    assert history["solved"] == [0, 1]


def test_history_columns_of_unequal_length_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        save(tmp_path / ENV, history={"fitness": [1.0, 2.0], "eval_return": [3.0]})
    assert not (tmp_path / ENV).exists()
    assert leftovers(tmp_path) == []


def test_preset_object_is_accepted_as_config(tmp_path: Path) -> None:
    from eggroll_rl.presets import Preset

    preset = Preset(env_id=ENV)
    agent = load_agent(save(tmp_path / ENV, config=preset))
    assert agent.config["trainer"]["population"] == preset.trainer.population
    assert agent.config["policy"]["hidden_sizes"] == list(preset.policy.hidden_sizes)
    assert Preset.from_dict(agent.config) == preset


def test_tied_weights_save(tmp_path: Path) -> None:
    policy = make_policy()
    policy.net[2].weight = policy.net[2].weight  # no-op tie keeps the module valid
    state = policy.state_dict()
    state["alias"] = state["net.0.weight"][:2]  # a view sharing storage
    agent = load_agent(save(tmp_path / ENV, policy=state))
    assert torch.equal(agent.state_dict["alias"], state["net.0.weight"][:2])


def test_non_tensor_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="'step'"):
        save(tmp_path / ENV, policy={"w": torch.ones(2), "step": 3})
    assert leftovers(tmp_path) == []


def test_results_for_another_env_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Acrobot-v1"):
        save(tmp_path / ENV, results=results("Acrobot-v1"))


# --------------------------------------------------------------------------------------------
# Atomicity


@pytest.fixture(params=["exchange", "two-renames"])
def swap_mode(request, monkeypatch) -> str:
    """Run a test with the atomic directory exchange and with its portable fallback."""
    if request.param == "two-renames":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    return request.param


def test_replacing_an_agent_keeps_foreign_files(tmp_path: Path, swap_mode: str) -> None:
    directory = save(tmp_path / ENV, seed=0)
    save_checkpoint(checkpoint_path(directory), {"generation": 4})
    (directory / "notes.txt").write_text("keep me")
    save(directory, seed=1)
    assert torch.equal(load_agent(directory).state_dict["net.0.weight"], make_policy(1).net[0].weight)
    assert load_checkpoint(checkpoint_path(directory)) == {"generation": 4}
    assert (directory / "notes.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_old_agent_intact(tmp_path: Path, monkeypatch, swap_mode: str) -> None:
    directory = save(tmp_path / ENV, seed=0)
    before = snapshot(directory)
    real = agents_mod.atomic_write_text

    def failing(path, text, *a, **kw):
        if Path(path).name == "results.json":  # the last file: everything else is written
            raise OSError("disk full")
        return real(path, text, *a, **kw)

    monkeypatch.setattr(agents_mod, "atomic_write_text", failing)
    with pytest.raises(OSError, match="disk full"):
        save(directory, seed=1)
    assert snapshot(directory) == before
    assert leftovers(tmp_path) == []


def test_failure_during_swap_rolls_back(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    directory = save(tmp_path / ENV, seed=0)
    before = snapshot(directory)
    real_replace = os.replace
    moves = []

    def replace(src, dst):
        # Fail the step that moves the new directory into place, after the old one moved aside.
        moves.append((Path(src).name, Path(dst).name))
        if Path(dst) == directory and Path(src).name.startswith(f".{ENV}.tmp-"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        save(directory, seed=1)
    monkeypatch.setattr(os, "replace", real_replace)
    aside, failed, restore = moves[-3:]
    assert aside[0] == ENV and aside[1].startswith(f".{ENV}.old-")
    assert failed[1] == ENV and restore == (aside[1], ENV)
    assert snapshot(directory) == before
    assert leftovers(tmp_path) == []


def test_unserialisable_config_touches_nothing(tmp_path: Path) -> None:
    directory = save(tmp_path / ENV)
    before = snapshot(directory)
    with pytest.raises(ValueError):
        save(directory, config=config() | {"sigma": float("nan")})
    with pytest.raises(TypeError):
        save(directory, config=config() | {"obj": object()})
    assert snapshot(directory) == before
    assert leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"a": float("inf")})  # invalid JSON: refused before writing
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("writer crashed")
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"


# --------------------------------------------------------------------------------------------
# Bad agents on disk


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("policy.safetensors", b"\x00\x01not safetensors at all", "not a valid safetensors"),
        ("policy.safetensors", None, "not a valid safetensors"),  # None: truncate the real file
        ("config.json", b'{"env_id": "CartPole-v1", "policy": {', "invalid JSON at line 1"),
        ("results.json", b"", "invalid JSON"),
        ("config.json", b"[1, 2]", "expected a JSON object"),
        ("config.json", b'{"policy": {}}', "no 'env_id'"),
        ("results.json", b'{"env_id": "CartPole-v1"}', "'mean' must be a number"),
        ("results.json", b'{"env_id": "Acrobot-v1", "mean": 1, "episodes": 1}', "Acrobot-v1"),
    ],
)
def test_corrupt_files_raise_agent_error_naming_the_file(
    tmp_path: Path, name: str, content: bytes | None, fragment: str
) -> None:
    directory = save(tmp_path / ENV)
    target = directory / name
    target.write_bytes(target.read_bytes()[:40] if content is None else content)
    with pytest.raises(AgentError, match=fragment) as info:
        load_agent(directory)
    message = str(info.value)
    assert name in message and "\n" not in message


@pytest.mark.parametrize("name", ["policy.safetensors", "config.json", "results.json"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    directory = save(tmp_path / ENV)
    (directory / name).unlink()
    with pytest.raises(AgentError, match=f"{name}: missing"):
        load_agent(directory)


def test_missing_directory_and_wrong_env(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="no such agent directory"):
        load_agent(tmp_path / "nope")
    directory = save(tmp_path / ENV)
    with pytest.raises(AgentError, match="trained on CartPole-v1, not Acrobot-v1"):
        load_agent(directory, "Acrobot-v1")
    assert load_agent(directory, ENV).env_id == ENV


def test_missing_history_is_not_fatal(tmp_path: Path) -> None:
    directory = save(tmp_path / ENV)
    (directory / "history.csv").unlink()
    agent = load_agent(directory)
    assert agent.history_path is None and agent.history() == {}


def test_ragged_history_is_reported(tmp_path: Path) -> None:
    directory = save(tmp_path / ENV)
    (directory / "history.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(AgentError, match=r"history\.csv: line 3"):
        load_agent(directory).history()


# --------------------------------------------------------------------------------------------
# Rebuilding the policy


def test_build_policy_through_make_policy(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def fake_make_policy(observation_space, action_space, *, hidden_sizes, **kwargs):
        seen.update(obs=observation_space.shape, act=action_space.n, hidden=hidden_sizes, **kwargs)
        return Policy(hidden_sizes[0])

    fake = types.ModuleType("eggroll_rl.policies")
    fake.make_policy = fake_make_policy
    monkeypatch.setitem(sys.modules, "eggroll_rl.policies", fake)

    directory = save(tmp_path / ENV)
    policy = load_policy(directory, ENV)
    assert seen == {"obs": (4,), "act": 2, "hidden": [8], "activation": "tanh", "normalize_obs": True}
    assert not policy.training
    assert torch.equal(policy.net[0].weight, make_policy().net[0].weight)

    # Weights that do not fit the configured architecture are an AgentError, not a traceback.
    cfg = config()
    cfg["policy"]["hidden_sizes"] = [5]
    bad = save(tmp_path / "bad" / ENV, config=cfg)
    with pytest.raises(AgentError, match=r"policy\.safetensors: weights do not fit"):
        load_policy(bad)


def test_build_policy_with_real_policies(tmp_path: Path) -> None:
    policies = pytest.importorskip("eggroll_rl.policies")
    import gymnasium as gym

    env = gym.make(ENV)
    kwargs = {"hidden_sizes": [8], "activation": "tanh", "normalize_obs": True}
    policy = policies.make_policy(env.observation_space, env.action_space, **kwargs)
    cfg = config() | {"policy": kwargs}
    directory = save(tmp_path / ENV, policy=policy, config=cfg)
    rebuilt = load_policy(directory, ENV)
    for key, value in policy.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


# --------------------------------------------------------------------------------------------
# Finding agents


def test_latest_agent_prefers_recorded_date(tmp_path: Path) -> None:
    assert latest_agent(tmp_path / "missing") is None
    assert latest_agent(tmp_path) is None
    newer = save(agent_dir(ENV, tmp_path), results=results(date="2030-01-01T00:00:00+00:00"))
    older = save_agent(
        agent_dir("Acrobot-v1", tmp_path),
        policy=make_policy(),
        config=config("Acrobot-v1"),
        history=HISTORY,
        results=results("Acrobot-v1", date="2020-01-01T00:00:00+00:00"),
    )
    os.utime(newer / "results.json", (1, 1))  # mtime says otherwise; the record wins
    (tmp_path / "half-trained").mkdir()  # a checkpoint-only directory is not an agent
    assert latest_agent(tmp_path) == newer
    assert resolve_agent(None, tmp_path) == newer
    assert resolve_agent("Acrobot-v1", tmp_path) == older
    assert resolve_agent(str(older), tmp_path) == older
    with pytest.raises(AgentError, match="no agent for Pendulum-v1"):
        resolve_agent("Pendulum-v1", tmp_path)
    with pytest.raises(AgentError, match="no trained agent"):
        resolve_agent(None, tmp_path / "empty")


def test_namespaced_env_ids_map_to_one_directory(tmp_path: Path) -> None:
    assert agent_dir("ALE/Pong-v5", tmp_path) == tmp_path / "ALE__Pong-v5"


# --------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    state = {
        "trainer": {
            "center": torch.randn(10, dtype=torch.float64),
            "optimizer": {
                "state": {0: {"exp_avg": torch.zeros(10), "step": torch.tensor(3.0)}},
                "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}],
            },
            "generation": 5,
            "rng": gen.get_state(),
            "noise_key": 2**100,  # counter-based keys can exceed 64 bits
            "history": {"fitness": [1.0, 2.5], "sigma": [0.1, 0.1]},
        },
        "run": {"config": config(), "elapsed": 12.5, "evals": [(5, 498.0)], "best": None},
    }
    path = save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", state)
    # The file itself loads under the strictest settings, not just through our loader.
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "eggroll-rl-checkpoint"
    loaded = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["trainer"]["center"], state["trainer"]["center"])
    assert torch.equal(loaded["trainer"]["rng"], gen.get_state())
    assert loaded["trainer"]["noise_key"] == 2**100
    assert loaded["trainer"]["optimizer"]["param_groups"] == state["trainer"]["optimizer"]["param_groups"]
    assert loaded["run"] == state["run"]


def test_checkpoint_refuses_unsafe_values_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(TypeError, match=r"state\['run'\]\['obs'\]: numpy.ndarray"):
        save_checkpoint(path, {"run": {"obs": np.zeros(3)}})
    with pytest.raises(TypeError, match=r"state\['x'\]\[1\]"):
        save_checkpoint(path, {"x": [1, object()]})
    assert not path.exists()
    assert os.listdir(tmp_path) == []


_MARK: list[str] = []


def _mark() -> None:
    _MARK.append("executed")


class Evil:
    def __reduce__(self):
        return (_mark, ())


def test_checkpoint_loading_executes_no_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "eggroll-rl-checkpoint", "version": 1, "state": {"x": Evil()}}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a readable checkpoint"):
        load_checkpoint(path)
    assert _MARK == []


@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign", "future"])
def test_bad_checkpoints(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "checkpoint.pt"
    if kind != "missing":
        save_checkpoint(path, {"center": torch.ones(100)})
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-200])
    elif kind == "foreign":
        torch.save({"center": torch.ones(3)}, path)
    elif kind == "future":
        torch.save({"format": "eggroll-rl-checkpoint", "version": 99, "state": {}}, path)
    fragment = {
        "missing": "no checkpoint",
        "truncated": "not a readable",
        "foreign": "not an eggroll-rl checkpoint",
        "future": "newer",
    }[kind]
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_checkpoint(path)
    assert "checkpoint.pt" in str(info.value)
    assert isinstance(info.value, AgentError) and isinstance(info.value, ValueError)


def test_saved_agent_has_ordinary_permissions(tmp_path):
    """Agents are shared artefacts: the temp-dir swap must not leave them private (0700/0600)."""
    import os
    import stat

    from eggroll_rl.atomic import atomic_write_text

    mask = os.umask(0o022)
    os.umask(mask)
    target = tmp_path / "plain.txt"
    atomic_write_text(target, "x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    directory = save(tmp_path / ENV)
    save(tmp_path / ENV, seed=1)  # the replacing swap too
    assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~mask
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name
