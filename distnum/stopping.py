"""Stop requests: Ctrl-C (SIGINT) and SIGTERM end a run at a step boundary, never halfway.

Standard library only, so that the distnum command can install the handlers before its
heavy imports (numpy, numba, Ray take seconds), and a signal during them is not fatal.
"""

from __future__ import annotations

import signal
import threading


def install(number: int, handler):
    """signal.signal(number, handler), with the system calls it interrupts restarted: the
    handlers here only set a flag, and C extensions (Ray's C++, numba's) expect to go on
    rather than fail with EINTR. Returns the handler it replaces."""
    previous = signal.signal(number, handler)
    if callable(handler):
        signal.siginterrupt(number, False)
    return previous


class StopRequests:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop at the next step boundary, so that no
    Ray call is cut in half and a checkpoint can be written; a second one stops at once.
    Held from the start of a run until its outputs are written."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = install(number, self.request)
                outer = getattr(self.previous[number], "__self__", None)
                if isinstance(outer, StopRequests) and outer.signal_name:  # the CLI's
                    self.signal_name = outer.signal_name
        return self

    def request(self, number: int, frame: object) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
