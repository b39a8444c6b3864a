"""Stopping cleanly on a signal: SIGTERM, SIGUSR2 and Ctrl-C only record a stop request, which a long loop
answers once the work in flight is committed (``extract`` on SLURM: cancel, requeue, time limit)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: Signals that stop extract cleanly: SLURM's cancel, requeue and preemption (SIGTERM), the warning before a
#: time limit that submitit asks for (SIGUSR2), Ctrl-C (SIGINT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class Stopped(Exception):
    """Stopped on a signal after committing every row written (``signum``: the signal)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


@dataclass
class StopRequest:
    """The first stop signal received while streaming, and the handlers it replaced."""

    signum: int | None = None
    previous: dict = field(default_factory=dict)

    def stopped(self, done: str) -> None:
        """Answer the request once the work is committed (``done`` says what was): hand the signal to the
        handler that was there before (submitit's: on SIGUSR2 it requeues the job and exits), then raise
        ``Stopped``."""
        name = signal.Signals(self.signum).name
        log.warning(f"{name}: stopped after committing {done}; the same command resumes from there")
        before = self.previous.get(self.signum)
        if callable(before) and before is not signal.default_int_handler:
            before(self.signum, None)
        raise Stopped(self.signum, f"stopped by {name} after committing {done}; run the same command to resume")


@contextlib.contextmanager
def graceful_stop():
    """While streaming: SIGTERM, SIGUSR2 and SIGINT only record a stop request, which the loop answers after its
    batch (rows written and committed, at most the batch in flight lost). A second Ctrl-C stops at once. Only the
    main thread can install handlers; elsewhere the signals keep their handlers."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.signum is None:
            stop.signum = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    stop.previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, before in stop.previous.items():
            signal.signal(sig, before)
