"""Tiny envs registered without ``max_episode_steps``, for the runner's fault tests.

``EggrollTest/Endless-v0`` never terminates or truncates (an episode ends only at a cap) and renders
rgb_array frames; ``EggrollTest/NanReward-v0`` returns NaN rewards; ``EggrollTest/NoRender-v0``
has no render modes; ``EggrollTest/RaiseOnRank1-v0`` raises from ``step`` in the process whose
``RANK`` is 1. Importing this module registers them (``endless_env:EggrollTest/Endless-v0``).
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np


class Endless(gym.Env):
    """A 2-d observation, 2 actions, reward 1 per step, and no end."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}  # noqa: RUF012

    def __init__(self, render_mode: str | None = None, reward: float = 1.0, raise_on_rank: int = -1) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.render_mode = render_mode
        self.reward = reward
        self.raise_on_rank = raise_on_rank
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), {}

    def step(self, action):
        self.t += 1
        if int(os.environ.get("RANK", "-2")) == self.raise_on_rank and self.t == 3:
            raise RuntimeError("env exploded on rank 1")
        obs = np.array([np.sin(self.t), np.cos(self.t)], np.float32)
        return obs, self.reward, False, False, {}

    def render(self):
        return np.full((16, 16, 3), self.t % 255, dtype=np.uint8)


class NoRender(Endless):
    """Endless without any render mode."""

    metadata = {"render_modes": []}  # noqa: RUF012


for _id, _kwargs, _cls in (
    ("EggrollTest/Endless-v0", {}, Endless),
    ("EggrollTest/NanReward-v0", {"reward": float("nan")}, Endless),
    ("EggrollTest/NoRender-v0", {}, NoRender),
    ("EggrollTest/RaiseOnRank1-v0", {"raise_on_rank": 1}, Endless),
):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_cls, kwargs=_kwargs)
