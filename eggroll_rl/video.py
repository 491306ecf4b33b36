"""Record a policy playing one episode to an mp4 (gymnasium's RecordVideo, encoded by moviepy)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eggroll_rl.atomic import atomic_path

__all__ = ["HEADLESS_GL_BACKENDS", "Recording", "RenderBackendError", "choose_mujoco_gl", "record_episode"]

# MuJoCo's offscreen OpenGL backends that need no display, in order of preference.
HEADLESS_GL_BACKENDS = ("egl", "osmesa")
_GL_PROBE = (
    "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); "
    "m = mujoco.MjModel.from_xml_string('<mujoco/>'); "
    "mujoco.MjrContext(m, mujoco.mjtFontScale.mjFONTSCALE_100); c.free()"
)
NO_GL_MESSAGE = (
    "cannot render MuJoCo without a display: neither EGL nor OSMesa works here; install one "
    "(e.g. `apt-get install libegl1` for MUJOCO_GL=egl, or `apt-get install libosmesa6` for "
    "MUJOCO_GL=osmesa) plus `pip install pyopengl`, or run with a display"
)


class RenderBackendError(RuntimeError):
    """No OpenGL backend can render this env here; the message says what to install."""


def _probe_gl(backend: str) -> bool:
    """Return whether MuJoCo can open an offscreen ``backend`` context (in a child process)."""
    env = {**os.environ, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _GL_PROBE], env=env, capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _is_mujoco(env_id: str) -> bool:
    import gymnasium as gym

    try:
        entry = gym.spec(env_id).entry_point
    except gym.error.Error:
        return False
    return isinstance(entry, str) and entry.startswith("gymnasium.envs.mujoco")


def choose_mujoco_gl(
    environ: MutableMapping[str, str] | None = None,
    probe: Callable[[str], bool] | None = None,
    platform: str = sys.platform,
) -> str | None:
    """Pick MuJoCo's OpenGL backend for rendering and set ``MUJOCO_GL``; return it (None: default).

    A ``MUJOCO_GL`` already set is kept. With a display (``DISPLAY``/``WAYLAND_DISPLAY``), or on
    macOS/Windows, MuJoCo's default (GLFW) is left alone. Headless, the first of
    :data:`HEADLESS_GL_BACKENDS` that ``probe`` accepts is set (with ``PYOPENGL_PLATFORM``,
    which PyOpenGL reads once per process); ``probe(name)`` (default: open a context in a child
    process) says whether a backend works. Raises RenderBackendError when none works.
    """
    environ = os.environ if environ is None else environ
    probe = _probe_gl if probe is None else probe
    if environ.get("MUJOCO_GL"):
        return environ["MUJOCO_GL"]
    if not platform.startswith("linux") or environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"):
        return None
    for backend in HEADLESS_GL_BACKENDS:
        if probe(backend):
            environ["MUJOCO_GL"] = backend
            environ.setdefault("PYOPENGL_PLATFORM", backend)
            return backend
    raise RenderBackendError(NO_GL_MESSAGE)


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
    env_kwargs: Mapping[str, Any] | None = None,
) -> Recording:
    """Play one deterministic episode of ``policy`` on ``env_id`` and write it to ``path`` (mp4).

    ``env_kwargs`` are the keyword arguments of ``gym.make`` the agent was trained with.

    The episode ends at ``max_steps`` (default: the env's own limit, else the default cap of
    :func:`eggroll_rl.rollout.episode_cap`), the same cap training and evaluation use. Raises
    ValueError when the env cannot render rgb_array frames; MuJoCo envs on a headless machine
    render through EGL or OSMesa (:func:`choose_mujoco_gl`), RenderBackendError when neither
    works. The video is encoded into a private temporary directory beside ``path`` and moved
    into place atomically, so ``path`` is either the old file or the complete new one.
    """
    import gymnasium as gym
    from gymnasium.vector.utils import concatenate, create_empty_array
    from gymnasium.wrappers import RecordVideo

    from eggroll_rl.rollout import _find_spec, _one_thread, episode_cap

    # pygame (classic-control rendering) needs no display for rgb_array frames; without this
    # SDL may complain about the session (XDG_RUNTIME_DIR) on headless machines.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    if _is_mujoco(env_id):
        choose_mujoco_gl()
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec = _find_spec(env_id)
    cap = episode_cap(spec, max_steps)
    kwargs = {} if cap == spec.max_episode_steps else {"max_episode_steps": cap}
    work = Path(tempfile.mkdtemp(prefix=".record-", dir=dest.parent))
    try:
        env = RecordVideo(
            gym.make(spec, render_mode="rgb_array", **kwargs, **dict(env_kwargs or {})),
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
