"""Start N worker processes on this machine, watch them, and bring rank 0's result back.

The fit function is pickled once into a private temporary folder with the plain pickler (never
multiprocessing's, which would put the model's tensors in shared memory and let every rank
step the same storage). Each worker reads it, sets the torchrun-style rank variables plus the
path of a ``FileStore`` in that folder (no TCP port is ever chosen), and runs it. Rank 0
``torch.save``\\ s its :class:`~torchplug.FitOutcome` there; a worker that raises writes its
exception and traceback there and exits with code 1.

A script that calls ``fit`` at import time, without an ``if __name__ == "__main__":`` guard,
would call it again in every worker: spawn re-imports the main script there. The worker sees
that it is still starting (multiprocessing's bootstrap) when ``fit`` asks for workers, reports
:class:`MainGuardError` (the two-line fix) and exits; the launcher raises it first.

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

#: The run folder, set in the launcher while it starts workers: a worker that fails while it is
#: still starting (re-importing the main script) reports there.
RUN_DIR_ENV = "TORCHPLUG_DDP_RUN_DIR"
_PROCESS_NAME = "torchplug-ddp-rank"

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


class MainGuardError(MisconfigurationError):
    """``fit`` ran again in a spawned worker while it re-imported the main script: the script
    calls ``fit`` at import time, without an ``if __name__ == "__main__":`` guard."""


def main_guard_message(nprocs: int | None = None) -> str:
    """What happened and the two-line fix, naming the script and the line that called fit."""
    main = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
    script = getattr(main, "__file__", None) or "your script"
    call, code = "", ""
    for frame in reversed(traceback.extract_stack()):
        if script != "your script" and os.path.abspath(frame.filename) == os.path.abspath(script):
            code = (frame.line or "").strip()
            call = f"line {frame.lineno}: {code}"
            break
    what = f"devices={nprocs}" if nprocs else "devices=N"
    shown = f"{script}, {call}" if call else script
    fit_line = code if code.endswith(")") and "fit(" in code else "trainer.fit(...)"
    return (
        f"DDPPlugin (torchplug-ddp): {shown} calls Trainer.fit when the script is imported. {what} starts "
        "worker processes with multiprocessing, and each worker imports the main script again, so every "
        "worker called fit again instead of training. Put the fit call under a main guard:\n\n"
        '    if __name__ == "__main__":\n'
        f"        {fit_line}\n\n"
        "(indent the fit call, and what uses its results, under that line; classes, functions and data may "
        "stay at module level)."
    )


def _bootstrapping() -> bool:
    """True while this process is a spawned child still importing the main script (multiprocessing
    sets ``_inheriting`` for that phase; ``Process.start`` would refuse to run then)."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _refuse_unguarded_main(nprocs: int) -> None:
    """Called by ``run_workers`` in a spawned child that is still starting: the main script calls
    fit at import. Report it to the launcher (the run folder is in the environment) and leave
    quietly; elsewhere, raise it."""
    error = MainGuardError(main_guard_message(nprocs))
    run_dir = os.environ.get(RUN_DIR_ENV)
    name = multiprocessing.current_process().name
    if run_dir and name.startswith(_PROCESS_NAME) and name[len(_PROCESS_NAME):].isdigit():
        rank = int(name[len(_PROCESS_NAME):])
        try:
            _write_report(Path(run_dir), rank, error)
        except OSError:
            raise error from None
        print(f"torchplug-ddp: worker rank {rank} stopped: the main script calls fit without an "
              "`if __name__ == \"__main__\":` guard (the launcher reports it).", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    raise error


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

    @property
    def main_guard(self) -> bool:
        return self.report is not None and self.report["type"].endswith("MainGuardError")

    def describe(self, same_as: _Failure | None = None) -> str:
        where = f"rank {self.rank} (pid {self.pid})"
        if self.report is not None:
            if same_as is not None and same_as.report is not None \
                    and (same_as.report["type"], same_as.report["message"]) == (self.report["type"],
                                                                               self.report["message"]):
                return f"{where} raised the same {self.report['type']}"
            return f"{where} raised {self.report['type']}: {self.report['message']}"
        if self.exitcode is not None and self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"{where} was killed by {name}"
        if self.exitcode == 1:
            # Python's status for an uncaught exception: torchplug's worker code reports every
            # exception it sees, so this one came before it ran (while multiprocessing started the
            # worker and imported the main script again), or from os._exit(1).
            return (f"{where} exited with code 1 before torchplug's worker code could report an exception: it "
                    "failed while multiprocessing started it and imported the main script again (its traceback "
                    "is on stderr above), or called os._exit(1)")
        return (f"{where} exited with code {self.exitcode} without a Python exception "
                "(os._exit, a crash in native code, or the out-of-memory killer)")


def run_workers(function: Callable[[], Any], nprocs: int, *, start_method: str, grace_s: float,
                threads_per_worker: int | None) -> Any:
    """Run ``function`` in ``nprocs`` new processes and return what rank 0's call returned."""
    if _bootstrapping():
        _refuse_unguarded_main(nprocs)
    run_dir = Path(tempfile.mkdtemp(prefix="torchplug-ddp-"))
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        _write_payload(function, run_dir / _PAYLOAD)
        context: Any = multiprocessing.get_context(start_method)
        with _environment(RUN_DIR_ENV, str(run_dir)):
            for rank in range(nprocs):
                proc = context.Process(
                    target=_worker, args=(rank, nprocs, str(run_dir), os.getpid(), threads_per_worker),
                    name=f"{_PROCESS_NAME}{rank}",
                )
                try:
                    proc.start()
                except RuntimeError as exc:
                    if "bootstrapping phase" in str(exc):  # multiprocessing's own check, in a starting child
                        raise MainGuardError(main_guard_message(nprocs)) from exc
                    raise
                procs.append(proc)
        with _sigterm_stops_workers(procs):
            _watch(procs, run_dir, grace_s)
        return torch.load(run_dir / _OUTCOME, weights_only=False)  # our own file, written by rank 0
    finally:
        _stop(procs, wait_s=max(5.0, grace_s))
        shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` while the workers start (spawned children inherit it)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


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
    # Stable: a cause seen a moment later goes first; a missing main guard before anything else.
    failures = sorted(failures, key=lambda f: (not f.main_guard, f.secondary))
    first = failures[0]
    if first.main_guard and first.report is not None:
        lines = [f"{first.report['message']}\n\nworker rank {first.rank} (pid {first.pid}) stopped; the run of "
                 f"{nprocs} processes did not start training."]
    else:
        lines = [f"DDPPlugin (torchplug-ddp): worker {first.describe()}; the run of {nprocs} processes stopped."]
    for other in failures[1:]:
        lines.append(f"  then {other.describe(same_as=first)}")
    if still_running:
        ranks = ", ".join(map(str, still_running))
        lines.append(f"  rank(s) {ranks} still running {grace_s:g} s later (the process-group timeout) were terminated")
    exception = None
    if first.report is not None and not first.main_guard:
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
