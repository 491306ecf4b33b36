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

    The episode ends at ``max_steps`` (default: the env's own limit, else the default cap of
    :func:`eggroll_rl.rollout.episode_cap`), the same cap training and evaluation use. Raises
    ValueError when the env cannot render rgb_array frames. The video is encoded into a private
    temporary directory beside ``path`` and moved into place atomically, so ``path`` is either
    the old file or the complete new one.
    """
    import gymnasium as gym
    from gymnasium.vector.utils import concatenate, create_empty_array
    from gymnasium.wrappers import RecordVideo

    from eggroll_rl.rollout import _find_spec, episode_cap

    # pygame (classic-control rendering) needs no display for rgb_array frames; without this
    # SDL may complain about the session (XDG_RUNTIME_DIR) on headless machines.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec = _find_spec(env_id)
    cap = episode_cap(spec, max_steps)
    kwargs = {} if cap == spec.max_episode_steps else {"max_episode_steps": cap}
    work = Path(tempfile.mkdtemp(prefix=".record-", dir=dest.parent))
    try:
        env = RecordVideo(
            gym.make(spec, render_mode="rgb_array", **kwargs),
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
            with torch.no_grad():
                while not done:
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
        frames = _count_frames(videos[0], frames)
        with atomic_path(dest) as tmp:
            shutil.move(videos[0], tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Recording(path=dest, frames=frames, episode_return=total, length=steps)


def _count_frames(path: Path, recorded: int) -> int:
    """Return how many frames the mp4 at ``path`` holds (``recorded`` when it cannot be decoded)."""
    try:
        import imageio.v3 as iio

        return sum(1 for _ in iio.imiter(path))
    except Exception:  # imageio comes with moviepy; a decoder problem must not lose the video
        return recorded
