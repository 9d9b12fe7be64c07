"""Start N worker processes on this machine, watch them, and bring rank 0's result back.

The fit function is pickled once into a private temporary folder with the plain pickler (never
multiprocessing's, which would put the model's tensors in shared memory and let every rank
step the same storage). Each worker reads it, sets the torchrun-style rank variables plus the
path of a ``FileStore`` in that folder (no TCP port is ever chosen), and runs it. Rank 0
``torch.save``\\ s its :class:`~torchplug.FitOutcome` there; a worker that raises writes its
exception and traceback there and exits with code 1.

The parent watches the processes' sentinels. The first rank to die is the cause; the others
normally fail within moments (a gloo peer disappearing breaks their collectives) and are given
``grace_s`` (the process-group timeout) before they are terminated, so the parent never hangs.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchplug import MisconfigurationError, TorchplugError
from torchplug.utils import pid_alive

#: Path of the FileStore the spawned workers rendezvous through (set only in spawned workers).
STORE_ENV = "TORCHPLUG_DDP_FILESTORE"

log = logging.getLogger("torchplug_ddp")

_PAYLOAD = "function.pkl"
_OUTCOME = "outcome.pt"


class WorkerFailedError(TorchplugError, RuntimeError):
    """A worker process started by ``DDPPlugin`` failed.

    ``rank`` is the rank that failed first, ``exitcode`` its exit code (negative: killed by
    that signal), ``exception`` the exception it raised when it could be brought back (its
    traceback text is in the message), else ``None``.
    """

    def __init__(self, message: str, rank: int, exitcode: int | None, exception: BaseException | None) -> None:
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode
        self.exception = exception


@dataclass
class _Failure:
    rank: int
    pid: int | None
    exitcode: int | None
    report: dict[str, Any] | None  # what the worker wrote before exiting, if it could

    @property
    def secondary(self) -> bool:
        """A collective failing because a peer went away is an effect, not the cause."""
        if self.report is None:
            return False
        text = f"{self.report['type']} {self.report['message']}"
        return any(mark in text for mark in ("DistBackendError", "DistNetworkError", "Connection closed by peer",
                                             "Connection reset by peer", "Broken pipe"))

    def describe(self) -> str:
        where = f"rank {self.rank} (pid {self.pid})"
        if self.report is not None:
            return f"{where} raised {self.report['type']}: {self.report['message']}"
        if self.exitcode is not None and self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"{where} was killed by {name}"
        return (f"{where} exited with code {self.exitcode} without a Python exception "
                "(os._exit, a crash in native code, or the out-of-memory killer)")


def run_workers(function: Callable[[], Any], nprocs: int, *, start_method: str, grace_s: float,
                threads_per_worker: int | None) -> Any:
    """Run ``function`` in ``nprocs`` new processes and return what rank 0's call returned."""
    run_dir = Path(tempfile.mkdtemp(prefix="torchplug-ddp-"))
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        _write_payload(function, run_dir / _PAYLOAD)
        context: Any = multiprocessing.get_context(start_method)
        for rank in range(nprocs):
            proc = context.Process(
                target=_worker, args=(rank, nprocs, str(run_dir), os.getpid(), threads_per_worker),
                name=f"torchplug-ddp-rank{rank}",
            )
            proc.start()
            procs.append(proc)
        with _sigterm_stops_workers(procs):
            _watch(procs, run_dir, grace_s)
        return torch.load(run_dir / _OUTCOME, weights_only=False)  # our own file, written by rank 0
    finally:
        _stop(procs, wait_s=max(5.0, grace_s))
        shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_stops_workers(procs: list[multiprocessing.process.BaseProcess]) -> Iterator[None]:
    """SIGTERM to the launching process (a scheduler stopping the job) stops the run cleanly:
    the workers get SIGTERM too (they checkpoint the last completed step and tear down), and the
    launcher raises KeyboardInterrupt instead of dying at once and orphaning them."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # someone else handles SIGTERM here (e.g. the core, or the application)
        return

    def handler(signum: int, frame: Any) -> None:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        raise KeyboardInterrupt("stopped by SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_payload(function: Callable[[], Any], path: Path) -> None:
    try:
        with open(path, "wb") as f:
            pickle.dump(function, f, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise MisconfigurationError(
            f"DDPPlugin (torchplug-ddp): devices>1 starts worker processes, which receive the model, its "
            f"data loaders and the Trainer by pickling, and pickling failed: {type(exc).__name__}: {exc}. "
            "Define the module, datasets and collate functions at module level (no lambdas or local "
            "classes), or launch the script with torchrun, which needs no pickling."
        ) from exc


def _watch(procs: list[multiprocessing.process.BaseProcess], run_dir: Path, grace_s: float) -> None:
    """Wait for every worker; raise naming the first that failed."""
    pending: dict[Any, int] = {proc.sentinel: rank for rank, proc in enumerate(procs)}
    failures: list[_Failure] = []
    rank0_done = False
    deadline: float | None = None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait(list(pending), timeout=timeout)
        if not ready:  # the others outlived the grace period after a failure, or after rank 0 finished
            break
        batch = []
        for sentinel in ready:
            rank = pending.pop(sentinel)
            proc = procs[rank]
            proc.join()
            if proc.exitcode != 0:
                batch.append(_Failure(rank, proc.pid, proc.exitcode, _read_report(run_dir, rank)))
            elif rank == 0:
                rank0_done = True
        # Deaths seen in one wakeup: the cause first (a hard death, or a non-communication error).
        batch.sort(key=lambda f: (f.secondary, f.report is not None, f.report["time"] if f.report else 0.0))
        failures += batch
        # Rank 0 finishes last (it writes checkpoints and the result), so only its end, or a
        # failure, starts the clock for the others.
        if deadline is None and (failures or rank0_done):
            deadline = time.monotonic() + grace_s
    if failures:
        raise _failure_error(failures, still_running=sorted(pending.values()), nprocs=len(procs), grace_s=grace_s)
    if pending:
        log.warning("DDPPlugin: rank(s) %s still running %g s after rank 0 finished were terminated",
                    ", ".join(map(str, sorted(pending.values()))), grace_s)
    if not (run_dir / _OUTCOME).exists():
        raise WorkerFailedError("DDPPlugin (torchplug-ddp): rank 0 exited cleanly but wrote no result.", 0, 0, None)


def _failure_error(failures: list[_Failure], still_running: list[int], nprocs: int,
                   grace_s: float) -> WorkerFailedError:
    failures = sorted(failures, key=lambda f: f.secondary)  # stable: a cause seen a moment later goes first
    first = failures[0]
    lines = [f"DDPPlugin (torchplug-ddp): worker {first.describe()}; the run of {nprocs} processes stopped."]
    for other in failures[1:]:
        lines.append(f"  then {other.describe()}")
    if still_running:
        ranks = ", ".join(map(str, still_running))
        lines.append(f"  rank(s) {ranks} still running {grace_s:g} s later (the process-group timeout) were terminated")
    exception = None
    if first.report is not None:
        lines.append(f"\nTraceback on rank {first.rank}:\n{first.report['traceback'].rstrip()}")
        if first.report["pickled"] is not None:
            try:
                exception = pickle.loads(first.report["pickled"])
            except Exception:
                exception = None
    return WorkerFailedError("\n".join(lines), first.rank, first.exitcode, exception)


def _stop(procs: list[multiprocessing.process.BaseProcess], wait_s: float) -> None:
    """Terminate live workers (SIGTERM: the core checkpoints and exits), then kill stragglers."""
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        proc.terminate()
    end = time.monotonic() + wait_s
    for proc in alive:
        proc.join(max(0.0, end - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


# -- in the worker ---------------------------------------------------------------------------


def _worker(rank: int, world_size: int, run_dir: str, parent_pid: int, threads: int | None) -> None:
    _exit_with_parent(parent_pid)
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
        STORE_ENV: os.path.join(run_dir, "store"),
    })
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        try:
            with open(os.path.join(run_dir, _PAYLOAD), "rb") as f:
                function = pickle.load(f)
        except Exception as exc:
            raise MisconfigurationError(
                f"DDPPlugin (torchplug-ddp): a worker could not unpickle the model, data or Trainer: "
                f"{type(exc).__name__}: {exc}. Spawned workers import every class by module path: define "
                "them in an importable module (not in a notebook or an interactive __main__), or launch "
                "with torchrun."
            ) from exc
        outcome = function()
        if rank == 0:
            tmp = os.path.join(run_dir, _OUTCOME + ".tmp")
            torch.save(outcome, tmp)
            os.replace(tmp, os.path.join(run_dir, _OUTCOME))
    except BaseException as exc:
        _write_report(Path(run_dir), rank, exc)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    # The run's result is on disk and its process group destroyed: skip the interpreter's
    # teardown, where C++ destructors of torch's distributed objects can abort the process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _write_report(run_dir: Path, rank: int, exc: BaseException) -> None:
    try:
        pickled: bytes | None = pickle.dumps(exc)
    except Exception:
        pickled = None
    report = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc), "traceback": "".join(traceback.format_exception(exc)),
        "pickled": pickled, "time": time.time(),
    }
    tmp = run_dir / f"error{rank}.pkl.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(report, f)
    os.replace(tmp, run_dir / f"error{rank}.pkl")


def _read_report(run_dir: Path, rank: int) -> dict[str, Any] | None:
    try:
        with open(run_dir / f"error{rank}.pkl", "rb") as f:
            report: dict[str, Any] = pickle.load(f)
            return report
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def _exit_with_parent(parent_pid: int) -> None:
    """Leave when the parent disappears (killed test runner, SIGKILL): never linger as an orphan
    blocked in a collective until the process-group timeout."""

    first_parent = os.getppid()  # the launching process, or the forkserver started for it

    def watch() -> None:
        while os.getppid() == first_parent and pid_alive(parent_pid):
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="torchplug-ddp-parent-watch", daemon=True).start()
