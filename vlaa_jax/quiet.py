"""Third-party log lines that tell a user nothing are dropped (installed on import of `vlaa_jax`).

Orbax warns "Skipping merge of OCDBT checkpoints" on every single-process save, convert and export, and
TFDS warns "Variant folder ... has no dataset_info.json" for a dataset it has not yet built (ours, built
from local files a moment later), and Orbax warns "Metadata file does not exist" on every resume (a
checkpoint of ours has no _CHECKPOINT_METADATA file; the restore does not need it). All go through absl
logging; a filter on its logger drops them and nothing else. After a restore fails on a damaged checkpoint (`orbax_restore`), the reads still in flight
report themselves, dozens of tracebacks after our one-line error: those are dropped too.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from absl import logging as absl_logging

# Start of the format string of each dropped message (the record's `msg`, before % arguments).
NOISE = ("[process=%s][thread=%s] Skipping merge of OCDBT checkpoints", "Variant folder %s has no ",
         "Metadata file does not exist: %s")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(NOISE))


_stragglers_expected = False  # inside `orbax_restore()`, and for good once one failed


@contextlib.contextmanager
def orbax_restore() -> Iterator[None]:
    """Around an Orbax restore. When it fails (a damaged checkpoint), the reads still in flight fail or
    complete after Orbax gave up and closed its event loop, and asyncio / tensorstore report each one,
    dozens of tracebacks around our one-line error, from other threads and from the moment the first
    read fails. Inside this block, and for good once it raised, those two reports are dropped: asyncio's
    "Task exception was never retrieved" and "Event loop is closed" from a `call_soon_threadsafe` callback
    (an unraisable exception). A restore that succeeds leaves no such reports and switches the filter back."""
    global _stragglers_expected
    before, _stragglers_expected = _stragglers_expected, True
    yield
    _stragglers_expected = before


def _is_closed_loop_straggler(unraisable) -> bool:
    value, tb = unraisable.exc_value, unraisable.exc_traceback
    if not (_stragglers_expected and isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
        return False
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def _unraisablehook(hook):
    def quiet_hook(unraisable):
        if not _is_closed_loop_straggler(unraisable):
            hook(unraisable)
    quiet_hook.vlaa_quiet = True
    return quiet_hook


class _DropRestoreStragglers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_stragglers_expected and record.getMessage().startswith("Task exception was never retrieved"))


def install() -> None:
    """Adds the filters to absl's and asyncio's loggers and to sys.unraisablehook (once each)."""
    logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropRestoreStragglers) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropRestoreStragglers())
    if not getattr(sys.unraisablehook, "vlaa_quiet", False):
        sys.unraisablehook = _unraisablehook(sys.unraisablehook)
