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
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE, DATA, META = "state", "data", "meta"


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

    def wait(self) -> None:
        """Blocks until the pending async save (if any) is finalised."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
