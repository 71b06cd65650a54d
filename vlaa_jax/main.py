"""The main job: `python -m vlaa_jax.main --config configs/<file>.py:<preset> --workdir DIR`.

`config.mode` selects the trainer (sft, grpo) or a tool mode (eval: benchmark the model with the paper's
settings, `vlaa_jax.eval.run_eval`; generate: print sampled responses). Override any field with `--config.key=value`
(e.g. `--config.train.num_steps=10`). The config is checked before anything is built or compiled:
a missing, unknown or ill-typed key stops the run with a message naming it. A workdir that already
holds a checkpoint resumes from it.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/grpo.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, TensorBoard events, metrics, exported model.")


def run(config, workdir: str) -> dict:
    """Validates `config` and runs its mode in `workdir`; returns the run's summary dict."""
    from vlaa_jax.train import config_check
    config_check.validate(config)
    # Multi-host: starts jax.distributed from VLAA_COORDINATOR_ADDRESS / VLAA_NUM_PROCESSES / VLAA_PROCESS_ID
    # or TPU / SLURM auto-detection (tools/launch_*.sh); a no-op on a single host.
    from vlaa_jax import distributed
    distributed.initialize(config)
    import jax
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        # Tool modes (eval, generate) may share a training run's workdir: they keep its config.json.
        name = "config.json" if config.mode in ("sft", "grpo") else f"config_{config.mode}.json"
        with open(os.path.join(workdir, name), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    if config.mode == "sft":
        from vlaa_jax.train import sft
        return sft.train(config, workdir)
    if config.mode == "grpo":
        from vlaa_jax.train import grpo
        return grpo.train(config, workdir)
    if config.mode == "eval":
        from vlaa_jax.eval import run_eval
        return run_eval(config, workdir)
    from vlaa_jax.train import grpo
    return grpo.generate_samples(config, workdir)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/grpo.py:demo")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    from vlaa_jax.train.config_check import ConfigError
    try:
        summary = run(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"summary": summary}, default=str))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad `--config.key=value` override reported as one clean line."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - any parse / config-file error ends here, as one line
        msg = str(e).replace("\\n", " ").replace("\n", " ")
        print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
