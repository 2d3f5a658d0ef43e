"""Turning SIGTERM and SIGINT during ``fit`` into a request to stop after the current batch."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Final

__all__ = ["StopRequest"]

logger = logging.getLogger(__name__)

_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """While entered, records SIGTERM / SIGINT instead of letting them end the process.

    The training loop reads :attr:`signal` after each batch and stops cleanly when it is set. A
    second SIGINT (an impatient Ctrl-C) is not intercepted: the previous handler gets it, which
    by default raises ``KeyboardInterrupt`` at once (and with ``SIG_DFL`` ends the process). A
    signal the process ignores (``SIG_IGN``, as for a job started in the background by a
    shell script) stays ignored. Handlers can only be installed from the main thread;
    elsewhere (or when ``enabled`` is false) this does nothing.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.signal: int | None = None
        self._enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if self._enabled:
            for signum in _SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]  # what signal.signal returned
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signal is None:
            self.signal = signum
            logger.warning(
                "received %s: stopping after the current batch",
                signal.Signals(signum).name,
            )
            return
        if signum != signal.SIGINT:
            logger.warning(
                "received %s again: already stopping after the current batch (SIGINT or "
                "SIGKILL stops now)",
                signal.Signals(signum).name,
            )
            return
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)
        elif previous is signal.SIG_DFL:  # the default ends the process: let it
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
