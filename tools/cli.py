"""What the command-line tools share: bad input ends a tool with one `error:` line on stderr and exit code 2.

A user's mistake (a missing or damaged file, a config of another model, an unknown image) is told in
the words of the error that names it; a traceback would only hide that line. Bugs are other exception
types and keep their traceback.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from vlaa_jax.command_line import fail  # the one `error:` line, exit code 2

# Errors of bad input: missing / unreadable files and directories (OSError), a missing tensor or key
# (KeyError), bad values and damaged files (ValueError: DataError, BenchmarkError, JSON errors included).
USER_ERRORS = (OSError, KeyError, ValueError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns USER_ERRORS raised inside into `fail`."""
    try:
        yield
    except USER_ERRORS as e:
        fail(e)
