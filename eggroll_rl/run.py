"""One training run from a preset: train, evaluate, stop at the target, checkpoint, resume, save.

This is what ``eggroll-rl train`` runs, as a library function the CLI, benchmarks and scripts share::

    from eggroll_rl.presets import load_preset
    from eggroll_rl.run import train

    result = train(load_preset("CartPole-v1"), out="runs")  # -> runs/CartPole-v1 (or _2, _3, ...)
    print(result.results["mean"], result.directory)

A run steps the trainer generation by generation. Every ``eval.every`` generations it evaluates
the center policy on fresh episodes (seeds derived from the run seed and the generation, under
the run's one episode cap: ``rollout.max_episode_steps``, else the env's limit; training
episodes alone may be capped shorter by ``rollout.train_max_episode_steps``, in the first
``rollout.train_cap_generations`` generations only when that is set) and stops once the
mean reaches the target (the preset's, else the env spec's ``reward_threshold``). Every
``run.checkpoint_every`` generations, and whenever it stops, it writes a checkpoint (the full
trainer state plus the run's own rows) into the agent directory; ``resume=True`` continues from
it exactly: the resumed run's parameters and history equal an uninterrupted run's. At the end it
evaluates the center once more (unless the last periodic evaluation was of this very center) and
writes the agent atomically. A run stopped by its target is always scored on fresh episodes: the
stopping evaluation, the first of many tries to pass, overstates the center's mean (selection
bias) and is kept beside the score (``stop_eval_mean``) -- so a run may stop on its target yet
report "not solved". With ``eval.confirm`` a center that passes is evaluated once more on fresh
episodes and the run stops only when that confirmation passes too (``confirm_eval_mean``); else
training goes on. The agent's score is then a third set of episodes, which decided nothing.

Ctrl-C (SIGINT), SIGTERM or SIGHUP asks the run to stop after the current generation (said at
once on stderr): it then checkpoints, evaluates and saves like any other stop, except that it
never replaces an agent already in its directory. A second signal aborts at once, keeping the
last checkpoint. A ``KeyboardInterrupt`` raised between generations (e.g. by ``callback``)
counts as the first kind.

Under ``torch.distributed`` (``--nproc``, torchrun) every rank runs this same function. The
evaluations share their episodes over the ranks (:func:`~eggroll_rl.rollout.evaluate` with the
trainer's world: bit-identical to one process, the same result on every rank); rank 0 alone
prints and writes, and its stop decision (target, time budget, Ctrl-C) is broadcast so all ranks
stop together.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from eggroll_rl.agents import (
    POLICY_FILE,
    AgentError,
    CheckpointError,
    checkpoint_path,
    latest_checkpoint_dir,
    load_checkpoint,
    make_results,
    run_directory,
    save_agent,
    save_checkpoint,
)
from eggroll_rl.core import NonFiniteFitnessError
from eggroll_rl.presets import Preset, apply_overrides

__all__ = [
    "RESUMABLE_KEYS",
    "TIMING_COLUMNS",
    "Progress",
    "RunError",
    "RunInfo",
    "RunInterrupted",
    "RunResult",
    "StopRequest",
    "build_trainer",
    "check_episode_caps",
    "env_target",
    "evaluation_due",
    "resolve_device",
    "resolve_target",
    "resume_preset",
    "train",
    "train_worker",
]

# Keys a resumed run may change: budgets and bookkeeping. Anything else would make the resumed run
# differ from the one the checkpoint belongs to.
RESUMABLE_KEYS = frozenset(
    {
        "trainer.generations",
        "run.max_seconds",
        "run.checkpoint_every",
        "run.device",
        "eval.stop_on_target",
        "eval.stop_margin_se",
        "eval.confirm",
    }
)
# History columns that measure this machine's speed, not the run's state; they legitimately
# differ between a resumed and an uninterrupted run.
TIMING_COLUMNS = ("time", "generation_seconds", "steps_per_second")
_EVAL_SEED_DOMAIN = 0x0E7A1
_SCREEN_SEED_DOMAIN = 0x5C2EE  # screen episodes: fresh seeds, never the evaluation's own
_REPORT_SEED_DOMAIN = 0x2E907  # the agent's score after a target stop: episodes that decided nothing
_CONFIRM_SEED_DOMAIN = 0xC0F13  # the second evaluation a target stop needs with eval.confirm


class RunError(ValueError):
    """A run that cannot start or continue as asked; the message is one readable line."""


class RunInterrupted(KeyboardInterrupt):
    """A second Ctrl-C stopped the run mid-generation; nothing new was saved."""

    signum: int = signal.SIGINT


@dataclass(frozen=True)
class RunInfo:
    """What a progress display needs to know when the run starts."""

    env_id: str
    algorithm: str
    population: int
    generations: int  # the budget
    start_generation: int  # > 0 when resumed
    target: float | None
    device: str
    world_size: int
    directory: Path
    max_seconds: float | None


@dataclass
class RunResult:
    """How a run ended and where it wrote its agent."""

    directory: Path
    checkpoint: Path
    results: dict[str, Any]
    stopped: str  # "target", "generations", "time", "callback" or "interrupted"
    generations: int
    env_steps: int
    seconds: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    saved: bool = True  # False: an interrupted run left the agent already in ``directory`` as it was
    signum: int | None = None  # the signal that interrupted the run
    notes: list[str] = field(default_factory=list)  # where files went when the intended place failed


class Progress(Protocol):
    """Receives the run's events on rank 0 (see ``eggroll_rl.progress`` for the displays)."""

    def start(self, info: RunInfo) -> None:
        """Begin displaying a run."""

    def update(self, row: Mapping[str, Any]) -> None:
        """Show one finished generation (``eval_mean`` is set on evaluation generations)."""

    def message(self, text: str) -> None:
        """Show one line of text."""

    def close(self) -> None:
        """Finish the display."""


# --------------------------------------------------------------------------------------------
# Building


def resolve_target(preset: Preset) -> float | None:
    """Return the preset's target, else the env spec's reward_threshold (None: no target)."""
    return env_target(preset.env_id, preset.target)


def env_target(env_id: str, target: float | None = None) -> float | None:
    """Return ``target`` when given, else ``env_id``'s spec reward_threshold (None: no target)."""
    if target is not None:
        return float(target)
    import gymnasium as gym

    try:
        threshold = gym.spec(env_id).reward_threshold
    except gym.error.Error:
        return None
    return None if threshold is None else float(threshold)


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda`` into a device; raise RunError when CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(name)


def _schedule(value: float, decay: float) -> float | Callable[[int], float]:
    # A plain float keeps the trainer's constant fast path when there is no decay.
    return value if decay == 1.0 else (lambda g: value * decay**g)


def _fitness_shaping(t: Any) -> Any:
    """Return the trainer's ``fitness_shaping``: the named shaper, or ARS top-b around it."""
    if not t.top_directions:
        return t.fitness_shaping
    from eggroll_rl.shaping import top_directions

    return top_directions(t.top_directions, t.fitness_shaping)


def check_episode_caps(preset: Preset) -> None:
    """Raise RunError unless ``rollout.train_max_episode_steps`` is at most the run's episode cap.

    The run's cap is ``rollout.max_episode_steps``, else the env's registered limit (else
    :data:`~eggroll_rl.rollout.DEFAULT_MAX_EPISODE_STEPS`); an id gymnasium does not know
    (an envpool-only task) is not checked here.
    """
    r = preset.rollout
    if r.train_max_episode_steps is None:
        return
    from eggroll_rl.rollout import _find_spec, episode_cap

    if r.max_episode_steps is None:
        try:
            spec = _find_spec(preset.env_id)
        except ValueError:
            return
        cap = spec.max_episode_steps
        where = "the env's registered limit"
        if cap is None:
            cap = episode_cap(spec)
            where = "the default cap of an env registered without one"
    else:
        cap, where = r.max_episode_steps, "rollout.max_episode_steps"
    if r.train_max_episode_steps > cap:
        raise RunError(
            f"rollout.train_max_episode_steps: must be <= the run's episode cap {cap} ({where}), "
            f"got {r.train_max_episode_steps}"
        )


def env_spaces(preset: Preset) -> tuple[Any, Any]:
    """Return the observation and action spaces of ``gym.make(env_id, **env_kwargs)``.

    Raises RunError naming ``env_kwargs`` when the env does not take them.
    """
    import gymnasium as gym

    try:
        probe = gym.make(preset.env_id, **preset.env_kwargs)
    except TypeError as exc:
        if not preset.env_kwargs:
            raise
        reason = str(exc).split(" was raised from")[0]
        raise RunError(
            f"env_kwargs: {preset.env_id} does not take {dict(preset.env_kwargs)} ({reason})"
        ) from None
    try:
        return probe.observation_space, probe.action_space
    finally:
        probe.close()


def build_trainer(preset: Preset, device: torch.device | str = "cpu") -> Any:
    """Build the policy, the rollout fitness and the trainer a preset describes; return the trainer."""

    from eggroll_rl.core import EGGROLLTrainer, VanillaESTrainer
    from eggroll_rl.policies import make_policy
    from eggroll_rl.rollout import RolloutFitness

    t, r, pol = preset.trainer, preset.rollout, preset.policy
    obs_space, act_space = env_spaces(preset)
    # Seed the initial weights from the run seed so a run is reproducible from its config alone.
    torch.manual_seed(t.seed)
    policy = make_policy(obs_space, act_space, **dataclasses.asdict(pol)).to(device)
    check_episode_caps(preset)
    short, curriculum = r.train_max_episode_steps, r.train_cap_generations
    fitness = RolloutFitness(
        preset.env_id,
        episodes_per_member=r.episodes_per_member,
        # Training episodes only; every evaluation keeps the run's cap (_evaluate_center).
        max_episode_steps=r.max_episode_steps if curriculum or short is None else short,
        horizon=(lambda g: short if g < curriculum else None) if curriculum else None,
        seed=t.seed,
        backend=r.backend,
        obs_norm=pol.normalize_obs,
        obs_norm_fraction=r.obs_norm_fraction,
        reward_shift=r.reward_shift,
        crn=r.crn,
        env_kwargs=preset.env_kwargs,
    )
    common = dict(
        learning_rate=_schedule(t.lr, t.lr_decay),
        sigma=_schedule(t.sigma, t.sigma_decay),
        noise_reuse=t.noise_reuse,
        group_size=t.group_size,
        fitness_shaping=_fitness_shaping(t),
        seed=t.seed,
        optimizer=t.optimizer,
        optimizer_kwargs={"weight_decay": t.weight_decay} if t.weight_decay else None,
        device=device,
    )
    if t.algorithm == "vanilla":
        return VanillaESTrainer(policy, fitness, t.population, **common)
    return EGGROLLTrainer(
        policy, fitness, t.population, rank=t.rank, freeze_nonlora=t.freeze_nonlora, **common
    )


# --------------------------------------------------------------------------------------------
# Resume


def resume_preset(
    env_id: str,
    out: str | Path,
    overrides: Mapping[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> Preset:
    """Return the preset of the checkpointed run for ``env_id`` under ``out``, with budget overrides.

    Only :data:`RESUMABLE_KEYS` may change; anything else raises RunError naming the key.
    """
    path = checkpoint_path(_resume_directory(env_id, out))
    state = load_checkpoint(path)
    config = state.get("run", {}).get("config") if isinstance(state.get("run"), dict) else None
    if not isinstance(config, dict):
        raise AgentError(f"{path}: checkpoint holds no run config; it was not written by `eggroll-rl train`")
    if config.get("env_id") != env_id:
        raise AgentError(f"{path}: checkpoint is for {config.get('env_id')}, not {env_id}")
    base = Preset.from_dict(config, origin=str(path))
    source = config.get("preset")
    base = dataclasses.replace(
        base,
        source=Path(source) if isinstance(source, str) else None,
        overridden=tuple(config.get("overrides") or ()),
    )
    preset = base
    if overrides:
        preset = apply_overrides(preset, overrides)
    if sets:
        preset = apply_overrides(preset, list(sets))
    old, new = base.flat(), preset.flat()
    changed = [k for k in new if k in old and new[k] != old[k] and not k.startswith("measured.")]
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        raise RunError(
            f"--resume continues the checkpointed run, so {', '.join(refused)} cannot change "
            f"(may change: {', '.join(sorted(RESUMABLE_KEYS))})"
        )
    return preset


def _resume_directory(env_id: str, out: str | Path) -> Path:
    """Return the run directory of ``env_id`` under ``out`` whose checkpoint ``--resume`` continues."""
    found = latest_checkpoint_dir(env_id, out)
    if found is None:
        raise CheckpointError(f"no checkpoint for {env_id} under {out}/ to resume (train without --resume)")
    return found


# --------------------------------------------------------------------------------------------
# The run

# The signals that stop a run after the current generation (the launcher forwards the same ones).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


class StopRequest:
    """First SIGINT/SIGTERM/SIGHUP: stop after this generation (said at once); a second: abort.

    ``signum`` is the first signal received (None: none), so a caller can exit with 128 + it.
    """

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be installed from the main thread; elsewhere Ctrl-C stays a
        # plain KeyboardInterrupt, which the loop still handles between generations.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise SignalInterrupt(signum)
        self.requested = True
        self.signum = signum
        if self.announce and _is_main_process():
            import os

            name = signal.Signals(signum).name
            again = "Ctrl-C" if signum == signal.SIGINT else f"another {name}"
            # os.write, not print: a signal handler must not re-enter a buffered stream.
            os.write(
                2,
                f"\n{name}: stopping after the current generation, then saving "
                f"({again} aborts at once)\n".encode(),
            )

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class SignalInterrupt(KeyboardInterrupt):
    """A stop signal that must take effect at once; ``signum`` says which (exit 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def evaluation_due(preset: Preset, generation: int, mean_fitness: float) -> bool:
    """Whether the center is evaluated after ``generation``: every ``eval.every``, or when promising."""
    return _periodic(preset, generation) or _promising(preset, mean_fitness)


def _periodic(preset: Preset, generation: int) -> bool:
    every = preset.eval.every
    return bool(every and generation % every == 0)


def _promising(preset: Preset, mean_fitness: float) -> bool:
    return preset.eval.from_fitness is not None and mean_fitness >= preset.eval.from_fitness


def clears_target(mean: float, std: float, preset: Preset, target: float) -> bool:
    """Whether an evaluation (mean, std of its returns) clears the target by ``eval.stop_margin_se``.

    The margin is in standard errors of a full evaluation, ``std / sqrt(eval.episodes)``: the
    lower confidence bound ``mean - stop_margin_se * std / sqrt(eval.episodes)`` must reach the
    target. A screen applies the same bar with its own std, so it passes only centers that the
    full evaluation could stop on.
    """
    if not preset.eval.stop_margin_se:
        return bool(mean >= target)  # the mean alone, whatever the std (NaN with non-finite returns)
    margin = preset.eval.stop_margin_se * std / math.sqrt(preset.eval.episodes)
    return bool(mean - margin >= target)


def _stops(result: Any, preset: Preset, target: float | None) -> bool:
    """Whether an evaluation stops the run (before any confirmation): it clears an active target."""
    return (
        result is not None
        and target is not None
        and preset.eval.stop_on_target
        and clears_target(result.mean, result.std, preset, target)
    )


def _screen_passes(trainer: Any, preset: Preset, target: float | None) -> tuple[bool, int]:
    """Play ``eval.screen_episodes`` fresh episodes; return (their mean clears the target, steps)."""
    if not preset.eval.screen_episodes or target is None:
        return True, 0
    seed = _episodes_seed(_SCREEN_SEED_DOMAIN, preset.trainer.seed, trainer.generation)
    screen = _evaluate_center(trainer, preset, episodes=preset.eval.screen_episodes, seed=seed)
    return clears_target(screen.mean, screen.std, preset, target), int(screen.lengths.sum())


def _episodes_seed(domain: int, seed: int, generation: int) -> int:
    """Return the episode seed of ``domain`` (evaluation, screen, confirmation, report) at ``generation``."""
    from eggroll_rl.rollout import derive_seed

    return derive_seed(domain, seed, generation)


def _evaluate_center(
    trainer: Any, preset: Preset, *, episodes: int | None = None, seed: int | None = None
) -> Any:
    from eggroll_rl.rollout import evaluate

    if seed is None:
        seed = _episodes_seed(_EVAL_SEED_DOMAIN, preset.trainer.seed, trainer.generation)
    policy = trainer.get_center_model()
    policy.eval()
    # The run's one episode cap (rollout.max_episode_steps, else the env's own limit), never the
    # training-only rollout.train_max_episode_steps; the episodes are shared over the ranks.
    return evaluate(
        policy,
        preset.env_id,
        episodes=preset.eval.episodes if episodes is None else episodes,
        seed=seed,
        max_episode_steps=preset.rollout.max_episode_steps,
        backend=preset.rollout.backend,
        env_kwargs=preset.env_kwargs,
        world=trainer.world,
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def train(
    preset: Preset,
    out: str | Path = "runs",
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
) -> RunResult:
    """Run training as ``preset`` describes and save the agent under ``out``; return how it ended.

    The agent goes to ``out/ENV_ID`` when that is free, else to the first free ``out/ENV_ID_N``
    (:func:`~eggroll_rl.agents.run_directory`), so no earlier agent or checkpoint is replaced;
    ``overwrite=True`` replaces ``out/ENV_ID`` once the run finishes. ``resume`` continues the
    newest checkpoint of this env under ``out`` in its own directory (the preset must match it;
    see :func:`resume_preset`). An interrupted run saves its checkpoint but never replaces an
    agent already in its directory. The destination is checked writable before any work
    (RunError); if writing fails at the end, the files go to a temporary directory instead and
    ``RunResult.notes`` says where. ``callback(row)`` runs after every generation (on every rank);
    returning True stops the run. Raises :class:`RunInterrupted` on a second Ctrl-C.
    """
    from eggroll_rl.distributed import World

    preset = preset.validate()
    world0 = World.current()
    directory = world0.on_main(_prepare_directory, preset.env_id, out, resume, overwrite)
    if world0.size > 1:
        directory = world0.broadcast_object(directory)
    assert directory is not None
    ckpt_file = checkpoint_path(directory)
    device = resolve_device(preset.run.device)
    target = resolve_target(preset)
    trainer = build_trainer(preset, device)
    world: World = trainer.world
    say: Callable[[str], None] = progress.message if (progress is not None and world.is_main) else _quiet
    notes: list[str] = []

    rows: list[dict[str, Any]] = []
    elapsed_before = 0.0
    eval_steps = 0
    if resume:
        state = load_checkpoint(ckpt_file, map_location="cpu")
        run_state = state.get("run", {})
        try:
            trainer.load_state_dict(state["trainer"])
        except (KeyError, ValueError) as exc:
            raise AgentError(f"{ckpt_file}: does not match this run's configuration ({exc})") from None
        rows = [dict(r) for r in run_state.get("rows", [])]
        elapsed_before = float(run_state.get("elapsed", 0.0))
        eval_steps = int(run_state.get("eval_env_steps", 0))
    elif ckpt_file.exists():
        say(f"note: starting afresh; {ckpt_file} will be replaced (--overwrite)")

    budget = preset.trainer.generations
    if trainer.generation >= budget:
        raise RunError(
            f"the checkpoint is already at generation {trainer.generation} of a {budget}-generation "
            "budget; pass a larger --generations to continue"
        )
    config = preset.to_config()
    fitness = trainer.fitness_fn
    ckpt_every = preset.run.checkpoint_every
    max_seconds = preset.run.max_seconds

    def checkpoint() -> None:
        nonlocal ckpt_file
        state = {
            "trainer": trainer.state_dict(),
            "run": {
                "config": config,
                "rows": rows,
                "elapsed": elapsed,
                "eval_env_steps": eval_steps,
                "world_size": world.size,
            },
        }
        ckpt_file = _write_or_fallback(
            lambda path: save_checkpoint(path, state), ckpt_file, directory, notes, say
        )

    if progress is not None and world.is_main:
        progress.start(
            RunInfo(
                env_id=preset.env_id,
                algorithm=preset.trainer.algorithm,
                population=preset.trainer.population,
                generations=budget,
                start_generation=trainer.generation,
                target=target,
                device=str(device),
                world_size=world.size,
                directory=directory,
                max_seconds=max_seconds,
            )
        )

    last_eval: tuple[int, Any] | None = None  # (generation, EvalResult) of the latest evaluation
    confirmed: tuple[float, float] | None = None  # (mean, std) of the confirmation a target stop passed
    stopped = "generations"
    elapsed = elapsed_before
    t_start = time.perf_counter()
    try:
        with StopRequest() as stop:
            # False from the start of a generation until its row is recorded: an exception in
            # between leaves trainer and rows out of step, so nothing may be saved from them.
            consistent = True
            try:
                while trainer.generation < budget:
                    consistent = False
                    try:
                        stats = trainer.step()
                    except NonFiniteFitnessError as exc:
                        last = _checkpoint_generation(ckpt_file)
                        kept = "no checkpoint yet" if last is None else f"checkpoint at gen {last} kept"
                        raise RunError(
                            f"{exc}: does the env return NaN/inf rewards? Nothing saved from this "
                            f"generation ({kept}; no agent written)"
                        ) from None
                    gen = trainer.generation
                    elapsed = elapsed_before + time.perf_counter() - t_start
                    steps = int(getattr(fitness, "total_env_steps", 0))
                    row: dict[str, Any] = {
                        "generation": gen,
                        "env_steps": steps,
                        "time": elapsed,
                        "mean_fitness": stats["mean_fitness"],
                        "best_fitness": stats["fitness"],
                        "best_ever": stats["best_fitness"],
                        "std_fitness": stats["std_fitness"],
                        "sigma": stats["sigma"],
                        "learning_rate": stats["learning_rate"],
                        "episode_length": stats.get("episode_length_mean"),
                        "generation_seconds": stats["time"],
                        "steps_per_second": stats.get("env_steps", 0.0) / max(stats["time"], 1e-9),
                        "nonfinite_fitness": stats.get("nonfinite_fitness", 0.0),
                        "obs_nonfinite": stats.get("obs_nonfinite"),
                        "eval_mean": None,
                        "eval_std": None,
                    }

                    # Every rank evaluates its share of the episodes (the same result on all).
                    result = None
                    if _periodic(preset, gen):
                        result = _evaluate_center(trainer, preset)
                    elif _promising(preset, stats["mean_fitness"]):
                        # A promising generation: a few fresh episodes first, the full
                        # evaluation only when they reach the target (eval.screen_episodes).
                        passed, screened = _screen_passes(trainer, preset, target)
                        eval_steps += screened
                        if passed:
                            result = _evaluate_center(trainer, preset)
                    if result is not None:
                        last_eval = (gen, result)
                    stops = _stops(result, preset, target)
                    if stops and preset.eval.confirm:
                        # Every rank plays its share, as for the evaluation itself.
                        confirm_seed = _episodes_seed(_CONFIRM_SEED_DOMAIN, preset.trainer.seed, gen)
                        confirmation = _evaluate_center(trainer, preset, seed=confirm_seed)
                        eval_steps += int(confirmation.lengths.sum())
                        stops = clears_target(confirmation.mean, confirmation.std, preset, target)
                        if stops:
                            confirmed = (confirmation.mean, confirmation.std)
                        else:
                            say(
                                f"gen {gen}: the evaluation cleared the target ({result.mean:.2f}), its "
                                f"confirmation on fresh episodes did not ({confirmation.mean:.2f} +/- "
                                f"{confirmation.std:.2f}); training on"
                            )

                    def decide(result: Any = result, stops: bool = stops) -> dict[str, Any]:
                        decision: dict[str, Any] = {"stop": "target" if stops else None}
                        if result is not None:
                            decision["eval"] = (result.mean, result.std, int(result.lengths.sum()))
                        now = elapsed_before + time.perf_counter() - t_start
                        if decision["stop"] is None and max_seconds is not None and now >= max_seconds:
                            decision["stop"] = "time"
                        if decision["stop"] is None and stop.requested:
                            decision["stop"] = "interrupted"
                        return decision

                    # Rank 0 decides (its clock and Ctrl-C count), so every rank stops at the
                    # same generation.
                    decision = world.on_main(decide)
                    if world.size > 1:
                        decision = world.broadcast_object(decision)
                    if "eval" in decision:
                        row["eval_mean"], row["eval_std"], n = decision["eval"]
                        eval_steps += n
                    elapsed = elapsed_before + time.perf_counter() - t_start
                    rows.append(row)
                    consistent = True
                    if world.is_main and progress is not None:
                        progress.update(row)
                    if callback is not None and callback(dict(row)) is True and decision["stop"] is None:
                        decision["stop"] = "callback"
                    if decision["stop"] is not None:
                        stopped = decision["stop"]
                        break
                    if ckpt_every and gen % ckpt_every == 0:
                        world.on_main(checkpoint)
            except KeyboardInterrupt:
                if not consistent:
                    # Mid-generation the trainer may be half-updated: keep the last checkpoint.
                    raise
                stopped = "interrupted"
            # The final saves run with Ctrl-C still deferred, so they are never cut in half.
            world.on_main(checkpoint)
            if stopped == "interrupted":
                say(f"Interrupted at generation {trainer.generation}: checkpoint saved to {ckpt_file}")
            final_eval = (
                last_eval[1] if last_eval is not None and last_eval[0] == trainer.generation else None
            )
            eval_seed = _episodes_seed(_EVAL_SEED_DOMAIN, preset.trainer.seed, trainer.generation)
            stop_eval = None
            if stopped == "target":
                # The stopping evaluation is the first of many tries to pass: chosen for passing,
                # its mean overstates the center's. The agent is scored on fresh episodes instead.
                stop_eval, final_eval = final_eval, None
                eval_seed = _episodes_seed(_REPORT_SEED_DOMAIN, preset.trainer.seed, trainer.generation)
                confirm = "" if confirmed is None else f"; confirmed: {confirmed[0]:.2f} on fresh episodes"
                say(
                    f"Target reached ({stop_eval.mean:.2f}{confirm}); scoring the agent on "
                    f"{preset.eval.episodes} fresh episodes..."
                )
            elif final_eval is None:
                say(f"Evaluating the final policy on {preset.eval.episodes} episodes...")
            if final_eval is None:
                final_eval = _evaluate_center(trainer, preset, seed=eval_seed)  # ranks share it
                eval_steps += int(final_eval.lengths.sum())
            results = world.on_main(
                _finish,
                trainer,
                preset,
                rows,
                final_eval,
                target,
                elapsed,
                eval_steps,
                stopped,
                directory,
                say,
                notes,
                eval_seed,
                stop_eval,
                confirmed,
            )
    except KeyboardInterrupt as exc:
        last = _checkpoint_generation(ckpt_file)
        where = f"the checkpoint at generation {last} is intact" if last is not None else "no checkpoint yet"
        error = RunInterrupted(f"interrupted mid-generation: stopped without saving; {where}")
        error.signum = getattr(exc, "signum", signal.SIGINT)
        raise error from None
    finally:
        close = getattr(fitness, "close", None)
        if close is not None:
            close()
        if progress is not None and world.is_main:
            progress.close()
    final = results or {}
    return RunResult(
        directory=Path(final.pop("_directory", directory)),
        checkpoint=ckpt_file,
        results=final,
        stopped=stopped,
        generations=trainer.generation,
        env_steps=int(getattr(fitness, "total_env_steps", 0)),
        seconds=elapsed,
        rows=rows,
        saved=bool(final.pop("_saved", True)),
        signum=stop.signum if stopped == "interrupted" else None,
        notes=notes,
    )


def _quiet(text: str) -> None:
    pass


def _prepare_directory(env_id: str, out: str | Path, resume: bool, overwrite: bool) -> Path:
    """Pick the run's directory and check, before any work, that files can be written there."""
    from eggroll_rl.atomic import check_writable_dir

    directory = _resume_directory(env_id, out) if resume else run_directory(env_id, out, overwrite=overwrite)
    try:
        check_writable_dir(directory)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RunError(f"--out {out}: cannot write the agent to {directory} ({reason})") from None
    return directory


def _write_or_fallback(
    write: Callable[[Path], Any],
    path: Path,
    directory: Path,
    notes: list[str],
    say: Callable[[str], None],
) -> Path:
    """Write ``path`` with ``write``; when that fails, write it to a temporary directory instead.

    Returns where it went; the detour is appended to ``notes`` (and said) as one line.
    """
    import tempfile

    try:
        write(path)
        return path
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix=f"eggroll-rl-{directory.name}-")) / path.name
        write(fallback)
        line = (
            f"could not write {path} ({exc.strerror or type(exc).__name__}); saved it to {fallback} instead"
        )
        notes.append(line)
        say(line)
        return fallback


def _checkpoint_generation(path: Path) -> int | None:
    try:
        return int(load_checkpoint(path)["trainer"]["generation"])
    except (AgentError, KeyError, TypeError, ValueError):
        return None


def _finish(
    trainer: Any,
    preset: Preset,
    rows: list[dict[str, Any]],
    result: Any,
    target: float | None,
    elapsed: float,
    eval_steps: int,
    stopped: str,
    directory: Path,
    say: Callable[[str], None],
    notes: list[str],
    eval_seed: int,
    stop_eval: Any = None,
    confirmed: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Write the agent with the final center's evaluation ``result``; return its results.

    ``result`` was played from ``eval_seed``; ``stop_eval`` is the evaluation that stopped the run
    on its target (recorded beside, not as, the agent's score), ``confirmed`` the (mean, std) of
    the confirmation it passed (``eval.confirm``). ``eval_steps`` already counts
    ``result``'s episodes. An interrupted run leaves an agent already in ``directory`` as it was.
    When the agent cannot be written to ``directory`` it goes to a temporary directory (said in
    ``notes``).
    """
    gen = trainer.generation
    # The final evaluation goes into the agent's history only, not the checkpoint's rows: a run
    # resumed from here must record exactly what an uninterrupted run records.
    history = [dict(r) for r in rows]
    if history and history[-1]["generation"] == gen:
        history[-1]["eval_mean"], history[-1]["eval_std"] = result.mean, result.std
    results = make_results(
        preset.env_id,
        result.returns.tolist(),
        target=target,
        env_steps=int(getattr(trainer.fitness_fn, "total_env_steps", 0)),
        generations=gen,
        seconds=elapsed,
        seed=preset.trainer.seed,
        stopped=stopped,
        eval_seed=eval_seed,
        eval_length_mean=_finite(result.length_mean),
        eval_env_steps=eval_steps,
        world_size=trainer.world.size,
        device=str(trainer.device),
    )
    if stop_eval is not None:
        results["stop_eval_mean"] = _finite(stop_eval.mean)
        results["stop_eval_std"] = _finite(stop_eval.std)
    if confirmed is not None:
        results["confirm_eval_mean"], results["confirm_eval_std"] = (_finite(v) for v in confirmed)
    if stopped == "interrupted" and (directory / POLICY_FILE).exists():
        say(f"Interrupted: the agent in {directory} is left as it was (the checkpoint holds this run)")
        return {**results, "_saved": False, "_directory": str(directory)}

    def write(dest: Path) -> None:
        save_agent(
            dest,
            policy=trainer.get_center_model(),
            config=preset.to_config(),
            history=history,
            results=results,
        )

    where = _write_or_fallback(write, directory, directory, notes, say)
    return {**results, "_directory": str(where)}


def train_worker(
    preset: Preset,
    out: str,
    resume: bool = False,
    progress: str = "none",
    overwrite: bool = False,
) -> RunResult:
    """Run :func:`train` in a launched process (``--nproc``); ``progress`` names the display."""
    from eggroll_rl.distributed import World

    display = None
    if World.current().is_main:
        from eggroll_rl.progress import make_progress

        display = make_progress(progress)
    return train(preset, out, resume=resume, overwrite=overwrite, progress=display)
