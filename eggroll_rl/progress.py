"""Progress displays for a training run: a rich live bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import IO, Any

from eggroll_rl.run import RunInfo

__all__ = ["LogProgress", "RichProgress", "make_progress"]


def _num(value: float | None, width: int = 0) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:{width}.1f}" if abs(value) < 1e6 else f"{value:{width}.3g}"


def _rate(value: float | None) -> str:
    if not value:
        return "-"
    return (
        f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"
    )


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    return str(timedelta(seconds=round(seconds)))


def _header(info: RunInfo) -> str:
    target = "none" if info.target is None else f"{info.target:g}"
    ranks = f", {info.world_size} processes" if info.world_size > 1 else ""
    resumed = f", resumed at generation {info.start_generation}" if info.start_generation else ""
    return (
        f"Training {info.env_id}: {info.algorithm}, population {info.population}, "
        f"{info.generations} generations, target {target}, {info.device}{ranks}{resumed}"
    )


class LogProgress:
    """Plain log lines (no terminal control codes): for pipes, files, CI and ``--no-progress``."""

    def __init__(self, stream: IO[str] | None = None, lines: int = 30) -> None:
        self.stream = stream
        self.lines = lines
        self.info: RunInfo | None = None
        self.every = 1
        self.last_eval: float | None = None
        self._t0 = time.perf_counter()
        self._gen0 = 0

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def start(self, info: RunInfo) -> None:
        """Print the run's header and pick how often to log (about ``lines`` lines per run)."""
        self.info = info
        self._gen0 = info.start_generation
        self._t0 = time.perf_counter()
        self.every = max(1, (info.generations - info.start_generation) // self.lines)
        self._print(_header(info))

    def update(self, row: Mapping[str, Any]) -> None:
        """Log a generation: every ``every``-th one, evaluations, and the last."""
        gen = int(row["generation"])
        evaluated = row.get("eval_mean") is not None
        if evaluated:
            self.last_eval = row["eval_mean"]
        total = self.info.generations if self.info else gen
        if not (evaluated or gen % self.every == 0 or gen >= total):
            return
        eta = _eta(self._t0, gen - self._gen0, total - gen)
        evaluation = f" | eval {_num(row['eval_mean'])} +/- {_num(row['eval_std'])}" if evaluated else ""
        self._print(
            f"gen {gen:>{len(str(total))}}/{total} | mean {_num(row['mean_fitness'], 8)} | "
            f"best {_num(row['best_fitness'], 8)}{evaluation} | {_rate(row.get('steps_per_second'))} steps/s"
            f" | {_clock(row.get('time'))} elapsed, ETA {_clock(eta)}"
        )

    def message(self, text: str) -> None:
        """Print a line."""
        self._print(text)

    def close(self) -> None:
        """Nothing to tear down."""


def _eta(t0: float, done: int, left: int) -> float | None:
    if done <= 0:
        return None
    return (time.perf_counter() - t0) / done * left


class RichProgress:
    """A live rich progress bar: generation, mean/best fitness, latest eval, steps/s, elapsed/ETA."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console

        self.console = console or Console()
        self.progress: Any = None
        self.task: Any = None
        self.last_eval = "-"

    def start(self, info: RunInfo) -> None:
        """Print the header and start the live bar."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console.print(_header(info), highlight=False)
        self.progress = Progress(
            TextColumn("[bold]gen"),
            MofNCompleteColumn(),
            BarColumn(bar_width=12),
            TextColumn(
                "mean [cyan]{task.fields[mean]}[/] best [cyan]{task.fields[best]}[/] "
                "eval [green]{task.fields[eval]}[/] {task.fields[sps]} st/s"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            info.env_id,
            total=info.generations,
            completed=info.start_generation,
            mean="-",
            best="-",
            eval="-",
            sps="-",
        )

    def update(self, row: Mapping[str, Any]) -> None:
        """Advance the bar to this generation."""
        if row.get("eval_mean") is not None:
            self.last_eval = f"{row['eval_mean']:.1f}"
        self.progress.update(
            self.task,
            completed=int(row["generation"]),
            mean=_num(row["mean_fitness"]),
            best=_num(row["best_fitness"]),
            eval=self.last_eval,
            sps=_rate(row.get("steps_per_second")),
        )

    def message(self, text: str) -> None:
        """Print a line above the bar."""
        self.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        """Stop the live bar, leaving its last state on screen."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def make_progress(kind: str) -> RichProgress | LogProgress | None:
    """Return the display named ``rich``, ``plain`` or ``none``."""
    if kind == "rich":
        return RichProgress()
    if kind == "plain":
        return LogProgress()
    return None
