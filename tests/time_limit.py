"""A wall-clock limit for a block of a test: a hang fails the test instead of stalling the suite."""
from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator


class Overtime(BaseException):
    """Raised into the block when its time is up. A BaseException, so that no `except Exception` of the
    code under test can take it for an error of its own (a damaged file, a failed request)."""


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Runs the block under a SIGALRM timer (main thread only) and asserts that it took under `seconds`."""
    def alarm(signum, frame):
        raise Overtime(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    except Overtime:  # a fresh error: the interrupted frame may have no line number to report
        raise AssertionError(f"still running after {seconds}s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - t0 < seconds
