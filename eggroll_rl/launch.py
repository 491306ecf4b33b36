"""Start K local processes that train one population together, without torchrun.

``run_distributed(nproc, target, kwargs)`` spawns ``nproc`` processes, joins them into one gloo
(CPU) or nccl (CUDA) process group and calls ``target(**kwargs)`` in each; it returns rank 0's
result. If any rank raises or dies, the others are stopped within ``grace`` seconds and a
:class:`~eggroll_rl.distributed.DistributedError` names the failed rank and its error (its
traceback is attached as a note). ``target`` must be importable (a module-level function), and a
script that calls this must guard its entry point with ``if __name__ == "__main__":`` (spawn
re-imports it in every process).

Signals: SIGINT, SIGTERM and SIGHUP sent to the launcher are forwarded to every worker (the
workers run in their own process group, so a terminal's Ctrl-C reaches them once, through the
launcher). A training worker stops after its generation and saves; a second signal stops it at
once. A worker whose launcher dies gets SIGTERM (Linux), so no worker outlives it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .distributed import DEFAULT_TIMEOUT, DistributedError, World, _describe

__all__ = ["launch", "run_distributed"]

T = TypeVar("T")


def run_distributed(
    nproc: int,
    target: Callable[..., T],
    kwargs: Mapping[str, Any] | None = None,
    *,
    backend: str = "auto",
    timeout: timedelta | float | None = None,
    threads: int | None = None,
    grace: float = 10.0,
) -> T:
    """Run ``target(**kwargs)`` in ``nproc`` local processes of one process group; return rank 0's result.

    ``threads``: torch threads per process (default: the machine's cores split evenly, at least 1).
    ``timeout`` bounds each collective (see :meth:`World.init_from_env`). ``nproc == 1`` calls
    ``target`` in this process, with no process group.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    kwargs = dict(kwargs or {})
    if nproc == 1:
        return target(**kwargs)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    timeout_s = (timeout if isinstance(timeout, timedelta) else DEFAULT_TIMEOUT).total_seconds()
    if timeout is not None and not isinstance(timeout, timedelta):
        timeout_s = float(timeout)
    # The launcher hosts the rendezvous store on a port the OS picks: no free-port guessing, so
    # concurrent launches (parallel tests) cannot collide. Workers connect as clients, as under
    # torchrun's agent (TORCHELASTIC_USE_AGENT_STORE).
    store = dist.TCPStore(
        "127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    forwarded: list[int] = []
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, nproc, store.port, target, kwargs, backend, timeout_s, threads, results),
            name=f"eggroll-rank{rank}",
            daemon=True,
        )
        for rank in range(nproc)
    ]
    previous = _forward_signals(procs, forwarded)
    try:
        for p in procs:
            # Started with the stop signals blocked: the worker inherits the mask and unblocks
            # them once it has left the terminal's process group and installed its handlers.
            _block(True)
            try:
                p.start()
            finally:
                _block(False)
        reports = _supervise(procs, results, grace)
    except BaseException:
        _stop(procs)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        del store
    return _outcome(procs, reports, forwarded)


_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def _block(on: bool) -> None:
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if on else signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _forward_signals(procs: list[Any], forwarded: list[int]) -> dict[int, Any]:
    """Install handlers that pass INT/TERM/HUP on to the live workers; return the old handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(signum: int, frame: Any) -> None:
        forwarded.append(signum)
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    return {sig: signal.signal(sig, forward) for sig in _STOP_SIGNALS}


def _detach_from_terminal() -> None:
    """Leave the terminal's process group, die with the launcher, then accept stop signals."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGTERM when the launcher dies
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)
    from eggroll_rl.run import SignalInterrupt

    def interrupt(signum: int, frame: Any) -> None:
        raise SignalInterrupt(signum)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, interrupt)
    _block(False)


def launch(fn: Callable[..., T], nproc: int, *args: Any, **options: Any) -> T:
    """Run ``fn(*args)`` in ``nproc`` local processes (see :func:`run_distributed` for ``options``)."""
    return run_distributed(nproc, _Call(fn, args), **options)


class _Call:
    """A picklable ``fn(*args)`` (a lambda or closure would not survive spawn)."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __call__(self) -> Any:
        return self.fn(*self.args)


def _worker(
    rank: int,
    nproc: int,
    port: int,
    target: Callable[..., Any],
    kwargs: dict[str, Any],
    backend: str,
    timeout_s: float,
    threads: int,
    results: Any,
) -> None:
    try:
        _detach_from_terminal()  # a signal pending since start-up is raised here
    except KeyboardInterrupt as exc:
        results.put((rank, "interrupted", (getattr(exc, "signum", signal.SIGINT), ""), ""))
        results.close()
        results.join_thread()
        os._exit(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nproc),
        TORCHELASTIC_USE_AGENT_STORE="True",
        OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
    try:
        World.init_from_env(backend, timeout_s)
        result = target(**kwargs)
        # Plain pickle: torch's queue pickler would pass tensors as shared-memory handles that
        # die with this process before the launcher reads them.
        results.put((rank, "ok", pickle.dumps(result) if rank == 0 else None, ""))
    except KeyboardInterrupt as exc:  # a forwarded stop signal (a second one, or during start-up)
        results.put((rank, "interrupted", (getattr(exc, "signum", signal.SIGINT), str(exc)), ""))
        results.close()
        results.join_thread()
        os._exit(1)
    except BaseException as exc:
        if not isinstance(exc, DistributedError):
            # Tell the other ranks, wherever they wait in a collective, so all stop at once.
            with contextlib.suppress(BaseException):
                World.current().fail(exc)
        # A DistributedError that names another rank is a consequence; the launcher reports causes.
        own = not isinstance(exc, DistributedError) or rank in exc.failures
        message = exc.failures.get(rank, str(exc)) if isinstance(exc, DistributedError) else _describe(exc)
        results.put((rank, "error" if own else "consequence", message, traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)  # skip destroy_process_group: it may wait on the peer that failed
    World.shutdown()


def _supervise(procs: list[Any], results: Any, grace: float) -> dict[int, tuple[str, Any, str]]:
    reports: dict[int, tuple[str, Any, str]] = {}
    failed_at: float | None = None
    while True:
        try:
            while True:
                rank, kind, payload, tb = results.get(timeout=0.05)
                reports[rank] = (kind, payload, tb)
        except queue.Empty:
            pass
        if all(p.exitcode is not None for p in procs):
            return reports
        if failed_at is None and any(
            (p.exitcode not in (None, 0)) or reports.get(r, ("ok",))[0] != "ok" for r, p in enumerate(procs)
        ):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace:
            # The survivors would stop at their next collective; do not wait for its timeout.
            for r in _stop(procs):
                reports.setdefault(r, ("stopped", None, ""))


def _stop(procs: list[Any]) -> list[int]:
    """Terminate the processes still running; return their ranks."""
    running = [r for r, p in enumerate(procs) if p.exitcode is None]
    for r in running:
        procs[r].terminate()
    for r in running:
        procs[r].join(5)
        if procs[r].exitcode is None:
            procs[r].kill()
            procs[r].join()
    return running


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"died from signal {signal.Signals(-code).name}"
        except ValueError:
            return f"died from signal {-code}"
    return f"died with exit code {code} without reporting an error"


def _outcome(procs: list[Any], reports: dict[int, tuple[str, Any, str]], forwarded: list[int]) -> Any:
    """Return rank 0's result, or raise naming the ranks that caused the failure.

    After a forwarded stop signal, a run that did not finish raises ``RunInterrupted`` (a
    KeyboardInterrupt) whose ``signum`` is that signal.
    """
    interrupted = [rep[1] for rep in reports.values() if rep[0] == "interrupted"]
    finished = 0 in reports and reports[0][0] == "ok"
    if forwarded and not finished:
        from eggroll_rl.run import RunInterrupted

        message = interrupted[0][1] if interrupted else ""
        if not message or message in {s.name for s in signal.Signals}:
            message = "interrupted during start-up: nothing was trained or saved"
        error = RunInterrupted(message)
        error.signum = forwarded[0]
        raise error
    # Without a signal from outside, a worker interrupted by the launcher's own stop was stopped.
    reports = {r: ("stopped", None, "") if rep[0] == "interrupted" else rep for r, rep in reports.items()}
    causes: dict[int, str] = {}
    notes: list[str] = []
    for rank, p in enumerate(procs):
        kind, payload, tb = reports.get(rank, ("missing", None, ""))
        if kind == "error":
            causes[rank] = payload
            notes.append(f"--- rank {rank} traceback ---\n{tb.rstrip()}")
        elif kind == "consequence":
            notes.append(f"rank {rank} then stopped with: {payload}")
        elif kind == "missing" and p.exitcode != 0:
            causes[rank] = _exit_reason(p.exitcode)
    if not causes:
        # Nobody raised or died: the ranks the launcher had to stop are the ones that hung.
        causes = {
            r: "stopped responding (terminated by the launcher)"
            for r, rep in reports.items()
            if rep[0] == "stopped"
        }
    if not causes and any(rep[0] == "consequence" for rep in reports.values()):
        causes = {r: rep[1] for r, rep in reports.items() if rep[0] == "consequence"}
    if causes:
        error = DistributedError(causes)
        for note in notes:
            error.add_note(note)
        raise error
    if 0 not in reports:
        raise DistributedError({0: "finished without returning a result"})
    return pickle.loads(reports[0][1])
