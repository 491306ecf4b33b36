"""Start K local processes that train one population together, without torchrun.

``run_distributed(nproc, target, kwargs)`` spawns ``nproc`` processes, joins them into one gloo
(CPU) or nccl (CUDA) process group and calls ``target(**kwargs)`` in each; it returns rank 0's
result. If any rank raises or dies, the others are stopped within ``grace`` seconds and a
:class:`~eggroll_rl.distributed.DistributedError` names the failed rank and its error (its
traceback is attached as a note). ``target`` must be importable (a module-level function), and a
script that calls this must guard its entry point with ``if __name__ == "__main__":`` (spawn
re-imports it in every process).
"""

from __future__ import annotations

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
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, nproc, store.port, target, kwargs, backend, timeout_s, threads, results),
            name=f"eggroll-rank{rank}",
            daemon=True,
        )
        for rank in range(nproc)
    ]
    try:
        for p in procs:
            p.start()
        reports = _supervise(procs, results, grace)
    except BaseException:
        _stop(procs)
        raise
    finally:
        del store
    return _outcome(procs, reports)


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
    except BaseException as exc:
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


def _outcome(procs: list[Any], reports: dict[int, tuple[str, Any, str]]) -> Any:
    """Return rank 0's result, or raise naming the ranks that caused the failure."""
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
