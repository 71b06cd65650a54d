"""Damaged checkpoints, table-driven: resume takes the newest step that restores cleanly, says which
damaged steps it skipped and why, and keeps them (moved to damaged_checkpoints/, byte for byte); a
checkpoint of another run (mode, state tree) stops before any array is read.

The table runs on `TrainCheckpointer` in this process (a small state, steps 1..3); two end-to-end runs
check the trainers (slow: separate processes, minutes): an SFT resume past two damaged steps is bitwise
the straight run, and a GRPO run in an SFT workdir stops with the project's own message.
"""
from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.time_limit import within
from tests.train.helpers import checkpoint_state, data_order, run_trainer
from vlaa_jax.train.checkpointer import (DAMAGED_DIR, CheckpointMismatchError, DamagedCheckpointsError,
                                         TrainCheckpointer)

LIMIT_S = 60.0


def _state(step: int) -> dict:
    return {"params": {"w": jnp.arange(12.0).reshape(3, 4) + step, "b": jnp.ones(4) * step},
            "rng": jnp.full((2,), step, jnp.uint32)}


def _sound(state) -> bool:
    return bool(all(jnp.isfinite(x).all() for x in jax.tree.leaves(state["params"])))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A workdir with finalised checkpoints of steps 1, 2, 3 (mode 'sft'), and one with NaN params at 3."""
    root = tmp_path_factory.mktemp("ckpts")
    for name, bad_last in (("good", False), ("nan_last", True)):
        ck = TrainCheckpointer(str(root / name), every=1, keep=10)
        for s in (1, 2, 3):
            st = _state(s)
            if bad_last and s == 3:
                st["params"]["w"] = st["params"]["w"].at[0, 0].set(jnp.nan)
            ck.save(s, st, data_state={"pos": s}, meta={"mode": "sft"})
        ck.close()
    return root


def _files(step_dir: str, pattern: str) -> list[str]:
    found = glob.glob(os.path.join(step_dir, pattern), recursive=True)
    assert found, (step_dir, pattern)
    return found


def _truncate(step_dir: str, pattern: str) -> None:
    for p in _files(step_dir, pattern):
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)


def _overwrite(step_dir: str, pattern: str, data: bytes) -> None:
    for p in _files(step_dir, pattern):
        with open(p, "wb") as f:
            f.write(data)


def _flip(step_dir: str, pattern: str) -> None:
    for p in _files(step_dir, pattern):
        b = bytearray(open(p, "rb").read())
        for i in range(0, len(b), 5):
            b[i] ^= 0xFF
        open(p, "wb").write(bytes(b))


def _empty(step_dir: str) -> None:
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


CHUNKS = "state/**/d/*"
# damage -> (what it does to the step directory, words of the reason)
DAMAGE: dict[str, tuple[Callable[[str], None], str]] = {
    "empty_step_dir": (_empty, "meta item does not load"),
    "meta_not_utf8": (lambda d: _overwrite(d, "meta/metadata", b"\xff\xfe\x00garbage"), "meta item does not load"),
    "meta_truncated": (lambda d: _truncate(d, "meta/metadata"), "meta item does not load"),
    "meta_missing": (lambda d: shutil.rmtree(os.path.join(d, "meta")), "meta item does not load"),
    "data_truncated": (lambda d: _truncate(d, "data/metadata"), "does not restore"),
    "data_missing": (lambda d: shutil.rmtree(os.path.join(d, "data")), "does not restore"),
    "state_chunks_truncated": (lambda d: _truncate(d, CHUNKS), "does not restore"),
    "state_chunks_zero_bytes": (lambda d: _overwrite(d, CHUNKS, b""), "does not restore"),
    "state_chunks_flipped": (lambda d: _flip(d, CHUNKS), "does not restore"),
    "state_metadata_truncated": (lambda d: _truncate(d, "state/_METADATA"), "does not restore"),
    "state_metadata_missing": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")), "does not restore"),
    "state_manifest_zero_bytes": (lambda d: _overwrite(d, "state/**/manifest.ocdbt", b""), "does not restore"),
    "state_missing": (lambda d: shutil.rmtree(os.path.join(d, "state")), "does not restore"),
}


def _copy(saved: Path, tmp_path: Path, name: str = "good") -> tuple[str, str]:
    wd = str(tmp_path / "wd")
    shutil.copytree(saved / name, wd)
    return wd, os.path.join(wd, "checkpoints")


def _snapshot(path: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def _restore(wd: str, **kw):
    ck = TrainCheckpointer(wd, every=1, keep=10)
    try:
        with within(LIMIT_S):
            return ck.restore_newest(_state(0), expect_meta=kw.pop("expect_meta", {"mode": "sft"}),
                                     is_sound=_sound, **kw), ck
    finally:
        ck.close()


def _assert_state(restored, step: int) -> None:
    assert restored.step == step and restored.meta["step"] == step and restored.data_state == {"pos": step}
    want = _state(step)
    for k in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(restored.state["params"][k]), np.asarray(want["params"][k]))


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_latest_step_falls_back_and_is_kept(saved, tmp_path, name):
    damage, words = DAMAGE[name]
    wd, ckdir = _copy(saved, tmp_path)
    damage(os.path.join(ckdir, "3"))
    before = _snapshot(os.path.join(ckdir, "3"))
    restored, ck = _restore(wd)
    _assert_state(restored, 2)
    [(step, why, moved)] = restored.skipped
    assert step == 3 and words in why and "\n" not in why and len(why) < 400, why
    assert moved == os.path.join(wd, DAMAGED_DIR, "3")
    assert _snapshot(moved) == before  # kept byte for byte, never deleted
    assert sorted(os.listdir(ckdir)) == ["1", "2"]


def test_non_finite_restored_state_is_damage(saved, tmp_path):
    wd, _ = _copy(saved, tmp_path, "nan_last")
    restored, _ = _restore(wd)
    _assert_state(restored, 2)
    assert [(s, "non-finite" in why) for s, why, _ in restored.skipped] == [(3, True)]


def test_two_damaged_steps_are_both_named_and_kept(saved, tmp_path):
    wd, ckdir = _copy(saved, tmp_path)
    _empty(os.path.join(ckdir, "3"))
    _truncate(os.path.join(ckdir, "2"), CHUNKS)
    restored, _ = _restore(wd)
    _assert_state(restored, 1)
    assert [s for s, _, _ in restored.skipped] == [3, 2]
    assert sorted(os.listdir(os.path.join(wd, DAMAGED_DIR))) == ["2", "3"]


def test_nothing_restores_lists_every_step_and_moves_nothing(saved, tmp_path):
    wd, ckdir = _copy(saved, tmp_path)
    for s in ("1", "2", "3"):
        _truncate(os.path.join(ckdir, s), CHUNKS)
    before = _snapshot(ckdir)
    with pytest.raises(DamagedCheckpointsError) as e:
        _restore(wd)
    msg = str(e.value)
    assert all(f"step {s}:" in msg for s in (1, 2, 3)) and ckdir in msg and "Nothing was moved" in msg
    assert _snapshot(ckdir) == before and not os.path.exists(os.path.join(wd, DAMAGED_DIR))


@pytest.mark.parametrize("newest_damaged", [False, True], ids=["intact", "newest_damaged"])
def test_another_mode_stops_before_any_array_is_read(saved, tmp_path, monkeypatch, newest_damaged):
    wd, ckdir = _copy(saved, tmp_path)
    if newest_damaged:
        _empty(os.path.join(ckdir, "3"))
    before = _snapshot(ckdir)
    monkeypatch.setattr(TrainCheckpointer, "restore", lambda *a, **kw: pytest.fail("restore was called"))
    with pytest.raises(CheckpointMismatchError, match=r"step \d was written by mode 'sft', this run is 'grpo': "
                                                      r"use another --workdir"):
        _restore(wd, expect_meta={"mode": "grpo"})
    assert _snapshot(ckdir) == before  # a mismatch is not damage: nothing moved


@pytest.mark.parametrize("change,words", [
    (lambda s: {**s, "opt_state": jnp.zeros(3)}, "opt_state is not in the checkpoint"),
    (lambda s: {"params": s["params"]}, "rng is not in this run's state"),
    (lambda s: {**s, "params": {**s["params"], "w": jnp.zeros((4, 4))}},
     "params/w: checkpoint (3, 4) float32, this run (4, 4)"),
    (lambda s: {**s, "rng": jnp.zeros((2,), jnp.int32)}, "rng: checkpoint (2,) uint32, this run (2,) int32"),
], ids=["extra_item", "missing_item", "other_shape", "other_dtype"])
def test_another_state_tree_stops_with_its_differences(saved, tmp_path, monkeypatch, change, words):
    wd, ckdir = _copy(saved, tmp_path)
    before = _snapshot(ckdir)
    monkeypatch.setattr(TrainCheckpointer, "restore", lambda *a, **kw: pytest.fail("restore was called"))
    ck = TrainCheckpointer(wd, every=1, keep=10)
    with pytest.raises(CheckpointMismatchError, match="another model or optimiser config") as e, within(LIMIT_S):
        ck.restore_newest(change(_state(0)), expect_meta={"mode": "sft"})
    ck.close()
    assert words in str(e.value) and "step 3" in str(e.value)
    assert _snapshot(ckdir) == before


def test_empty_workdir_restores_nothing(tmp_path):
    restored, _ = _restore(str(tmp_path / "fresh"))
    assert restored is None


def test_after_fallback_the_step_is_saved_again_and_old_damage_is_kept(saved, tmp_path):
    """Saving the damaged step's number again, and max_to_keep clean-ups, leave the damaged copies alone;
    a second damaged copy of one step gets its own name."""
    wd, ckdir = _copy(saved, tmp_path)
    _empty(os.path.join(ckdir, "3"))
    _restore(wd)
    ck = TrainCheckpointer(wd, every=1, keep=2)
    for s in (3, 4, 5):
        ck.save(s, _state(s), data_state={"pos": s}, meta={"mode": "sft"})
    ck.close()
    assert sorted(os.listdir(ckdir)) == ["4", "5"]
    _empty(os.path.join(ckdir, "5"))
    restored, _ = _restore(wd)
    _assert_state(restored, 4)
    assert sorted(os.listdir(os.path.join(wd, DAMAGED_DIR))) == ["3", "5"]
    shutil.copytree(os.path.join(wd, DAMAGED_DIR, "5"), os.path.join(ckdir, "5"))  # damaged again
    restored, _ = _restore(wd)
    assert restored.skipped[0][2] == os.path.join(wd, DAMAGED_DIR, "5.1")


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_sft_resume_past_damaged_steps_is_bitwise_the_straight_run(demo_data_dir, jax_cache_dir, tmp_path):
    """Straight: 3 steps, a checkpoint each. Damaged: a copy whose step 3 has truncated array files and
    whose step 2 is an empty directory. Its rerun resumes from step 1 (naming both), trains 2..3 again,
    and ends with A's step-3 state and data order, bit for bit; the damaged steps are kept."""
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    def run(wd, **kw):
        return run_trainer("sft", wd, demo_data_dir, "--steps", "3", "--checkpoint_every", "1",
                           cache_dir=jax_cache_dir, **kw)
    run(straight)
    shutil.copytree(straight, damaged)  # with its data_order.jsonl: a rerun's steps replace their entries
    _truncate(str(damaged / "checkpoints" / "3"), CHUNKS)
    _empty(str(damaged / "checkpoints" / "2"))
    s, stderr = run(damaged, stderr=True)
    assert s["resumed_from"] == 1
    lines = [l for l in stderr.splitlines() if "is damaged" in l]
    assert len(lines) == 2 and "step 3" in lines[0] and "step 2" in lines[1], lines
    assert all(DAMAGED_DIR in l and "skipped" in l for l in lines)
    assert sorted(os.listdir(damaged / DAMAGED_DIR)) == ["2", "3"]
    a, b = checkpoint_state(straight, 3), checkpoint_state(damaged, 3)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert data_order(straight) == data_order(damaged)


@pytest.mark.slow
def test_grpo_run_in_an_sft_workdir_stops_with_the_projects_message(saved, demo_data_dir, jax_cache_dir, tmp_path):
    """The workdir's checkpoints are mode 'sft' and hold a tree unlike GRPO's: the mode check must come
    first (a tree check or Orbax would stop with another message)."""
    wd = tmp_path / "sft"
    shutil.copytree(saved / "good", wd)
    before = _snapshot(str(wd / "checkpoints"))
    rc, out = run_trainer("grpo", wd, demo_data_dir, "--steps", "2", "--toy_reward", cache_dir=jax_cache_dir,
                          expect_failure=True)
    assert rc != 0 and "CheckpointMismatchError" in out
    assert "was written by mode 'sft', this run is 'grpo': use another --workdir" in out
    assert "orbax" not in out.split("Traceback")[-1].lower(), out[-3000:]  # stopped before Orbax read arrays
    assert _snapshot(str(wd / "checkpoints")) == before
