"""torch.distributed plumbing: which members a process evaluates, and the per-generation exchange.

ES needs almost no communication: every rank regenerates every member's noise from the shared seed,
so per generation only the N fitness values travel (plus a one-float error flag per rank and, when
the fitness reports stats, a small dict of them). Every rank then applies the identical update.

Faults: every collective of :class:`World` (the fitness gather, the rollout's all-reduce, stats,
broadcasts, barriers) starts with a one-number status exchange. A rank that raises calls
:meth:`World.fail`, which joins whatever collective the other ranks are in with a failed status;
all ranks then exchange the messages and raise the same :class:`DistributedError` naming the
failed rank and its exception, at once. A rank that dies makes the next collective fail
(connection closed) or time out (``timeout`` of :meth:`World.init_from_env`), which is reported
as a :class:`DistributedError` too, so a run never hangs for longer than the timeout.
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT", "REDUCTIONS", "DistributedError", "World", "stat_reduction"]

T = TypeVar("T")

# Long enough for the slowest rank's generation (the others wait for it inside the gather), short
# enough that a hung peer ends the run in minutes, not torch's default half hour.
DEFAULT_TIMEOUT = timedelta(seconds=float(os.environ.get("EGGROLL_DIST_TIMEOUT", "600")))


class DistributedError(RuntimeError):
    """A rank failed (raised, died or timed out); ``failures`` maps rank → message."""

    def __init__(self, failures: Mapping[int, str] | str) -> None:
        if isinstance(failures, str):
            self.failures: dict[int, str] = {}
            super().__init__(failures)
            return
        self.failures = dict(sorted(failures.items()))
        super().__init__("; ".join(f"rank {r} failed: {m}" for r, m in self.failures.items()))

    @property
    def rank(self) -> int | None:
        """Return the first failed rank, when known."""
        return next(iter(self.failures), None)


REDUCTIONS = ("sum", "mean", "max", "min")


def stat_reduction(key: str, declared: Mapping[str, str] | None = None) -> str:
    """Return how a per-rank stat combines over ranks: as ``declared``, else ``"mean"``.

    Mean is the default because it is harmless for stats the fitness already reduced itself
    (identical on every rank); per-rank counts must be declared ``"sum"``.
    """
    how = declared.get(key, "mean") if declared else "mean"
    if how not in REDUCTIONS:
        raise ValueError(f"stats_reduction[{key!r}] must be one of {REDUCTIONS}, got {how!r}")
    return how


def _describe(exc: BaseException) -> str:
    """Return ``Type: first line (file:line)``: enough for rank 0 to say what went wrong where."""
    text = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        message += f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})"
    return message


@dataclass(frozen=True)
class World:
    """The processes sharing one population (a single process when torch.distributed is off)."""

    rank: int = 0
    size: int = 1

    # -- set-up -----------------------------------------------------------------------------------
    @classmethod
    def current(cls) -> World:
        """Describe the running process group, or a world of one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @classmethod
    def init_from_env(cls, backend: str = "auto", timeout: timedelta | float | None = None) -> World:
        """Join the process group described by torchrun's environment (a world of one without it).

        ``backend="auto"`` picks nccl when CUDA is available, gloo otherwise. ``timeout`` (seconds
        or a timedelta; default ``EGGROLL_DIST_TIMEOUT`` or 600 s) bounds every collective, so a
        dead or hung peer ends the run with an error instead of a hang.
        """
        if dist.is_available() and dist.is_initialized():
            return cls.current()
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1 or "RANK" not in os.environ:
            return cls()
        if not dist.is_available():
            raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        elif not isinstance(timeout, timedelta):
            timeout = timedelta(seconds=float(timeout))
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # One GPU per local process; collectives run on the current device.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        return cls.current()

    @staticmethod
    def shutdown() -> None:
        """Leave the process group (no-op when none is initialised)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    # -- roles ------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints progress."""
        return self.rank == 0

    def member_slice(self, population_size: int) -> slice:
        """Return the contiguous block of members this process evaluates."""
        per, extra = divmod(population_size, self.size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (1 if self.rank < extra else 0))

    def on_main(self, fn: Callable[..., T], *args: Any, sync: bool = True, **kwargs: Any) -> T | None:
        """Run ``fn`` on rank 0 only (file writes, prints); with ``sync`` the others wait for it.

        A failure on rank 0 is re-raised there and reported to the others as a DistributedError,
        so they do not continue past a checkpoint that was never written.
        """
        error: BaseException | None = None
        result = None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                error = exc
        if sync and self.size > 1:
            if error is not None:
                self._announce(error)  # the others raise DistributedError; rank 0 its own error
            else:
                self.barrier()
        if error is not None:
            raise error
        return result

    def fail(self, error: BaseException) -> None:
        """Stop every rank with ``error``: raise DistributedError naming this rank on all of them.

        Call it where a rank raises outside a collective; it meets the other ranks in whatever
        collective of this World they are in. In a world of one, ``error`` is re-raised as is.
        """
        if self.size == 1 or isinstance(error, DistributedError):
            raise error
        raise DistributedError(self._announce(error)) from error

    def _announce(self, error: BaseException | None) -> dict[int, str]:
        """Send this rank's status (failed when ``error``); return every failed rank's message."""
        flags = self._status(error is not None)
        failed = [r for r, flag in enumerate(flags) if flag]
        if not failed:
            return {}
        out: list[Any] = [None] * self.size
        self._raw("exchange error messages", dist.all_gather_object, out, _describe(error) if error else None)
        return {r: out[r] or "unknown error" for r in failed}

    def _status(self, failed: bool) -> list[int]:
        device = self._comm_device(torch.device("cpu"))
        mine = torch.tensor([1 if failed else 0], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        self._raw("status", dist.all_gather, parts, mine)
        return [int(p.item()) for p in parts]

    # -- collectives ------------------------------------------------------------------------------
    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.size > 1:
            self._collective("barrier", dist.barrier)

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Return rank ``src``'s ``obj`` on every process (picklable objects only)."""
        if self.size == 1:
            return obj
        box = [obj]
        self._collective("broadcast_object", dist.broadcast_object_list, box, src=src)
        return box[0]

    def all_gather_object(self, obj: T) -> list[T]:
        """Return every process's ``obj``, in rank order."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        self._collective("all_gather_object", dist.all_gather_object, out, obj)
        return out

    def all_gather(
        self, local: torch.Tensor, population_size: int, error: BaseException | None = None
    ) -> torch.Tensor:
        """Assemble the full fitness vector from every process's block (in member order).

        ``error``: this rank's evaluation failed; every rank then raises the same
        DistributedError naming the failed ranks (single process: ``error`` is re-raised as is).
        """
        if error is not None:
            self.fail(error)
        if self.size == 1:
            return local
        # Blocks may differ by one member: pad to the largest, gather, then trim.
        longest = -(-population_size // self.size)
        device = self._comm_device(local.device)
        padded = torch.zeros(longest, dtype=torch.float64, device=device)
        padded[: local.numel()] = local.to(device, torch.float64)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self._collective("all_gather fitness", dist.all_gather, parts, padded)
        blocks = []
        for r, part in enumerate(parts):
            s = World(r, self.size).member_slice(population_size)
            blocks.append(part[: s.stop - s.start])
        return torch.cat(blocks).to(local.device, local.dtype)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (unchanged in a world of one)."""
        if self.size == 1:
            return tensor
        out = tensor.to(self._comm_device(tensor.device), copy=True)
        self._collective("all_reduce", dist.all_reduce, out)
        return out.to(tensor.device)

    def reduce_stats(
        self, stats: Mapping[str, float], declared: Mapping[str, str] | None = None
    ) -> dict[str, float]:
        """Combine per-rank stats so every rank holds the same values (averaged unless ``declared``).

        ``declared`` (a fitness's ``stats_reduction``) maps keys to ``"sum"`` (per-rank counts),
        ``"mean"``, ``"max"`` or ``"min"``; a key missing on some ranks is combined over the ranks
        that report it.
        """
        if self.size == 1:
            return {k: float(v) for k, v in stats.items()}
        gathered = self.all_gather_object({k: float(v) for k, v in stats.items()})
        out: dict[str, float] = {}
        for key in sorted(set().union(*gathered)):
            values = [g[key] for g in gathered if key in g]
            how = stat_reduction(key, declared)
            if how == "sum":
                out[key] = math.fsum(values)
            elif how == "max":
                out[key] = max(values)
            elif how == "min":
                out[key] = min(values)
            else:
                out[key] = math.fsum(values) / len(values)
        return out

    def _comm_device(self, device: torch.device) -> torch.device:
        # NCCL only moves CUDA tensors; gloo takes CPU ones (and CUDA ones via a host copy).
        if dist.get_backend() == "nccl" and device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def _collective(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # The status first: a rank that failed elsewhere (World.fail) meets us here, whatever
        # collective we are in, and every rank stops with its message.
        failures = self._announce(None)
        if failures:
            raise DistributedError(failures)
        return self._raw(what, fn, *args, **kwargs)

    def _raw(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DistributedError:
            raise
        except RuntimeError as exc:  # DistBackendError and friends: a peer died, hung or hung up
            raise DistributedError(
                f"rank {self.rank}: collective {what} failed — another rank died, raised outside "
                f"the evaluation or did not answer within the timeout ({_describe(exc)})"
            ) from exc


def disagreement(what: str, values: list[str]) -> str | None:
    """Return a message naming the ranks whose value differs from rank 0's, or None if all agree."""
    others = [r for r, v in enumerate(values) if v != values[0]]
    if not others:
        return None
    ranks = ", ".join(map(str, others))
    return (
        f"ranks disagree on the {what}: rank(s) {ranks} differ from rank 0 ({len(values)} ranks); "
        "every rank must run the same configuration and code, and draw the same noise"
    )


def check_agreement(world: World, what: str, value: str) -> None:
    """Raise a DistributedError on every rank unless all ranks hold the same ``value`` (a hash).

    One ``all_gather_object`` of a short string; nothing to do in a world of one.
    """
    if world.size == 1:
        return
    message = disagreement(what, world.all_gather_object(value))
    if message is not None:
        raise DistributedError(message)
