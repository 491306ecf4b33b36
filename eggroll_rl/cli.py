"""The ``eggroll-rl`` command line: train, eval (--record), envs, plot.

A thin layer over the library: presets come from ``eggroll_rl.presets``, the run from
``eggroll_rl.run``, agents from ``eggroll_rl.agents``. Bad input of any kind (unknown env id,
missing or corrupt agent, unknown ``--set`` key, invalid value, missing optional dependency,
usage errors) exits with code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import gymnasium as gym
import numpy as np
import typer

try:  # typer >= 0.25 vendors click; older versions use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import UsageError

from eggroll_rl.agents import AgentError
from eggroll_rl.presets import Measured, PresetError, dependency_hint

__all__ = ["AGENTS_DIR_ENV", "VIDEOS_DIR_ENV", "app", "main"]

AGENTS_DIR_ENV = "EGGROLL_RL_AGENTS_DIR"
# Where `train` writes by default: git-ignored, so training never touches the shipped agents/.
RUNS_DIR = "runs"
AgentsDir = Annotated[
    Path | None,
    typer.Option(help=f"Agents root for env ids (default ${AGENTS_DIR_ENV}, else runs/ then agents/)."),
]
VIDEOS_DIR_ENV = "EGGROLL_RL_VIDEOS_DIR"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="eggroll-rl",
    help="Train and evaluate reinforcement-learning agents with Evolution Strategies (EGGROLL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])


class MissingDependency(RuntimeError):
    """An optional dependency is not installed; the message names the extra to install."""


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    # Plain print, not rich: rich wraps long lines, and an error must stay one line.
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return typer.Exit(code)


def _friendly(fn: F) -> F:
    """Turn the library's bad-input errors into exit code 2 and one line on stderr."""
    from eggroll_rl.run import RunError, RunInterrupted

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (AgentError, PresetError, RunError, MissingDependency) as exc:
            raise _fail(str(exc)) from None
        except (gym.error.DependencyNotInstalled, ImportError) as exc:
            # Every optional dependency (an env family's, envpool, jax, matplotlib) says what to install.
            raise _fail(dependency_hint(exc)) from None
        except RunInterrupted as exc:
            raise _fail(str(exc), 128 + exc.signum) from None

    return wrapper  # type: ignore[return-value]


def _agents_root() -> Path:
    """Return where ``train`` writes: $EGGROLL_RL_AGENTS_DIR, else ./runs (git-ignored)."""
    configured = os.environ.get(AGENTS_DIR_ENV)
    return Path(configured) if configured else Path(RUNS_DIR)


def _read_roots() -> list[Path]:
    """Return where eval/envs/plot look for agents: $EGGROLL_RL_AGENTS_DIR, else runs/ then agents/.

    A missing ./agents falls back to the agents shipped beside the package in a source checkout,
    so the shipped agents work from any directory.
    """
    configured = os.environ.get(AGENTS_DIR_ENV)
    if configured:
        return [Path(configured)]
    local = Path("agents")
    shipped = Path(__file__).resolve().parent.parent / "agents"
    return [Path(RUNS_DIR), shipped if not local.is_dir() and shipped.is_dir() else local]


def _check_writable(directory: Path, what: str) -> None:
    """Fail (exit 2, one line) unless files can be created in ``directory``."""
    from eggroll_rl.atomic import check_writable_dir

    try:
        check_writable_dir(directory)
    except OSError as exc:
        raise _fail(f"{what}: cannot write to {directory} ({exc.strerror or type(exc).__name__})") from None


def _is_main_process() -> bool:
    # Under torchrun only rank 0 talks; RANK is set before the process group exists.
    return os.environ.get("RANK", "0") == "0"


def _echo(text: str = "") -> None:
    if _is_main_process():
        print(text, flush=True)


# --------------------------------------------------------------------------------------------
# train


@app.command()
@_friendly
def train(
    env_id: Annotated[str, typer.Argument(metavar="ENV_ID", help="Gymnasium env id, e.g. CartPole-v1.")],
    trainer: Annotated[str | None, typer.Option("--trainer", help="eggroll (low-rank) or vanilla.")] = None,
    population: Annotated[int | None, typer.Option(help="Population size (members per generation).")] = None,
    sigma: Annotated[float | None, typer.Option(help="Noise scale.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    rank: Annotated[int | None, typer.Option(help="EGGROLL perturbation rank.")] = None,
    generations: Annotated[int | None, typer.Option(help="Generation budget.")] = None,
    episodes_per_member: Annotated[int | None, typer.Option(help="Episodes averaged per member.")] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    target: Annotated[float | None, typer.Option(help="Mean eval return that counts as solved.")] = None,
    max_seconds: Annotated[float | None, typer.Option(help="Wall-clock budget in seconds.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help=f"Runs root; the agent goes to OUT/ENV_ID, or OUT/ENV_ID_N when that is taken "
            f"(default ${AGENTS_DIR_ENV} or runs)."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the agent in OUT/ENV_ID when the run finishes.")
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override any preset key: key=value (repeatable).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the newest checkpoint of ENV_ID under OUT exactly.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Plain log lines, no live bar.")] = False,
    nproc: Annotated[int, typer.Option(help="Local processes sharing the population.", min=1)] = 1,
) -> None:
    """Train an agent for ENV_ID from its preset (envs/ENV_ID.toml) and save it to OUT/ENV_ID[_N]."""
    from eggroll_rl.presets import apply_overrides, check_env_id, dump_preset, load_preset
    from eggroll_rl.run import check_episode_caps, env_spaces, resume_preset

    root = out if out is not None else _agents_root()
    typed = {
        "trainer.algorithm": trainer,
        "trainer.population": population,
        "trainer.sigma": sigma,
        "trainer.lr": lr,
        "trainer.rank": rank,
        "trainer.generations": generations,
        "rollout.episodes_per_member": episodes_per_member,
        "trainer.seed": seed,
        "run.device": device,
        "target": target,
        "run.max_seconds": max_seconds,
    }
    typed = {k: v for k, v in typed.items() if v is not None}
    sets = list(set_ or [])
    check_env_id(env_id)
    if resume:
        preset = resume_preset(env_id, root, typed, sets)
    else:
        preset = load_preset(env_id)
        if typed:
            preset = apply_overrides(preset, typed)
        if sets:
            preset = apply_overrides(preset, sets)
        if preset.is_default:
            _echo(f"No preset for {env_id} (envs/{env_id}.toml); training with these defaults:")
            _echo(dump_preset(preset).rstrip())
            _echo()
    check_episode_caps(preset)  # before any process starts: exit 2 under --nproc too
    if preset.env_kwargs:
        env_spaces(preset)  # an env that does not take them: exit 2 before any work
    kind = "plain" if no_progress or not sys.stdout.isatty() else "rich"
    if resume and overwrite:
        raise _fail("--resume continues a run in its own directory; --overwrite does not apply")
    result = _run_training(preset, root, resume, kind, nproc, overwrite)
    if result is None:
        return
    _report_training(result, env_id)
    if result.stopped == "interrupted":
        raise typer.Exit(128 + (result.signum or 2))


def _run_training(preset: Any, root: Path, resume: bool, kind: str, nproc: int, overwrite: bool) -> Any:
    """Run in this process (or under torchrun), or spawn ``nproc`` local processes."""
    from eggroll_rl.distributed import DistributedError, World
    from eggroll_rl.run import train, train_worker

    if nproc > 1:
        if "RANK" in os.environ:
            raise MissingDependency("--nproc cannot be combined with torchrun; use one or the other")
        from eggroll_rl.launch import run_distributed

        # The launcher forwards INT/TERM/HUP to the workers (their own process group), which stop
        # after the generation and save; a second signal stops them at once.
        try:
            return run_distributed(
                nproc,
                train_worker,
                {
                    "preset": preset,
                    "out": str(root),
                    "resume": resume,
                    "progress": kind,
                    "overwrite": overwrite,
                },
            )
        except DistributedError as exc:
            raise _fail(str(exc).splitlines()[0], 1) from None
    world = World.init_from_env()
    from eggroll_rl.progress import make_progress

    result = train(
        preset,
        root,
        resume=resume,
        overwrite=overwrite,
        progress=make_progress(kind) if world.is_main else None,
    )
    if world.size > 1:
        World.shutdown()
    return result if world.is_main else None


def _report_training(result: Any, env_id: str) -> None:
    r = result.results
    target = r.get("target")
    for note in result.notes:
        _echo(f"warning: {note}")
    verdict = {True: "solved", False: "not solved", None: "no target"}[r.get("solved")]
    against = "" if target is None else f" (target {target:g})"
    how = {
        "target": "reached the target",
        "generations": "used the generation budget",
        "time": "used the time budget",
        "callback": "stopped by the callback",
        "interrupted": "was interrupted",
    }[result.stopped]
    if r.get("stop_eval_mean") is not None:  # scored on fresh episodes, not the stopping ones
        how += f" ({r['stop_eval_mean']:.2f} on the evaluation that stopped it)"
    _echo(
        f"{env_id}: {_score(r)} over {r['episodes']} episodes, {verdict}{against}; "
        f"the run {how} after {result.generations} generations, {result.env_steps:,} env steps, "
        f"{result.seconds:.1f} s"
    )
    if result.saved:
        _echo(f"Saved the agent to {result.directory} (checkpoint: {result.checkpoint})")
    else:
        _echo(f"Kept the agent in {result.directory} as it was; this run is in {result.checkpoint}")
    if result.stopped == "interrupted" or (result.stopped == "target" and r.get("solved") is False):
        _echo(f"Continue with: eggroll-rl train {env_id} --resume" + _out_flag(result.directory))
    else:
        _echo(f"Watch it: eggroll-rl eval {result.directory} --record")


def _score(r: dict[str, Any]) -> str:
    if r.get("mean") is None:
        return f"no finite mean ({r.get('non_finite_episodes')} non-finite returns)"
    return f"{r['mean']:.2f} +/- {r['std']:.2f}"


def _out_flag(directory: Path) -> str:
    root = directory.parent
    return "" if root == _agents_root() else f" --out {root}"


# --------------------------------------------------------------------------------------------
# eval


@app.command("eval")
@_friendly
def eval_(
    agent: Annotated[
        str | None,
        typer.Argument(
            help="An env id (its agent under the agents root) or an agent directory; default: latest."
        ),
    ] = None,
    episodes: Annotated[int, typer.Option(help="Evaluation episodes.", min=1)] = 10,
    seed: Annotated[int, typer.Option(help="Evaluation seed.", min=0)] = 0,
    record: Annotated[bool, typer.Option(help="Record an mp4 of one episode into videos/ENV_ID/.")] = False,
    video_dir: Annotated[
        Path | None, typer.Option(help=f"Where recordings go (default ${VIDEOS_DIR_ENV} or videos).")
    ] = None,
    agents_dir: AgentsDir = None,
) -> None:
    """Evaluate a trained agent: mean +/- std return and solved yes/no; optionally record a video."""
    from eggroll_rl.agents import load_agent, resolve_agent
    from eggroll_rl.presets import check_env_id
    from eggroll_rl.rollout import evaluate
    from eggroll_rl.run import env_target

    roots = [agents_dir] if agents_dir is not None else _read_roots()
    expected = None
    if agent is not None and not Path(agent).is_dir():
        check_env_id(agent)  # unknown id: suggestions; missing dependency: what to install
        expected = agent
    path = resolve_agent(agent, roots)
    loaded = load_agent(path, expected)
    env_id = loaded.env_id
    check_env_id(env_id)
    cap = _agent_cap(loaded.config)
    videos = video_dir if video_dir is not None else Path(os.environ.get(VIDEOS_DIR_ENV) or "videos")
    slug = env_id.replace("/", "__").replace(":", "__")
    if record:
        # Both checked before any work: a recording that cannot happen must not cost an evaluation.
        modes = _render_modes(env_id, loaded.env_kwargs)
        if "rgb_array" not in modes:
            shown = ", ".join(modes) or "none"
            raise _fail(f"--record: {env_id} cannot render rgb_array frames (its render modes: {shown})")
        _check_writable(videos / slug, "--video-dir")
    policy = loaded.build_policy()
    recorded = loaded.config.get("target")  # the run's config; a hand-edited one may hold anything
    numeric = isinstance(recorded, int | float) and not isinstance(recorded, bool)
    target = env_target(env_id, recorded if numeric else None)
    env_kwargs = loaded.env_kwargs
    result = evaluate(
        policy, env_id, episodes=episodes, seed=seed, max_episode_steps=cap, env_kwargs=env_kwargs
    )
    finite = bool(np.isfinite(result.returns).all())
    verdict = "n/a (no target)" if target is None else "yes" if finite and result.mean >= target else "no"
    against = "" if target is None else f" (target {target:g})"
    bad = "" if finite else f" ({int((~np.isfinite(result.returns)).sum())} non-finite returns)"
    print(f"{env_id} ({path}): {result.mean:.2f} +/- {result.std:.2f} over {result.episodes} episodes{bad}")
    print(f"solved: {verdict}{against}")
    if record:
        from eggroll_rl.video import RenderBackendError, record_episode

        def record_to(directory: Path) -> Any:
            path = directory / f"{slug}-seed{seed}.mp4"
            return record_episode(policy, env_id, path, seed=seed, max_steps=cap, env_kwargs=env_kwargs)

        try:
            video = _record_or_fallback(record_to, videos / slug)
        except RenderBackendError as exc:
            raise _fail(str(exc)) from None
        print(f"recorded {video.frames} frames (return {video.episode_return:.2f}) to {video.path}")


def _record_or_fallback(record_to: Callable[[Path], Any], directory: Path) -> Any:
    """Record into ``directory``; when writing there fails (e.g. disk full), into a temporary one."""
    import tempfile

    try:
        return record_to(directory)
    except OSError as exc:  # the directory was checked writable, yet the write failed
        fallback = Path(tempfile.mkdtemp(prefix="eggroll-rl-video-"))
        reason = exc.strerror or type(exc).__name__
        print(f"warning: could not write the video to {directory} ({reason}); recording into {fallback}")
    try:
        return record_to(fallback)
    except OSError as exc:
        raise _fail(f"--record: could not write the video ({exc.strerror or exc})", 1) from None


def _agent_cap(config: dict[str, Any]) -> int | None:
    """Return the episode cap an agent was trained with (None: the env's own)."""
    rollout = config.get("rollout")
    cap = rollout.get("max_episode_steps") if isinstance(rollout, dict) else None
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1 else None


def _render_modes(env_id: str, env_kwargs: dict[str, Any]) -> list[str]:
    """Return the render modes ``env_id`` declares (made with ``env_kwargs`` when only an env says)."""
    from eggroll_rl.presets import split_env_id

    entry = gym.spec(split_env_id(env_id)).entry_point
    try:
        cls = gym.envs.registration.load_env_creator(entry) if isinstance(entry, str) else entry
    except Exception:
        return []
    metadata = getattr(cls, "metadata", None)
    if not isinstance(metadata, dict):  # a factory function: make the env to ask it
        env = gym.make(env_id, **env_kwargs)
        try:
            metadata = env.metadata
        finally:
            env.close()
    return list(metadata.get("render_modes") or [])


# --------------------------------------------------------------------------------------------
# envs


@app.command()
@_friendly
def envs(
    agents_dir: AgentsDir = None,
) -> None:
    """List the presets: env id, tuned, target, measured cost to solve, the shipped agent's score."""
    from rich.console import Console
    from rich.table import Table

    from eggroll_rl.agents import RESULTS_FILE, agent_dir
    from eggroll_rl.presets import list_presets
    from eggroll_rl.run import resolve_target

    roots = [agents_dir] if agents_dir is not None else _read_roots()
    root = roots[-1]  # the shipped agents (or the one configured root)
    table = Table(title="eggroll-rl presets (envs/)")
    for name, justify in (
        ("env id", "left"),
        ("tuned", "center"),
        ("target", "right"),
        ("measured to solve", "right"),
        ("shipped agent", "right"),
        ("reference", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for preset in list_presets():
        target = resolve_target(preset)
        table.add_row(
            preset.env_id,
            "yes" if preset.tuned else "no",
            "-" if target is None else f"{target:g}",
            _measured_cell(preset.measured),
            _shipped_score(agent_dir(preset.env_id, root) / RESULTS_FILE, preset.env_id),
            preset.reference or "-",
        )
    Console().print(table)


def _measured_cell(m: Measured) -> str:
    """Say what solving cost (seconds, env steps, solved/measured seeds); no cost when no seed solved."""
    seeds = f"{m.solved_seeds or 0}/{m.seeds} seeds" if m.seeds else ""
    if m.seeds and not m.solved_seeds:
        return f"not solved ({seeds})"
    parts = []
    if m.seconds is not None:
        parts.append(f"{m.seconds:.1f} s")
    if m.env_steps is not None:
        parts.append(f"{m.env_steps:,} steps")
    if not parts:
        return "-"
    return ", ".join([*parts, seeds] if seeds else parts)


def _shipped_score(path: Path, env_id: str) -> str:
    if not path.is_file():
        return "-"
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
        if r.get("env_id", env_id) != env_id:
            return "wrong env"
        if r.get("mean") is None:
            return f"no finite mean ({r['episodes']} ep.)"
        solved = {True: " solved", False: " not solved"}.get(r.get("solved"), "")
        return f"{r['mean']:.1f} +/- {r['std']:.1f} ({r['episodes']} ep.){solved}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable"


# --------------------------------------------------------------------------------------------
# plot


@app.command()
@_friendly
def plot(
    agents: Annotated[
        list[str], typer.Argument(help="Agent directories (or env ids under the agents root).")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="PNG to write (default plots/NAME.png).")
    ] = None,
    agents_dir: AgentsDir = None,
) -> None:
    """Plot learning curves (fitness and eval return vs env steps and wall time) to a PNG."""
    from eggroll_rl.agents import load_agent, resolve_agent
    from eggroll_rl.plotting import plot_learning_curves

    roots = [agents_dir] if agents_dir is not None else _read_roots()
    loaded = []
    for a in agents:
        # An env id must find an agent of that env, not just a directory of that name.
        loaded.append(load_agent(resolve_agent(a, roots), None if Path(a).is_dir() else a))
    empty = [str(agent.directory) for agent in loaded if not agent.history().get("generation")]
    if empty:
        raise AgentError(f"{', '.join(empty)}: no history.csv rows to plot")
    if output is None:
        name = loaded[0].env_id.replace("/", "__").replace(":", "__") if len(loaded) == 1 else "comparison"
        output = Path("plots") / f"{name}.png"
    _check_writable(output.parent, "--output")
    try:
        path = plot_learning_curves(loaded, output)
    except ImportError:
        raise MissingDependency(
            "plot needs matplotlib, which is not installed: pip install 'eggroll-rl[plot]'"
        ) from None
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# entry point


def main(argv: list[str] | None = None) -> None:
    """Run the command line (``eggroll-rl``); exit 2 with one line on any usage error.

    No arguments print the help (exit 0). SIGTERM and SIGHUP outside a training loop end the
    command like Ctrl-C (exit 143, 129); inside one they stop it after the generation.
    """
    import signal

    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        app(args=["--help"], prog_name="eggroll-rl", standalone_mode=False)
        raise SystemExit(0)
    import warnings

    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
                previous[sig] = signal.signal(sig, _interrupt)
    try:
        return _main(args)
    finally:
        warnings.showwarning = shown
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _one_line_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    if _is_main_process():
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    from eggroll_rl.run import SignalInterrupt

    raise SignalInterrupt(signum)


def _main(argv: list[str]) -> None:
    try:
        code = app(args=argv, prog_name="eggroll-rl", standalone_mode=False)
    except UsageError as exc:
        hint = f" (see eggroll-rl {exc.ctx.info_name} --help)" if exc.ctx and exc.ctx.parent else ""
        if exc.ctx is not None and not exc.ctx.parent:
            hint = " (see eggroll-rl --help)"
        raise SystemExit(_fail(exc.format_message() + hint).exit_code) from None
    except typer.Abort:
        print("aborted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        print("interrupted", file=sys.stderr)
        raise SystemExit(128 + getattr(exc, "signum", EXIT_INTERRUPTED - 128)) from None
    raise SystemExit(code if isinstance(code, int) else 0)
