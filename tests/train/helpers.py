"""Subprocess helpers: each run is a separate process with one CPU device, like a user's run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_trainer(mode: str, workdir, data_dir: str, *args: str, cache_dir: str | None = None,
                expect_killed: bool = False, expect_failure: bool = False, stderr: bool = False,
                timeout: int = 900) -> Any:
    """The run's SUMMARY dict; (summary, stderr) with `stderr`; None when `expect_killed`; (returncode,
    stdout + stderr) when `expect_failure`."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "tests.train.runner", "--mode", mode, "--workdir", str(workdir),
           "--data_dir", data_dir, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_killed:
        assert proc.returncode == -9, f"expected SIGKILL, got rc={proc.returncode}\n{proc.stderr[-3000:]}"
        return None
    if expect_failure:
        assert proc.returncode != 0, f"expected a failure, got rc=0\n{proc.stderr[-3000:]}"
        return proc.returncode, proc.stdout + proc.stderr
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    line = [l for l in proc.stdout.splitlines() if l.startswith("SUMMARY ")][-1]
    summary = json.loads(line[len("SUMMARY "):])
    return (summary, proc.stderr) if stderr else summary


def checkpoint_state(workdir, step: int) -> dict:
    """The saved training state of `step` as {path: numpy array} (no target: read as saved)."""
    import jax
    import orbax.checkpoint as ocp
    tree = ocp.StandardCheckpointer().restore(os.path.join(str(workdir), "checkpoints", str(step), "state"))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checkpoint_meta(workdir, step: int) -> dict:
    """The trainer's JSON metadata saved with `step` (mode, preset, step; GRPO: its KL coefficient)."""
    import orbax.checkpoint as ocp
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        os.path.join(str(workdir), "checkpoints", str(step), "meta"))


def data_order(workdir) -> dict[int, list[str]]:
    """step -> record ids; a step re-run after a resume replaces the killed run's entry."""
    out = {}
    with open(os.path.join(str(workdir), "data_order.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["ids"]
    return out


def metrics(workdir) -> list[dict]:
    with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]
