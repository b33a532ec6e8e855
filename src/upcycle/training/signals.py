"""SIGTERM / SIGINT: finish the current optimizer step, save a checkpoint, exit cleanly (issue 4).

Schedulers (SLURM, Kubernetes, a notebook host about to recycle the machine) send SIGTERM some time
before SIGKILL; Ctrl-C sends SIGINT. The handler only records the request; the training loop checks it at
each step boundary (agreeing across processes), saves and returns. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """Install with ``with StopRequest() as stop:``; ``stop.signum`` is the first signal received."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        # Python only lets the main thread install handlers (a notebook cell or pytest runs there too).
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None and self.announce:
            name = signal.Signals(signum).name
            print(
                f"\nreceived {name}: saving a checkpoint after the current step, then stopping"
                + (" (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""),
                file=sys.stderr,
                flush=True,
            )
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None
