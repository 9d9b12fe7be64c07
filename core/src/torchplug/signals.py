"""Stopping on SIGTERM and Ctrl-C at the end of the current optimizer step."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any


class StopRequest:
    """While entered, SIGTERM and SIGINT (where their handlers are Python's defaults) request a
    stop at the end of the current optimizer step (:attr:`requested`, :meth:`check`); a second
    signal, or any signal in a multi-process run (ranks would stop at different steps), raises
    ``KeyboardInterrupt`` at once. Once the run is ending (:attr:`stopping`: the checkpoint on
    interrupt, ``on_exception``, teardown), two further signals are ignored so the cleanup
    completes (a launcher that sends SIGTERM to workers that are already stopping must not cut
    their teardown short); a third aborts it. Outside the main thread it does nothing.

    :param multi_process: tells, when a signal arrives, whether the run has several processes.
    """

    def __init__(self, multi_process: Callable[[], bool]) -> None:
        self._multi_process = multi_process
        #: the first signal received, once one was
        self.requested: int | None = None
        #: the run is ending: signals no longer interrupt it
        self.stopping = False
        self._ignored = 0
        self._previous: dict[int, Any] = {}

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a stop was requested."""
        if self.requested is not None:
            raise KeyboardInterrupt(f"stopped by {signal.Signals(self.requested).name}")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            self._ignored += 1
            if self._ignored >= 3:  # a cleanup that hangs can still be cut short
                raise KeyboardInterrupt(f"stopped by {name} during cleanup")
            print(f"torchplug: {name} received while stopping; finishing the checkpoint and teardown",
                  file=sys.stderr, flush=True)
            return
        if self.requested is not None or self._multi_process():
            raise KeyboardInterrupt(f"stopped by {name}")
        self.requested = signum
        print(f"torchplug: {name} received, stopping after the current step (send it again to stop now)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
            for signum, default in defaults.items():
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
