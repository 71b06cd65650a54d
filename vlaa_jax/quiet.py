"""Third-party log lines that tell a user nothing are dropped (installed on import of `vlaa_jax`).

Orbax warns "Skipping merge of OCDBT checkpoints" on every single-process save, convert and export, and
TFDS warns "Variant folder ... has no dataset_info.json" for a dataset it has not yet built (ours, built
from local files a moment later). Both go through absl logging; a filter on its logger drops them and
nothing else.
"""
from __future__ import annotations

import logging

from absl import logging as absl_logging

# Start of the format string of each dropped message (the record's `msg`, before % arguments).
NOISE = ("[process=%s][thread=%s] Skipping merge of OCDBT checkpoints", "Variant folder %s has no ")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(NOISE))


def install() -> None:
    """Adds the filter to absl's logger (once)."""
    logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())
