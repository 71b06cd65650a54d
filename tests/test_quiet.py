"""vlaa_jax.quiet's filters for the reports a failed Orbax restore leaves behind: dropped inside
`orbax_restore()` and after it raised, shown before and after one that succeeded. (The end-to-end check,
a damaged checkpoint giving one error line, is tests/test_bad_cli.py.)"""
from __future__ import annotations

import asyncio
import logging
import sys
import types

import pytest

from vlaa_jax import quiet  # importing vlaa_jax installs the filters


def _closed_loop_report() -> types.SimpleNamespace:
    """What sys.unraisablehook gets when a read completes into Orbax's closed loop."""
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                     err_msg=None, object=None)
    raise AssertionError("a closed loop accepted a callback")


def _shown(monkeypatch) -> tuple[list, list]:
    """(asyncio log records that pass, unraisable reports that reach the original hook)."""
    records, reports = [], []
    handler = logging.Handler()
    handler.emit = records.append
    monkeypatch.setattr(logging.getLogger("asyncio"), "handlers", [handler])
    monkeypatch.setattr(quiet, "_stragglers_expected", False)
    monkeypatch.setattr(sys, "unraisablehook", quiet._unraisablehook(reports.append))
    return records, reports


def _report_both() -> None:
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    sys.unraisablehook(_closed_loop_report())


def test_restore_stragglers_are_dropped_only_around_a_failed_restore(monkeypatch):
    records, reports = _shown(monkeypatch)
    _report_both()
    assert len(records) == 1 and len(reports) == 1       # shown: no restore has failed
    with quiet.orbax_restore():
        pass
    _report_both()
    assert len(records) == 2 and len(reports) == 2       # still shown after a restore that succeeded
    with pytest.raises(ValueError), quiet.orbax_restore():
        _report_both()                                   # dropped while the failing restore runs
        raise ValueError("truncated chunk")
    _report_both()                                       # and after it
    logging.getLogger("asyncio").error("some other asyncio error")
    assert len(records) == 3 and len(reports) == 2
    assert records[-1].getMessage() == "some other asyncio error"
