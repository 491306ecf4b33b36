"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every file the program writes goes through these helpers. The recipe is the usual one: write a
temporary file in the destination's own directory (so the final rename never crosses a file
system), flush and fsync it, ``os.replace`` it over the destination, then fsync the directory so
the rename itself survives a power cut. On any failure the temporary file is removed and the
destination is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_writable_dir",
    "fsync_dir",
    "replace_dir",
]

PathLike = str | os.PathLike[str]


def fsync_dir(directory: PathLike) -> None:
    """Flush a directory's entries to disk so a rename inside it is durable."""
    # Directories cannot be opened for fsync on Windows; there the rename is already as durable
    # as the platform offers, so skipping is the correct degradation.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable_dir(directory: PathLike) -> None:
    """Raise OSError unless files can be created in ``directory``; leave nothing behind.

    Missing directories are created for the test and removed again, so a check before the
    work starts finds ``/proc/x``, a path under a regular file or a read-only file system.
    """
    directory = Path(directory)
    missing = []
    probe_dir = directory
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        missing.append(probe_dir)
        probe_dir = probe_dir.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(name)
    finally:
        for path in missing:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """Create a hidden temporary directory in ``parent`` with mkdir's usual permissions."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a swapped-in agent dir must not be private
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success move it over ``path``, on failure delete it.

    For writers that insist on a file name of their own (video encoders, third-party savers).
    The temporary name keeps the destination's suffix so such writers pick the right format.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.tmp-", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should look like open()'s
    try:
        yield tmp
        # The writer may have closed the file without fsync; reopen to force it to disk.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` only when the block succeeds."""
    if not any(m in mode for m in "wx") or "+" in mode:
        raise ValueError(f"atomic_open supports write-only modes ('w', 'wb'), got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode.replace("x", "w"), **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (``\\n`` line endings on every platform)."""
    with atomic_open(path, "w", encoding=encoding, newline="\n") as fh:
        fh.write(text)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically; reject NaN/inf (invalid JSON)."""
    # Serialise before touching the disk so an unserialisable object leaves nothing behind.
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    # EINVAL/ENOSYS/EOPNOTSUPP: the file system or kernel cannot exchange; use the fallback.
    if err in {22, 38, 95}:
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(src: PathLike, dest: PathLike, *, before_swap: Callable[[Path], None] | None = None) -> None:
    """Move the finished directory ``src`` into place at ``dest``, replacing any old one.

    With an existing ``dest`` the two are exchanged atomically where the platform allows it
    (Linux), otherwise by two renames with a rollback, so a failure leaves the old directory
    in place. The replaced directory is deleted afterwards. ``before_swap(old_dest)`` runs just
    before the swap (e.g. to carry files over from the old directory into ``src``).
    """
    src, dest = Path(src), Path(dest)
    if not dest.exists():
        os.replace(src, dest)
        fsync_dir(dest.parent)
        return
    if not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a directory")
    if before_swap is not None:
        before_swap(dest)
    if _exchange(src, dest):
        # ``src`` now holds the old directory.
        fsync_dir(dest.parent)
        shutil.rmtree(src, ignore_errors=True)
        return
    # A fresh unique name for the old directory while the new one moves in.
    old = make_temp_dir(dest.parent, f".{dest.name}.old-")
    old.rmdir()
    os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
