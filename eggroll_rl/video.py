"""Record a policy playing one episode to an mp4 (gymnasium's RecordVideo, encoded by moviepy)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from eggroll_rl.atomic import atomic_path

__all__ = ["Recording", "record_episode"]


@dataclass(frozen=True)
class Recording:
    """Where a recording went and what it shows."""

    path: Path
    frames: int
    episode_return: float
    length: int


def record_episode(
    policy: torch.nn.Module,
    env_id: str,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    max_steps: int | None = None,
) -> Recording:
    """Play one deterministic episode of ``policy`` on ``env_id`` and write it to ``path`` (mp4).

    The video is encoded into a private temporary directory beside ``path`` and moved into place
    atomically, so ``path`` is either the old file or the complete new one.
    """
    import gymnasium as gym
    from gymnasium.vector.utils import concatenate, create_empty_array
    from gymnasium.wrappers import RecordVideo

    from eggroll_rl.rollout import _one_thread

    # pygame (classic-control rendering) needs no display for rgb_array frames; without this
    # SDL may complain about the session (XDG_RUNTIME_DIR) on headless machines.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".record-", dir=dest.parent))
    try:
        env = RecordVideo(
            gym.make(env_id, render_mode="rgb_array"),
            video_folder=str(work / "video"),  # a fresh folder: RecordVideo warns about existing ones
            episode_trigger=lambda episode: episode == 0,
            name_prefix="episode",
            disable_logger=True,
        )
        space = env.observation_space
        device = next(policy.parameters(), torch.empty(0)).device
        total, steps = 0.0, 0
        try:
            obs, _ = env.reset(seed=seed)
            done = False
            # One-row forwards: torch's thread pool only adds waits (see rollout._one_thread).
            with torch.no_grad(), _one_thread(device.type == "cpu"):
                while not done and (max_steps is None or steps < max_steps):
                    # The policy takes batched observations: make a batch of one.
                    batch = concatenate(space, [obs], create_empty_array(space, 1))
                    x = policy.preprocess(batch).to(device)
                    action = policy.act(policy(x), deterministic=True)[0]
                    if isinstance(env.action_space, gym.spaces.Discrete):
                        action = int(action)
                    obs, reward, terminated, truncated, _ = env.step(action)
                    total += float(reward)
                    steps += 1
                    done = bool(terminated or truncated)
            frames = len(env.recorded_frames)
        finally:
            env.close()  # writes the video
        videos = sorted(work.glob("video/*.mp4"))
        if not videos:
            raise RuntimeError(f"RecordVideo wrote no video for {env_id} (did the env render frames?)")
        with atomic_path(dest) as tmp:
            shutil.move(videos[0], tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Recording(path=dest, frames=frames, episode_return=total, length=steps)
