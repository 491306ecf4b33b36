"""Trained agents on disk (``agents/ENV_ID/``) and checkpoints of a run in progress.

An agent directory holds exactly these files::

    policy.safetensors   the policy's state_dict (weights and normaliser buffers); tensors only
    config.json          the resolved run config (env_id, policy, trainer, rollout, ..., version)
    history.csv          one row per generation, one column per history key
    results.json         the final evaluation: env_id, mean, std, episodes, solved, target, ...

Loading never executes code: weights come from safetensors, JSON and CSV are plain data, and
checkpoints are read with ``torch.load(weights_only=True)``. Anything wrong on disk surfaces as
an :class:`AgentError` whose message is one line naming the file and the problem.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from eggroll_rl.atomic import atomic_write_bytes, atomic_write_text, make_temp_dir, replace_dir

if TYPE_CHECKING:
    import gymnasium as gym
    from torch import nn

__all__ = [
    "AGENT_FILES",
    "Agent",
    "AgentError",
    "CheckpointError",
    "agent_dir",
    "agent_dirs",
    "checkpoint_path",
    "latest_agent",
    "latest_checkpoint_dir",
    "library_version",
    "load_agent",
    "load_checkpoint",
    "load_policy",
    "make_results",
    "read_history",
    "resolve_agent",
    "run_directory",
    "save_agent",
    "save_checkpoint",
]

POLICY_FILE = "policy.safetensors"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
RESULTS_FILE = "results.json"
CHECKPOINT_FILE = "checkpoint.pt"
AGENT_FILES = (POLICY_FILE, CONFIG_FILE, HISTORY_FILE, RESULTS_FILE)

AGENT_FORMAT = "eggroll-rl-agent"
CHECKPOINT_FORMAT = "eggroll-rl-checkpoint"
FORMAT_VERSION = 1

PathLike = str | os.PathLike[str]


class AgentError(ValueError):
    """A missing, corrupt or mismatched agent; the message is one readable line."""


class CheckpointError(AgentError):
    """A missing, corrupt or incompatible checkpoint."""


def library_version() -> str:
    """Return the installed eggroll-rl version (``0+unknown`` when running from a bare tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eggroll-rl")
    except PackageNotFoundError:
        return "0+unknown"


def _slug(env_id: str) -> str:
    """Turn an env id into one path component (namespaced ids like ``ALE/Pong-v5`` contain '/')."""
    return env_id.replace("/", "__")


def agent_dir(env_id: str, root: PathLike = "agents") -> Path:
    """Return the directory an agent for ``env_id`` lives in under ``root``."""
    return Path(root) / _slug(env_id)


def agent_dirs(env_id: str, root: PathLike = "runs") -> list[Path]:
    """Return the existing run directories of ``env_id`` under ``root``: ``SLUG`` and ``SLUG_N``."""
    base = agent_dir(env_id, root)
    found = [base] if base.is_dir() else []
    if base.parent.is_dir():
        prefix = f"{base.name}_"
        found += sorted(
            (
                p
                for p in base.parent.iterdir()
                if p.name.startswith(prefix) and p.name[len(prefix) :].isdigit()
            ),
            key=lambda p: int(p.name[len(prefix) :]),
        )
    return [p for p in found if p.is_dir()]


def run_directory(env_id: str, root: PathLike = "runs", *, overwrite: bool = False) -> Path:
    """Return the directory a new run of ``env_id`` writes to: ``ROOT/SLUG``, else ``ROOT/SLUG_N``.

    A directory that already holds anything (an agent, a checkpoint) is never reused unless
    ``overwrite``: the run takes the first free ``SLUG_2``, ``SLUG_3``, ... instead, as
    rl-baselines3-zoo numbers its runs.
    """
    base = agent_dir(env_id, root)
    if overwrite or not _occupied(base):
        return base
    n = 2
    while _occupied(base.with_name(f"{base.name}_{n}")):
        n += 1
    return base.with_name(f"{base.name}_{n}")


def _occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def latest_checkpoint_dir(env_id: str, root: PathLike = "runs") -> Path | None:
    """Return the run directory of ``env_id`` under ``root`` with the newest checkpoint, or None."""
    best: tuple[float, Path] | None = None
    for directory in agent_dirs(env_id, root):
        ckpt = checkpoint_path(directory)
        try:
            stamp = ckpt.stat().st_mtime
        except OSError:
            continue
        if best is None or stamp > best[0]:
            best = (stamp, directory)
    return None if best is None else best[1]


def checkpoint_path(directory: PathLike) -> Path:
    """Return where a run saving into agent ``directory`` keeps its checkpoint."""
    # Inside the agent directory so that `--resume` finds it from the same argument; save_agent
    # carries files it does not own (like this one) over when it replaces the directory.
    return Path(directory) / CHECKPOINT_FILE


def _short(exc: BaseException) -> str:
    """Squash an exception message to one line, short enough for a terminal."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# --------------------------------------------------------------------------------------------
# Results and history


def make_results(
    env_id: str,
    returns: Sequence[float],
    *,
    target: float | None,
    env_steps: int,
    generations: int,
    seconds: float,
    seed: int | None,
    **extra: Any,
) -> dict[str, Any]:
    """Build a ``results.json`` record from the final evaluation's per-episode returns."""
    if not returns:
        raise ValueError("returns must hold at least one episode return")
    values = [float(r) for r in returns]
    # A NaN or infinite return has no mean worth reporting (and JSON cannot hold it): mean and
    # std become null, the count of such episodes is recorded, and the run is not solved.
    bad = sum(not math.isfinite(v) for v in values)
    mean = statistics.fmean(values) if not bad else None
    return {
        "env_id": env_id,
        "mean": mean,
        # Population std over the evaluation episodes: what "mean +/- std" reports describe.
        "std": statistics.pstdev(values) if not bad else None,
        "episodes": len(values),
        "non_finite_episodes": bad,
        "solved": None if target is None else bool(mean is not None and mean >= target),
        "target": target,
        "env_steps": int(env_steps),
        "generations": int(generations),
        "seconds": float(seconds),
        "seed": seed,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }


def _history_rows(history: Mapping[str, Sequence[Any]] | Iterable[Mapping[str, Any]]) -> list[dict]:
    """Normalise column-oriented (trainer.history) or row-oriented history into rows."""
    if isinstance(history, Mapping):
        columns = {k: list(v) for k, v in history.items()}
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"history columns differ in length {lengths}; pass one row per generation "
                "(a list of dicts) when some keys are only recorded on some generations"
            )
        n = next(iter(lengths.values()), 0)
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    return [dict(row) for row in history]


def _cell(value: Any) -> str:
    """Format one CSV cell; blank for a missing value, full precision for floats."""
    if value is None:
        return ""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _history_csv(history: Mapping[str, Sequence[Any]] | Iterable[Mapping[str, Any]]) -> str:
    """Render history as CSV text; the columns are the union of keys in first-seen order."""
    rows = _history_rows(history)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def _parse_cell(text: str) -> int | float | str | None:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_history(path: PathLike) -> dict[str, list[int | float | str | None]]:
    """Read a ``history.csv`` into columns; blank cells become None."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AgentError(f"{path}: cannot read history ({_short(exc)})") from exc
    if not rows:
        raise AgentError(f"{path}: empty file, expected a CSV header row")
    header, body = rows[0], rows[1:]
    for i, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise AgentError(f"{path}: line {i} has {len(row)} fields, the header has {len(header)}")
    return {name: [_parse_cell(row[j]) for row in body] for j, name in enumerate(header)}


# --------------------------------------------------------------------------------------------
# Agents


@dataclass(frozen=True)
class Agent:
    """A trained agent read from disk: policy weights, run config, results, history location."""

    directory: Path
    env_id: str
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    results: dict[str, Any]
    history_path: Path | None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def policy_config(self) -> dict[str, Any]:
        """Return the keyword arguments ``make_policy`` was built with."""
        return dict(self.config.get("policy", {}))

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """Return the ``gym.make`` keyword arguments the agent was trained with (config ``env_kwargs``)."""
        from eggroll_rl.presets import PresetError, check_env_kwargs

        try:
            return check_env_kwargs(self.config.get("env_kwargs") or {})
        except PresetError as exc:
            raise AgentError(f"{self.directory / CONFIG_FILE}: {exc}") from None

    def history(self) -> dict[str, list[int | float | str | None]]:
        """Read this agent's per-generation history (empty when it has none)."""
        return {} if self.history_path is None else read_history(self.history_path)

    def build_policy(
        self,
        observation_space: gym.Space | None = None,
        action_space: gym.Space | None = None,
    ) -> nn.Module:
        """Rebuild the policy module and load the saved weights into it (eval mode)."""
        from eggroll_rl.policies import make_policy  # lazy: keeps storage free of RL deps

        if observation_space is None or action_space is None:
            observation_space, action_space = _env_spaces(self.env_id, self.env_kwargs)
        policy_file = self.directory / POLICY_FILE
        try:
            policy = make_policy(observation_space, action_space, **self.policy_config)
        except (TypeError, ValueError) as exc:
            raise AgentError(
                f"{self.directory / CONFIG_FILE}: cannot build the policy it describes ({_short(exc)})"
            ) from exc
        try:
            policy.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            raise AgentError(
                f"{policy_file}: weights do not fit the policy in {CONFIG_FILE} ({_short(exc)})"
            ) from exc
        return policy.eval()


def _env_spaces(env_id: str, env_kwargs: dict[str, Any]) -> tuple[gym.Space, gym.Space]:
    """Return the single-env observation and action spaces of ``gym.make(env_id, **env_kwargs)``."""
    import gymnasium as gym

    try:
        env = gym.make(env_id, **env_kwargs)
    except (ImportError, gym.error.DependencyNotInstalled) as exc:
        from eggroll_rl.presets import dependency_hint

        raise AgentError(f"{env_id} {dependency_hint(exc)}") from exc
    except Exception as exc:  # gymnasium raises many error types for a bad id or missing extra
        raise AgentError(f"cannot make {env_id} to rebuild its policy ({_short(exc)})") from exc
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def _state_dict_of(policy: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a CPU, contiguous, storage-unshared copy of a module's or a mapping's tensors."""
    state = policy.state_dict() if hasattr(policy, "state_dict") else policy
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"policy state_dict entry {key!r} is {type(value).__name__}, not a tensor; "
                "safetensors stores tensors only"
            )
        # clone(): safetensors refuses tensors that share storage (tied weights, views).
        out[key] = value.detach().to("cpu").clone().contiguous()
    return out


def _config_dict(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Accept a plain mapping or an object with ``to_config()`` / ``to_dict()`` (a Preset)."""
    for name in ("to_config", "to_dict"):
        if not isinstance(config, Mapping) and hasattr(config, name):
            config = getattr(config, name)()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    return dict(config)


def save_agent(
    directory: PathLike,
    *,
    policy: nn.Module | Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | Any,
    history: Mapping[str, Sequence[Any]] | Iterable[Mapping[str, Any]],
    results: Mapping[str, Any],
) -> Path:
    """Write a whole agent directory atomically and return its path.

    The agent is built in a temporary sibling directory and swapped into place only when every
    file is written, so an existing agent is either fully replaced or left as it was. Files in the
    old directory that are not agent files (a checkpoint, notes) are carried over.
    """
    dest = Path(directory)
    config = _config_dict(config)
    env_id = config.get("env_id")
    if not isinstance(env_id, str) or not env_id:
        raise ValueError("config must hold the env id as a non-empty string under 'env_id'")
    results = dict(results)
    if results.setdefault("env_id", env_id) != env_id:
        raise ValueError(f"results are for {results['env_id']!r} but the config is for {env_id!r}")
    results.setdefault("date", datetime.now(UTC).isoformat(timespec="seconds"))

    # Serialise everything first: a bad value fails here, before any file system change.
    from safetensors.torch import save as st_save

    metadata = {"format": AGENT_FORMAT, "version": str(FORMAT_VERSION), "env_id": env_id}
    payload = {
        POLICY_FILE: st_save(_state_dict_of(policy), metadata=metadata),
        CONFIG_FILE: json.dumps(config, indent=2, allow_nan=False, ensure_ascii=False) + "\n",
        HISTORY_FILE: _history_csv(history),
        RESULTS_FILE: json.dumps(results, indent=2, allow_nan=False, ensure_ascii=False) + "\n",
    }

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, f".{dest.name}.tmp-")
    try:
        for name, data in payload.items():
            if isinstance(data, bytes):
                atomic_write_bytes(tmp / name, data)
            else:
                atomic_write_text(tmp / name, data)
        replace_dir(tmp, dest, before_swap=lambda old: _carry_over(old, tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _carry_over(old: Path, new: Path) -> None:
    """Bring files the agent format does not own from the old directory into the new one."""
    for entry in old.iterdir():
        if entry.name in AGENT_FILES or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
            continue
        try:
            # A hard link is instant and safe: our writers replace files, never edit in place.
            os.link(entry, new / entry.name, follow_symlinks=False)
        except OSError:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def _read_json_object(path: Path) -> dict[str, Any]:
    """Read a JSON file that must hold an object; raise AgentError naming the file otherwise."""
    if not path.is_file():
        raise AgentError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AgentError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentError(f"{path}: cannot read ({_short(exc)})") from exc
    if not isinstance(data, dict):
        raise AgentError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_policy(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata from a safetensors file; raise AgentError if it is unusable."""
    from safetensors import safe_open

    if not path.is_file():
        raise AgentError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types and OSError/ValueError
        raise AgentError(f"{path}: not a valid safetensors file ({_short(exc)})") from exc
    if not tensors:
        raise AgentError(f"{path}: holds no tensors")
    return tensors, metadata


def load_agent(directory: PathLike, env_id: str | None = None) -> Agent:
    """Read and check an agent directory; with ``env_id``, insist the agent was trained on it."""
    directory = Path(directory)
    if not directory.exists():
        raise AgentError(f"{directory}: no such agent directory")
    if not directory.is_dir():
        raise AgentError(f"{directory}: not a directory")

    config = _read_json_object(directory / CONFIG_FILE)
    config_env = config.get("env_id")
    if not isinstance(config_env, str) or not config_env:
        raise AgentError(f"{directory / CONFIG_FILE}: no 'env_id' string")
    if env_id is not None and config_env != env_id:
        raise AgentError(f"{directory / CONFIG_FILE}: this agent was trained on {config_env}, not {env_id}")
    if "policy" in config and not isinstance(config["policy"], dict):
        raise AgentError(f"{directory / CONFIG_FILE}: 'policy' must be an object")

    results = _read_json_object(directory / RESULTS_FILE)
    if results.get("env_id", config_env) != config_env:
        raise AgentError(
            f"{directory / RESULTS_FILE}: results are for {results['env_id']}, "
            f"but config.json is for {config_env}"
        )

    for key in ("mean", "episodes"):
        # mean is null when the final evaluation had non-finite returns (see make_results).
        nullable = key == "mean" and results.get("non_finite_episodes")
        if not (_is_finite_number(results.get(key)) or (nullable and results.get(key) is None)):
            raise AgentError(f"{directory / RESULTS_FILE}: {key!r} must be a number")

    state_dict, metadata = _read_policy(directory / POLICY_FILE)
    if metadata.get("env_id", config_env) != config_env:
        raise AgentError(
            f"{directory / POLICY_FILE}: weights are for {metadata['env_id']}, "
            f"but config.json is for {config_env}"
        )

    history = directory / HISTORY_FILE
    return Agent(
        directory=directory,
        env_id=config_env,
        state_dict=state_dict,
        config=config,
        results=results,
        history_path=history if history.is_file() else None,
        metadata=metadata,
    )


def load_policy(
    directory: PathLike,
    env_id: str | None = None,
    *,
    observation_space: gym.Space | None = None,
    action_space: gym.Space | None = None,
) -> nn.Module:
    """Load an agent and return its policy module with the saved weights (eval mode)."""
    return load_agent(directory, env_id).build_policy(observation_space, action_space)


def _recorded_time(directory: Path) -> float | None:
    """Return when the agent in ``directory`` was trained (results date, else file mtime)."""
    results = directory / RESULTS_FILE
    if not (results.is_file() and (directory / POLICY_FILE).is_file()):
        return None
    try:
        date = json.loads(results.read_text(encoding="utf-8")).get("date")
        stamp = datetime.fromisoformat(date)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return stamp.timestamp()
    except (OSError, ValueError, TypeError, AttributeError):
        # A recorded date is preferred (a fresh clone gives every file the same mtime), but an
        # agent without one is still an agent.
        try:
            return results.stat().st_mtime
        except OSError:
            return None


def latest_agent(roots: PathLike | Sequence[PathLike] = "agents", env_id: str | None = None) -> Path | None:
    """Return the most recently trained agent directory under ``roots``, or None.

    ``roots`` is one directory or several (searched together); with ``env_id`` only that env's
    run directories (``SLUG``, ``SLUG_N``) count.
    """
    if isinstance(roots, str | os.PathLike):
        roots = [roots]
    best: tuple[float, float, str] | None = None
    found: Path | None = None
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        entries = agent_dirs(env_id, root) if env_id is not None else root.iterdir()
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            stamp = _recorded_time(entry)
            if stamp is None:
                continue
            # Ties (same recorded second) break on mtime, then name, so the answer is deterministic.
            key = (stamp, (entry / RESULTS_FILE).stat().st_mtime, entry.name)
            if best is None or key > best:
                best, found = key, entry
    return found


def resolve_agent(target: str | PathLike | None, roots: PathLike | Sequence[PathLike] = "agents") -> Path:
    """Turn ``eval``'s argument (None, an agent directory, or an env id) into an agent path.

    An env id means the newest agent of that env under ``roots`` (one directory or several).
    """
    if isinstance(roots, str | os.PathLike):
        roots = [roots]
    where = " or ".join(f"{r}/" for r in roots)
    if target is None:
        found = latest_agent(roots)
        if found is None:
            raise AgentError(f"no trained agent under {where}; train one with `eggroll-rl train ENV_ID`")
        return found
    path = Path(target)
    if path.is_dir():
        return path
    found = latest_agent(roots, str(target))
    if found is not None:
        return found
    for root in roots:  # an env's directory without a readable agent: load_agent says what is wrong
        by_id = agent_dir(str(target), root)
        if by_id.is_dir():
            return by_id
    if _is_env_id(str(target)):
        raise AgentError(f"no agent for {target} under {where}; train one with `eggroll-rl train {target}`")
    raise AgentError(f"no agent directory {target}, and it is not a known env id")


def _is_env_id(text: str) -> bool:
    try:
        import gymnasium as gym

        from eggroll_rl.presets import split_env_id

        return split_env_id(text) in gym.registry
    except Exception:  # an unimportable module: not an id that can be trained here
        return False


# --------------------------------------------------------------------------------------------
# Checkpoints

_ALLOWED_LEAVES = (
    torch.Tensor,
    bool,
    int,
    float,
    str,
    bytes,
    type(None),
    torch.Size,
    torch.dtype,
    torch.device,
)


def _check_checkpointable(value: Any, where: str) -> None:
    """Reject values ``torch.load(weights_only=True)`` would refuse, naming where they sit."""
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
            raise TypeError(f"{where}: tensor subclass {type(value).__name__} cannot be saved")
        return
    if isinstance(value, _ALLOWED_LEAVES):
        return
    if isinstance(value, Mapping):
        if not isinstance(value, dict):  # OrderedDict is a dict; other mappings are not allowed
            raise TypeError(f"{where}: {type(value).__name__} is not allowed; use a dict")
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: key {key!r} must be a str or int")
            _check_checkpointable(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        if type(value) not in (list, tuple):
            raise TypeError(f"{where}: {type(value).__name__} is not allowed; use a list/tuple")
        for i, item in enumerate(value):
            _check_checkpointable(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where}: {type(value).__module__}.{type(value).__qualname__} cannot be loaded with "
        "weights_only=True; convert it to tensors, numbers, strings, lists or dicts"
    )


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> Path:
    """Save a run's full state (nested dicts of tensors/numbers/strings/lists) atomically.

    Suggested layout: ``{"trainer": trainer.state_dict(), "run": {"config": ..., "elapsed": s,
    "evals": [...], "env_steps": n}}``. The state is verified to load with
    ``weights_only=True`` before anything is written, so a checkpoint that saves always loads.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    _check_checkpointable(dict(state), "state")
    wrapped = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "state": dict(state)}
    buf = io.BytesIO()
    torch.save(wrapped, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # the walk above should catch everything; this is the real test
        raise TypeError(f"checkpoint state cannot be loaded safely ({_short(exc)})") from exc
    atomic_write_bytes(path, data)
    return Path(path)


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` without executing code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        wrapped = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as exc:  # truncated zip, foreign pickle, refused global: all unusable
        raise CheckpointError(f"{path}: not a readable checkpoint ({_short(exc)})") from exc
    if not isinstance(wrapped, dict) or wrapped.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an eggroll-rl checkpoint")
    version = wrapped.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is newer than this eggroll-rl "
            f"supports ({FORMAT_VERSION}); upgrade eggroll-rl"
        )
    state = wrapped.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint holds no state dict")
    return state


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
