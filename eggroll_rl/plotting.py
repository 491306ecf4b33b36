"""Learning-curve PNGs from agents' ``history.csv``: fitness and evaluation return vs steps and time."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eggroll_rl.atomic import atomic_path

__all__ = ["plot_learning_curves"]


def _series(history: dict[str, list[Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = history.get(x, []), history.get(y, [])
    pairs = [(a, b) for a, b in zip(xs, ys) if isinstance(a, int | float) and isinstance(b, int | float)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def plot_learning_curves(agents: Sequence[Any], path: str | os.PathLike[str]) -> Path:
    """Draw a 2x2 figure (fitness / eval return against env steps / wall time) for ``agents``.

    ``agents`` are :class:`eggroll_rl.agents.Agent` objects; raises ImportError without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    label_many = len(agents) > 1
    for agent in agents:
        history = agent.history()
        name = f"{agent.env_id} ({agent.directory.name})" if label_many else agent.env_id
        for col, x in enumerate(("env_steps", "time")):
            line = None
            for y, style in (("mean_fitness", "-"), ("best_fitness", ":")):
                xs, ys = _series(history, x, y)
                if xs:
                    kwargs = {} if line is None else {"color": line.get_color()}
                    (drawn,) = axes[0, col].plot(
                        xs, ys, style, label=f"{name} {y.replace('_', ' ')}", **kwargs
                    )
                    line = line or drawn
            xs, ys = _series(history, x, "eval_mean")
            if xs:
                _, std = _series(history, x, "eval_std")
                axes[1, col].plot(xs, ys, "o-", label=name, color=None if line is None else line.get_color())
                if len(std) == len(ys):
                    low = [m - s for m, s in zip(ys, std)]
                    high = [m + s for m, s in zip(ys, std)]
                    axes[1, col].fill_between(xs, low, high, alpha=0.15)
        target = agent.results.get("target")
        if isinstance(target, int | float):
            for col in range(2):
                axes[1, col].axhline(target, color="grey", linestyle="--", linewidth=1)
    axes[0, 0].set_ylabel("fitness (population mean, best)")
    axes[1, 0].set_ylabel("evaluation return (center policy)")
    axes[1, 0].set_xlabel("env steps")
    axes[1, 1].set_xlabel("wall time (s)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    axes[1, 0].legend(fontsize="small")
    title = agents[0].env_id if not label_many else "learning curves"
    fig.suptitle(title)
    fig.tight_layout()
    dest = Path(path)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return dest
