"""Host model inputs of GRPO prompts: the loader's `PromptBatch` and the one rule that lays out any subset of
its rows (optionally followed by responses) for the model.

A rollout batch is laid out several times, each time for other rows: per rollout generate call (prompts
only) and per update micro-batch (prompts + sampled responses, rows in shuffled order). `PromptBatch` keeps
the per-row pieces the loader produced (tokens, M-RoPE positions, each image's patches), and `rows()`
builds the batch of any rows from them: the images as image groups (`layout.grouped_vision`), padded to
the pixel buckets of the data package (`buckets.pixel_buckets`, a bounded set of compiled shapes).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipeline import buckets
from vlaa_jax.models.qwen2_5_vl import layout
from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig

# The record fields the rewards read (vlaa_jax.rewards.mixed), carried per prompt from the loader.
RECORD_KEYS = ("id", "source", "question", "ground_truth", "verifier_type")
PATCH_MULTIPLE = 64  # patches per image group are rounded to this when no pixel bucket applies


def round_up(n: int, multiple: int = 32) -> int:
    """n rounded up to a multiple (at least one multiple): one compiled shape per bucket."""
    return max(multiple, -(-int(n) // multiple) * multiple)


def grouped_vision_fields(pixel_values: np.ndarray, grid: np.ndarray, image_group: np.ndarray, groups: int,
                          mcfg: Qwen25VLConfig, *, num_patches: int | None = None,
                          full_rows: bool | tuple[int, int] = False) -> dict[str, np.ndarray]:
    """`pixel_values` [G, num_patches, patch_dim] and the `vision_*` layout fields [G, ...] of the images
    (flat real patches + grids, in image order) split into `groups` image groups (`layout.grouped_vision`)."""
    v = mcfg.vision
    pv, lay = layout.grouped_vision(
        pixel_values, grid, image_group, groups, patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
        window_size=v.window_size, num_patches_padded=num_patches, full_rows=full_rows)
    return {"pixel_values": pv.astype(np.float32),
            **{f"vision_{k}": np.asarray(x) for k, x in lay._asdict().items() if x is not None}}


def patch_bucket(patches: int, rows: int, max_pixels: int, vision: Any) -> int:
    """Pixel rows of an image group of `rows` one-image rows holding `patches` patches: the loader's pixel
    buckets for that many rows (worst case / 8, / 4, / 2, / 1), so a run compiles its generate / forward /
    update for at most four pixel shapes (rounding to multiples of 64 gave up to worst / 64 shapes)."""
    table = buckets.pixel_buckets(rows, max_pixels, vision)
    if patches > table[-1]:  # images larger than data.max_pixels (not from this config's loader)
        return round_up(patches, PATCH_MULTIPLE)
    return buckets.pick_bucket(patches, table, "image group pixel rows")


def one_image_rows(max_patches: int, rows: int, patches: int) -> tuple[int, int] | bool:
    """Per-image full-attention rows of one shape for every image group of `rows` one-image rows (none over
    `max_patches` patches): (rows, power of two >= max_patches), or False (dense) where that is no cheaper
    than attending over all `patches` slots of the group."""
    lr = layout.row_length(max_patches)
    return (rows, lr) if rows * lr * lr < patches * patches else False


@dataclasses.dataclass(frozen=True)
class GroupShape:
    """The image-group shape of a batch: `groups` groups of `patches` slots, full-attention rows."""
    groups: int
    patches: int
    full_rows: tuple[int, int] | bool


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """A loader GRPO batch kept per row (one image per prompt, as VLAA-Thinking has): the hand-off from the
    data pipeline to the rollout. Produced once per step by `from_loader`; `rows()` lays out any rows."""
    input_ids: np.ndarray       # [B, Lp] left-padded
    attention_mask: np.ndarray  # [B, Lp]
    position_ids: np.ndarray    # [3, B, Lp] M-RoPE positions
    rope_deltas: np.ndarray     # [B, 1]
    patches: tuple              # B arrays [p_b, patch_dim]
    grids: np.ndarray           # [B, 3] (t, h, w) patches of each image
    records: tuple              # B dicts for the rewards (RECORD_KEYS)
    image_hw: tuple             # B (original_hw, resized_hw), for box rewards
    max_pixels: int             # the loader's data.max_pixels: sets the pixel buckets

    @classmethod
    def from_loader(cls, batch: Mapping[str, Any], max_pixels: int) -> "PromptBatch":
        b = int(np.asarray(batch["example_mask"]).sum())
        grids = np.asarray(batch["image_grid_thw"])[:b]
        sizes = np.prod(grids, axis=1)
        if (sizes <= 0).any():
            raise ValueError("GRPO prompts need exactly one image each (a prompt without image was found)")
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        pv = np.asarray(batch["pixel_values"])
        return cls(input_ids=np.asarray(batch["input_ids"])[:b], attention_mask=np.asarray(batch["attention_mask"])[:b],
                   position_ids=np.asarray(batch["position_ids"])[:, :b], rope_deltas=np.asarray(batch["rope_deltas"])[:b],
                   patches=tuple(pv[offsets[i]:offsets[i + 1]] for i in range(b)), grids=grids,
                   records=tuple({k: batch[k][i] for k in RECORD_KEYS} for i in range(b)),
                   image_hw=tuple((tuple(batch["image_hw"][i]), tuple(batch["resized_hw"][i])) for i in range(b)),
                   max_pixels=int(max_pixels))

    def __len__(self) -> int:
        return len(self.input_ids)

    def max_patches(self) -> int:
        return max(len(p) for p in self.patches)

    def group_shape(self, src: np.ndarray, groups: int, mcfg: Qwen25VLConfig) -> GroupShape:
        """The smallest image-group shape that holds the rows `src` in `groups` groups (one pixel bucket
        for their row count): a generate call's."""
        most = max(sum(len(self.patches[i]) for i in part) for part in np.split(np.asarray(src), groups))
        return self._shape(groups, len(src) // groups, most, max(len(self.patches[i]) for i in src), mcfg)

    def uniform_shape(self, rows: int, groups: int, mcfg: Qwen25VLConfig) -> GroupShape:
        """The image-group shape that holds ANY `rows` rows of this batch in `groups` groups: every update
        micro-batch gets the same one, so they stack for gradient accumulation."""
        per_group = rows // groups
        return self._shape(groups, per_group, self.max_patches() * per_group, self.max_patches(), mcfg)

    def _shape(self, groups: int, per_group: int, most: int, longest: int, mcfg: Qwen25VLConfig) -> GroupShape:
        p = patch_bucket(most, per_group, self.max_pixels, mcfg.vision)
        return GroupShape(groups, p, one_image_rows(longest, per_group, p))

    def rows(self, src: np.ndarray, mcfg: Qwen25VLConfig, shape: GroupShape, *,
             responses: np.ndarray | None = None, response_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Host batch of prompts `src` (indices, repeats allowed), optionally followed by responses at columns
        [Lp, Lp + T) with their M-RoPE positions (`layout.response_positions`, as they were generated); the
        images as `shape.groups` image groups of len(src) // groups consecutive rows."""
        ids, mask, pos = self.input_ids[src], self.attention_mask[src], self.position_ids[:, src]
        out = {"rope_deltas": self.rope_deltas[src]}
        if responses is not None:
            resp_pos = layout.response_positions(mask, self.rope_deltas[src], responses.shape[1])
            ids = np.concatenate([ids, responses], axis=1)
            mask = np.concatenate([mask, response_mask], axis=1)
            pos = np.concatenate([pos, resp_pos], axis=2)
        if len(src) % shape.groups:
            raise ValueError(f"{shape.groups} image groups do not divide {len(src)} prompt rows")
        member = np.arange(len(src)) // (len(src) // shape.groups)  # one image per prompt
        out.update(input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
                   position_ids=pos.astype(np.int32))
        out.update(grouped_vision_fields(np.concatenate([self.patches[i] for i in src], axis=0), self.grids[src],
                                         member, shape.groups, mcfg, num_patches=shape.patches,
                                         full_rows=shape.full_rows))
        return out

    def row_records(self, src: Sequence[int]) -> tuple[list[dict], list[tuple]]:
        """(records, image sizes) of the rows `src`: what the rewards of their responses read. Each record
        also carries its prompt's image as the model saw it (`image_patches`, `image_grid`), for an
        in-process reward model (vlaa_jax.rewards.jax_scorer)."""
        records = [{**self.records[i], "image_patches": self.patches[i], "image_grid": tuple(self.grids[i])}
                   for i in src]
        return records, [self.image_hw[i] for i in src]
