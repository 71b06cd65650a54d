"""The main job: `python -m vlaa_jax.main --config configs/<file>.py:<preset> --workdir DIR`.

`config.mode` selects the trainer (sft, grpo) or a tool mode (eval: benchmark the model with the paper's
settings, `vlaa_jax.eval.harness.run_eval`; generate: print sampled responses). Override any field with
`--config.key=value` (e.g. `--config.train.num_steps=10`). The config is checked against the same preset
un-overridden before anything is built or compiled: a missing, unknown or ill-typed key stops the run
with a message naming it. A workdir that already holds a checkpoint resumes from it.

Stages: a GRPO config may carry a `warm_start` block, a whole SFT config (configs/grpo.py:demo). For
mode=grpo on a model started from scratch it runs first, in workdir/warm_start (resumable; skipped once
workdir/warm_start/DONE exists), and GRPO then starts from its exported model (`runs_warm_start`: never
on a pretrained model.path, nor with grpo.warm_start=False). The trainers never run each other.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from data_pipeline.records import DataError
from vlaa_jax import command_line, distributed
from vlaa_jax.command_line import CommandLineError, load_preset
from vlaa_jax.eval import harness, plots
from vlaa_jax.rewards.open_ended import ScorerError
from vlaa_jax.train import common, grpo_trainer, sft
from vlaa_jax.train.checkpointer import CheckpointMismatchError, DamagedCheckpointsError
from vlaa_jax.train.config_check import ConfigError, validate

# The user's input (config, data, workdir, a reward server that keeps failing after its retries), not a
# bug: one `error:` line and exit code 2, no traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointMismatchError, DamagedCheckpointsError, CommandLineError, ScorerError)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/grpo.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, TensorBoard events, metrics, exported model.")

RUNS_PNG = "runs.png"  # a GRPO run's curves (vlaa_jax.eval.plots, as tools/plot_run.py draws them)
WARM_START = "warm_start"  # the stage block of a GRPO config, and its sub-directory of the workdir


def check(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad key of `config` or of its warm-start stage, against the
    preset `reference` it was built from."""
    validate(config, reference)
    if WARM_START in config:
        validate(config[WARM_START], reference[WARM_START], prefix=WARM_START + ".")


def warm_start(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The SFT stage of `config` (its `warm_start` block) in workdir/warm_start: resumable like any run,
    skipped once its DONE marker exists; writes summary.json there. Returns its exported model directory."""
    sub = os.path.join(workdir, WARM_START)
    model_dir, done = os.path.join(sub, "model"), os.path.join(sub, "DONE")
    if os.path.isfile(done):
        return model_dir
    stage = config[WARM_START].copy_and_resolve_references()
    # The GRPO run's data: data.dir "" would otherwise put a second demo set in workdir/warm_start.
    stage.data.dir = common.data_dir(config, workdir)
    summary = sft.train(stage, sub, export=True, hf=False)
    if jax.process_index() == 0:
        with open(os.path.join(sub, "summary.json"), "w") as f:
            json.dump(summary, f, default=str)
        open(done, "w").close()
    return model_dir


def runs_warm_start(config: ml_collections.ConfigDict) -> bool:
    """Whether mode=grpo runs the config's warm_start stage first: only for a model started from scratch
    (model.init='tiny') and unless grpo.warm_start=False (the "GRPO only" arm). A pretrained model.path,
    e.g. an SFT run's model directory, is trained as given, never SFT-ed again on top."""
    return (WARM_START in config and config.model.init != "pretrained"
            and bool(config.grpo.get("warm_start", True)))


def starting_from(config: ml_collections.ConfigDict, model_dir: str) -> ml_collections.ConfigDict:
    """A copy of `config` whose model is loaded from `model_dir` (a vlaa-jax or HF model directory)."""
    c = config.copy_and_resolve_references()
    c.model.init, c.model.path = "pretrained", model_dir
    return c


def run(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, workdir: str) -> dict:
    """Checks `config` against its preset `reference`, then runs its stages and mode in `workdir`;
    returns the run's summary dict."""
    check(config, reference)
    # Multi-host: starts jax.distributed from VLAA_COORDINATOR_ADDRESS / VLAA_NUM_PROCESSES / VLAA_PROCESS_ID
    # or TPU / SLURM auto-detection (tools/launch_*.sh); a no-op on a single host.
    distributed.initialize(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        # Tool modes (eval, generate) may share a training run's workdir: they keep its config.json.
        name = "config.json" if config.mode in ("sft", "grpo") else f"config_{config.mode}.json"
        with open(os.path.join(workdir, name), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    if config.mode == "sft":
        return sft.train(config, workdir)
    if config.mode == "grpo":
        grpo_trainer.check_open_ended_scorer(config, workdir)  # before the warm start, not after it
        if runs_warm_start(config):  # eval / generate use the model as given
            # The GRPO run's own mesh check first: a bad rollout batch must not wait for the SFT stage.
            grpo_trainer.check_rollout_micro_batch(config, *common.run_mesh(config))
            config = starting_from(config, warm_start(config, workdir))
        elif WARM_START in config and config.model.init == "pretrained" and jax.process_index() == 0:
            print(f"no warm start: GRPO starts from model.path={config.model.path} as given (the warm_start "
                  "stage only runs for a model.init='tiny' start)")
        summary = grpo_trainer.train(config, workdir)
        if jax.process_index() == 0:  # the run's curves, next to its table
            summary["runs_png"] = plots.plot([workdir], os.path.join(workdir, RUNS_PNG))["png"]
            print(f"  curves: {summary['runs_png']}  (overlay runs: python tools/plot_run.py --workdir A "
                  "--workdir B)", flush=True)
        return summary
    if config.mode == "eval":
        return harness.run_eval(config, workdir)
    return grpo_trainer.generate_samples(config, workdir)


def main(argv) -> None:
    if len(argv) > 1:
        command_line.fail(f"unexpected arguments {argv[1:]}; give flags only ({command_line.EXAMPLE} --workdir DIR; "
                          "--help)")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    reference = load_preset(config_flags.get_config_filename(flags.FLAGS["config"]))
    try:
        summary = run(_CONFIG.value, reference, _WORKDIR.value)
    except USER_ERRORS as e:
        command_line.fail(e)
    print(json.dumps({"summary": summary}, default=str))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing after vlaa_jax.command_line's checks (config file, preset, override keys):
    a command-line mistake is one `error:` line and exit code 2; --help prints the usage and exits 0."""
    parsed = command_line.parse_config_flags(argv, usage=command_line.help_text, example=command_line.EXAMPLE)
    if not flags.FLAGS["workdir"].value:
        command_line.fail("--workdir is required: the run directory (checkpoints, metrics, the exported model)")
    return parsed


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
