"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

One Orbax `CheckpointManager` under `workdir/checkpoints/` holds, per saved step, three items:
    state   the array tree (params, optimiser state, step, PRNG key data, KL-controller state, ...),
            saved asynchronously (arrays are copied off the devices, written in the background)
    data    the data-iterator state (Grain `get_state()`), JSON
    meta    small JSON facts: trainer step, config mode, the KL-controller coefficient (float64)
Orbax writes each step to a temporary directory and renames it when complete, so a process killed
during a save leaves the previous step as the latest loadable one; leftover temporaries are removed
at the next start (`cleanup_tmp_directories`). Model directories for inference / export are
`vlaa_jax.models.qwen2_5_vl.loading`'s business, not this module's.

Resume (`restore_newest`) takes the newest step that restores cleanly. Before any array is read it
checks the step's JSON facts against the run (mode) and its stored tree against the run's state (names,
shapes, dtypes): a mismatch is the user's workdir, not damage, and stops with a message. A step whose
files do not restore (corrupted, truncated, an empty directory) is skipped with a one-line message; once
an older step has restored, the damaged ones are moved to `workdir/damaged_checkpoints/` (never
deleted), so that later saves of the same step numbers and `max_to_keep` clean-ups cannot touch them.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import tree as ocp_tree

from vlaa_jax import quiet
from vlaa_jax.models.qwen2_5_vl.loading import short_reason

STATE, DATA, META = "state", "data", "meta"
DAMAGED_DIR = "damaged_checkpoints"  # beside checkpoints/: where damaged steps are moved, never deleted


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint belongs to another run (mode, model or optimiser config): not damage."""


class DamagedCheckpointsError(RuntimeError):
    """No checkpoint of the workdir restores; the message lists each step and why."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored step: the state tree, the data-iterator state (or None), the JSON facts, and the
    damaged newer steps that were skipped as (step, reason, where they were moved)."""

    step: int
    state: Any
    data_state: Any
    meta: dict[str, Any]
    skipped: tuple[tuple[int, str, str], ...] = ()


def _encode_iter_state(state: Any) -> dict[str, Any]:
    """Grain DataLoader iterators give bytes, dataset iterators a dict; both become JSON."""
    if isinstance(state, (bytes, bytearray)):
        return {"kind": "bytes", "value": bytes(state).decode()}
    return {"kind": "json", "value": state}


def _decode_iter_state(saved: dict[str, Any]) -> Any:
    return saved["value"].encode() if saved["kind"] == "bytes" else saved["value"]


class TrainCheckpointer:
    """Async save every N steps and at the end, keep the last K, restore the latest."""

    def __init__(self, workdir: str, *, every: int, keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(STATE, DATA, META))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int, *, last: bool) -> bool:
        return last or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: Any, *, data_state: Any, meta: dict[str, Any]) -> None:
        """Starts an async save of `state` at `step`; returns once the arrays are off the devices.

        The caller must never pass a state that contains non-finite values (the trainers check).
        """
        self.manager.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(_encode_iter_state(data_state) if data_state is not None
                                    else {"kind": "none", "value": None}),
            META: ocp.args.JsonSave(dict(meta, step=int(step))),
        }), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
        """(state, data-iterator state or None, meta) of `step` (default: the latest finalised one).

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` with shardings (or concrete arrays):
        arrays are read straight onto their devices.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalised checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract),
            DATA: ocp.args.JsonRestore(),
            META: ocp.args.JsonRestore(),
        }))
        data = restored[DATA]
        data_state = None if data["kind"] == "none" else _decode_iter_state(data)
        return restored[STATE], data_state, dict(restored[META])

    def restore_newest(self, abstract_state: Any, *, expect_meta: Mapping[str, Any],
                       is_sound: Callable[[Any], bool] = lambda state: True) -> Restored | None:
        """The newest step that restores cleanly, or None when the workdir has no checkpoint.

        expect_meta: JSON facts a step must hold (e.g. {"mode": "sft"}): checked before any array is read,
        as is the stored tree against `abstract_state`; either mismatch raises CheckpointMismatchError.
        is_sound: a check of the restored state (the trainers: all parameters finite, as saved).
        Steps that fail to restore are skipped and, once an older one restores, moved to
        `damaged_checkpoints/`; when none restores, DamagedCheckpointsError lists them all (nothing moved).
        """
        failed: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = dict(self.manager.restore(step, args=ocp.args.Composite(
                    **{META: ocp.args.JsonRestore()}))[META])
            except Exception as e:  # noqa: BLE001 - any unreadable file is damage: say which and go on
                failed.append((step, f"its {META} item does not load ({short_reason(e, 200)})"))
                continue
            self._check_meta(step, meta, expect_meta)
            try:
                self._check_tree(step, abstract_state)
                with quiet.orbax_restore():
                    state, data_state, meta = self.restore(abstract_state, step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001
                failed.append((step, f"it does not restore ({short_reason(e, 200)})"))
                continue
            if not is_sound(state):
                failed.append((step, "it restored with non-finite values (never saved so: the files are corrupt)"))
                continue
            moved = self._set_aside([s for s, _ in failed])
            return Restored(step, state, data_state, meta,
                            tuple((s, why, moved[s]) for s, why in failed))
        if failed:
            lines = "; ".join(f"step {s}: {why}" for s, why in failed)
            raise DamagedCheckpointsError(
                f"{self.directory}: no checkpoint restores ({lines}). Nothing was moved or deleted: repair the "
                f"files, or move {self.directory} aside to start this run from scratch")
        return None

    def _check_meta(self, step: int, meta: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
        for key, want in expect.items():
            if meta.get(key) != want:
                raise CheckpointMismatchError(
                    f"{self.directory}: checkpoint of step {step} was written by {key} {meta.get(key)!r}, "
                    f"this run is {want!r}: use another --workdir")

    def _check_tree(self, step: int, abstract_state: Any) -> None:
        """Names, shapes and dtypes of the stored state against the run's (reads metadata only)."""
        stored = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), STATE)).item_metadata
        if stored is None:
            raise FileNotFoundError(f"the metadata of its {STATE} item does not load")
        have = ocp_tree.to_flat_dict(stored.tree if hasattr(stored, "tree") else stored)
        want = ocp_tree.to_flat_dict(ocp_tree.serialize_tree(
            jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state), keep_empty_nodes=True))
        name = lambda k: "/".join(map(str, k))  # noqa: E731
        diffs = [f"{name(k)} is not in the checkpoint" for k in want if k not in have]
        diffs += [f"{name(k)} is not in this run's state" for k in have if k not in want]
        diffs += [f"{name(k)}: checkpoint {tuple(have[k].shape)} {have[k].dtype}, this run "
                  f"{tuple(want[k].shape)} {want[k].dtype}" for k in want if k in have and
                  (tuple(have[k].shape) != tuple(want[k].shape) or str(have[k].dtype) != str(want[k].dtype))]
        if diffs:
            raise CheckpointMismatchError(
                f"{self.directory}: checkpoint of step {step} holds another training state ({len(diffs)} "
                f"difference(s), e.g. {'; '.join(diffs[:3])}): it was written with another model or optimiser "
                "config; use another --workdir, or the config it was written with")

    def _set_aside(self, steps: list[int]) -> dict[int, str]:
        """Moves damaged step directories to damaged_checkpoints/ (process 0; the others wait)."""
        if not steps:
            return {}
        root = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
        moved = {}
        for step in steps:
            dest, k = os.path.join(root, str(step)), 0
            while os.path.exists(dest):
                k += 1
                dest = os.path.join(root, f"{step}.{k}")
            moved[step] = dest
            if jax.process_index() == 0:
                os.makedirs(root, exist_ok=True)
                shutil.move(os.path.join(self.directory, str(step)), dest)
        ocp.multihost.sync_global_processes("vlaa_jax_damaged_checkpoints_moved")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        """Blocks until the pending async save (if any) is finalised."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
