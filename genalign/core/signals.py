"""Stopping a run cleanly on SIGTERM (schedulers' pre-emption) and SIGINT (Ctrl-C)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class StopSignals:
    """While installed, the first SIGTERM / SIGINT only records itself in ``received`` (the run
    finishes its step, saves a checkpoint and stops); a second one stops at once. Installed only in
    the main thread (Python's rule), and not for a signal the process ignores (SIGINT in a shell
    script's background job stays ignored). ``announce`` is told of each first signal."""

    def __init__(self, announce: Callable[[str], None] = print):
        self.announce = announce
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _request_stop(self, number: int, frame: Any) -> None:
        self.received = number
        signal.signal(number, signal.SIG_DFL if number == signal.SIGTERM else signal.default_int_handler)
        self.announce(f"\n{signal.Signals(number).name}: saving a checkpoint after this step, then stopping "
                      "(send it again to stop at once)")

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._request_stop)
                              for number in (signal.SIGTERM, signal.SIGINT)
                              if signal.getsignal(number) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
