"""Batches: which fields are split over the data-parallel devices and which are replicated (ONE table,
`BATCH_AXES`), and host NumPy batches -> global sharded arrays."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from vlaa_jax.sharding.mesh import check_batch_divisible
from vlaa_jax.sharding.placement import logical_sharding
from vlaa_jax.sharding.rules import RulesLike

# The fields of `models/qwen2_5_vl/layout.VisionLayout` and the rank of one image group's field beyond
# its group axis (this floor cannot import the model, so they are named here).
_VISION_LAYOUT_RANKS = (("window_index", 1), ("reverse_index", 1), ("window_segments", 1),
                        ("full_segments", 1), ("rotary_hw", 2), ("num_patches", 0), ("full_index", 2),
                        ("full_slot", 1))

# Logical names of the batch fields (design.md), the one place that decides their placement. By rank:
# a field of its entry's rank gets the entry's names; extra trailing dims are replicated; a field of
# lower rank lacks the axis its entry splits and is replicated whole. Fields not listed are split along
# their leading dim when that is the batch size (per-row values: advantages, log-probs, ...), else
# replicated.
BATCH_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "segment_ids": ("batch", "length"),
    "loss_mask": ("batch", "length"),
    "labels": ("batch", "length"),
    # SFT target positions [groups, K]: one group of rows per data-parallel shard (or one per row)
    "target_pos": ("batch", None),
    "target_valid": ("batch", None),
    "position_ids": (None, "batch", "length"),
    "image_grid_thw": (None, None),
    "loss_normalizer": (),
    # Image fields (`layout.grouped_vision`): a leading image-group axis, split like the batch rows, so
    # each device encodes its own rows' images. Without the group axis (one group: all images of the
    # batch, `layout.vision_layout`) they are one rank lower and replicated. Layout fields come as
    # `vision_<name>` (the loader's and trainers' batches) or `<name>`.
    "pixel_values": ("batch", None, None),
    **{f"{prefix}{name}": ("batch",) + (None,) * rank
       for prefix in ("vision_", "") for name, rank in _VISION_LAYOUT_RANKS},
}


def _field_axes(key: str, shape: tuple[int, ...], batch_size: int) -> tuple[str | None, ...]:
    """Logical names of one batch field of `shape` (see `BATCH_AXES`)."""
    if key in BATCH_AXES:
        names = BATCH_AXES[key]
        if len(shape) < len(names):
            return (None,) * len(shape)
    elif len(shape) >= 1 and shape[0] == batch_size:
        names = ("batch",)
    else:
        names = ()
    return tuple(names) + (None,) * (len(shape) - len(names))


def batch_axes(batch: Mapping[str, Any], batch_size: int,
               micro_batched: bool = False) -> dict[str, tuple[str | None, ...]]:
    """Logical names per batch field (`_field_axes`); micro_batched: a leading micro-batch axis, not split."""
    lead = (None,) if micro_batched else ()
    return {key: lead + _field_axes(key, np.shape(value)[len(lead):], batch_size) for key, value in batch.items()}


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules: RulesLike = None, *, batch_size: int,
                    micro_batched: bool = False) -> dict[str, NamedSharding]:
    """NamedSharding per batch field (batch-major fields split over the data-parallel axes)."""
    check_batch_divisible(batch_size, mesh, rules)
    axes = batch_axes(batch, batch_size, micro_batched)
    return {k: logical_sharding(axes[k], mesh, rules, np.shape(batch[k])) for k in batch}


def shard_batch(batch: Mapping[str, Any], shardings: Mapping[str, NamedSharding], *,
                process_local: bool = False) -> dict[str, jax.Array]:
    """Host NumPy batch -> global sharded arrays.

    process_local=False: every process holds the whole global batch; each device takes its slice.
    process_local=True: each process holds only its own rows (multi-host data loading); the global
    batch is made of every process's rows (`jax.make_array_from_process_local_data`), so fields
    without a batch axis must then be identical on every process.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        sharding = shardings[key]
        if process_local:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        else:
            out[key] = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
    return out
