"""NaN in the loss / gradients: with policy "skip" the update is dropped (parameters and optimiser
state bitwise unchanged, a message, a counter) and training goes on; with "stop" the run ends with a
message and no checkpoint of the bad step exists. Checkpoints never hold non-finite values."""
import numpy as np

from tests.train.helpers import checkpoint_state, metrics, run_trainer


def _finite(state):
    return all(np.isfinite(v).all() for v in state.values() if np.issubdtype(v.dtype, np.floating))


def test_nan_steps_are_skipped(demo_data_dir, jax_cache_dir, tmp_path):
    s = run_trainer("sft", tmp_path, demo_data_dir, "--steps", "4", "--checkpoint_every", "1",
                    "--nan_steps", "2,3", cache_dir=jax_cache_dir)
    assert s["skipped_nonfinite"] == 2
    rows = {r["step"]: r for r in metrics(tmp_path) if "loss" in r}
    assert rows[2]["loss"] == "nan" and rows[3]["loss"] == "nan"
    assert np.isfinite(rows[4]["loss"])
    s1, s2, s3, s4 = (checkpoint_state(tmp_path, k) for k in (1, 2, 3, 4))
    params = [k for k in s1 if k.startswith("['params']") or k.startswith("['opt_state']")]
    assert params
    for k in params:  # skipped updates leave parameters and Adam moments exactly as they were
        if "notfinite_count" in k or "total_notfinite" in k or "last_finite" in k:
            continue
        assert np.array_equal(s1[k], s3[k]), k
    assert any(not np.array_equal(s3[k], s4[k]) for k in params if "params" in k)  # step 4 trained
    assert all(_finite(st) for st in (s1, s2, s3, s4))


def test_nan_stops_the_run_when_asked(demo_data_dir, jax_cache_dir, tmp_path):
    import os
    import subprocess
    import sys
    from tests.train.helpers import REPO
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=jax_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train.runner", "--mode", "sft", "--workdir", str(tmp_path),
         "--data_dir", demo_data_dir, "--steps", "4", "--checkpoint_every", "1", "--nan_steps", "2",
         "--set", 'train.nonfinite_policy="stop"'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "step 2: non-finite" in proc.stderr and "nonfinite_policy='stop'" in proc.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert _finite(checkpoint_state(tmp_path, 1))
