"""`python -m data_pipeline.construct --config configs/construct.py:<preset> --out DIR [--stages a,b]`.

An entry point (floor 6 of docs/architecture.md, beside vlaa_jax.main): the config file is loaded by
path and its overrides (`--config.key=value`) checked against its preset by vlaa_jax.command_line, as
the main job does; a user's mistake is one `error:` line and exit code 2.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from data_pipeline.construct import pipeline
from data_pipeline.construct.client import RequestError
from data_pipeline.construct.stages import STAGES
from data_pipeline.records import DataError
from vlaa_jax import command_line
from vlaa_jax.command_line import CommandLineError

EXAMPLE = "--config configs/construct.py:local --out construct_out"
USER_ERRORS = (DataError, CommandLineError, RequestError, ValueError, OSError)

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/construct.py:<preset>", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory: stage outputs, reports, cache, the released layout.")
_STAGES = flags.DEFINE_string("stages", "", f"Comma-separated subset of {','.join(STAGES)} (default: all).")


def _usage() -> str:
    presets = ", ".join(command_line.presets(command_line.resolve_config_file("configs/construct.py")))
    return (f"usage: python -m data_pipeline.construct --config FILE.py:PRESET --out DIR [--stages {','.join(STAGES)}] "
            f"[--config.KEY=VALUE ...]\npresets: configs/construct.py: {presets}\n"
            f"example: python -m data_pipeline.construct {EXAMPLE}")


def _parse_flags(argv: list[str]) -> list[str]:
    parsed = command_line.parse_config_flags(argv, usage=_usage, example=EXAMPLE)
    try:
        pipeline.parse_stages(_STAGES.value)
    except ValueError as e:
        command_line.fail(e)
    if not _OUT.value:
        command_line.fail(f"--out is required: the output directory, e.g. {EXAMPLE}")
    return parsed


def main(argv: list[str]) -> None:
    del argv
    try:
        pipeline.run(_CONFIG.value, _OUT.value, _STAGES.value)
    except USER_ERRORS as e:
        command_line.fail(e)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
