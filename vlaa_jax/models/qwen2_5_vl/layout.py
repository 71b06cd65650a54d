"""Host-side layout of a Qwen2.5-VL batch (NumPy only): 3D rotary positions and the vision layout.

Everything whose shape depends on the data is computed here once per batch and handed to jitted code as
fixed-shape int32 arrays (design.md: "the host lays out, the device computes"). The same functions serve
the data pipeline, the sampler and `Qwen25VL.__call__`.

Conventions shared with HF (`Qwen2_5_VLModel.get_rope_index`, `transformers.vision_utils`):
  * `image_grid_thw[i] = (t, h, w)` in patches (14 px); zero rows are padding and are skipped.
  * `pixel_values` holds the patches of all images of the batch, concatenated in image order, each image's
    patches in "merge-block order" (every `spatial_merge_size**2` consecutive patches form one merged
    token), exactly as the HF image processor emits them.
  * Images are consumed in order across the batch rows: row 0's images first, then row 1's, ...
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np


def valid_grids(image_grid_thw: np.ndarray | None) -> np.ndarray:
    if image_grid_thw is None:
        return np.zeros((0, 3), np.int64)
    g = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    return g[np.prod(g, axis=1) > 0]


def response_start(prompt_mask: Any, rope_deltas: Any) -> Any:
    """M-RoPE position of the first generated token of each row [B]: the prompt's real tokens + its
    rope_delta (HF `generate`: the k-th real token of a row sits at k + rope_delta on all three axes).
    The one rule for response positions: the sampler (JAX arrays, traced) and the trainer's response
    layout (`response_positions`, NumPy) both use it."""
    return prompt_mask.sum(axis=1).astype(np.int32) + rope_deltas[:, 0].astype(np.int32)


def response_positions(prompt_mask: np.ndarray, rope_deltas: np.ndarray, length: int) -> np.ndarray:
    """M-RoPE position ids [3, B, length] of `length` response tokens after left-padded prompts."""
    pos = response_start(np.asarray(prompt_mask), np.asarray(rope_deltas))[:, None] + np.arange(length)[None]
    return np.broadcast_to(pos.astype(np.int32)[None], (3,) + pos.shape)


def mrope_positions(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    attention_mask: np.ndarray | None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int = 151655,
    vision_start_token_id: int = 151652,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE (temporal, height, width) position ids, as HF `get_rope_index` computes them.

    Text tokens advance all three positions by one; the tokens of an image with merged grid (t, h, w)
    starting at position p get (p + t_i, p + h_i, p + w_i), and the text after it resumes at
    p + max(h, w) (images: t = 1). Padding tokens (attention_mask 0) get position 0 and are skipped.
    An image is a run of `image_token_id` tokens; `vision_start_token_id` is checked to precede it.

    Returns (position_ids int32 [3, B, L], rope_deltas int32 [B, 1]) where rope_delta = max position + 1 -
    number of valid tokens: during decoding, the position of the k-th valid token (k >= prompt length)
    is k + rope_delta on all three axes.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    B, L = ids.shape
    mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != (B, L):
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    grids = valid_grids(image_grid_thw)
    m = spatial_merge_size
    position_ids = np.zeros((3, B, L), np.int32)
    deltas = np.zeros((B, 1), np.int32)
    next_image = 0
    for b in range(B):
        tokens = ids[b][mask[b]]
        n = len(tokens)
        pos = np.zeros((3, n), np.int64)
        is_img = tokens == image_token_id
        # Runs of image tokens: starts where is_img rises.
        starts = np.flatnonzero(is_img & ~np.concatenate([[False], is_img[:-1]]))
        cursor, current = 0, 0   # index into tokens, next position value
        for s in starts:
            if s < cursor:   # part of a run already consumed by consecutive images
                continue
            if s == 0 or tokens[s - 1] != vision_start_token_id:
                raise ValueError(f"row {b}: image token at {s} is not preceded by <|vision_start|> "
                                 f"(id {vision_start_token_id})")
            # text before the image
            pos[:, cursor:s] = np.arange(s - cursor) + current
            current += s - cursor
            if next_image >= len(grids):
                raise ValueError(f"row {b}: more images in input_ids than rows in image_grid_thw "
                                 f"({len(grids)} non-zero rows)")
            t, h, w = (int(x) for x in grids[next_image])
            next_image += 1
            gh, gw = h // m, w // m
            count = t * gh * gw
            if s + count > n or not is_img[s:s + count].all():
                raise ValueError(f"row {b}: image {next_image - 1} with grid {(t, h, w)} needs {count} "
                                 f"consecutive image tokens at {s}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pos[:, s:s + count] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + current
            current += max(gh, gw)
            cursor = s + count
        pos[:, cursor:] = np.arange(n - cursor) + current
        position_ids[:, b, mask[b]] = pos
        deltas[b, 0] = (pos.max() + 1 - n) if n else 0
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} non-zero rows but input_ids hold {next_image} images")
    return position_ids, deltas


class VisionLayout(NamedTuple):
    """Fixed-shape arrays that place P patches (a bucket; S <= P real) for the vision tower.

    Arrays indexed by "unit" are over merged tokens (`spatial_merge_size**2` patches each, P // unit).
    The tower works in *window order* (the patches of one attention window contiguous, HF's
    `window_index`) and the merger output is put back into image order with `reverse_index`.
      window_index      [P//u]  unit in image order placed at each window-order slot (padding: identity)
      reverse_index     [P//u]  inverse permutation (argsort of window_index)
      window_segments   [P]     window-order; one id >= 1 per attention window, 0 = padding patch
      full_segments     [P]     window-order; one id >= 1 per image frame (full attention), 0 = padding
      rotary_hw         [P, 2]  window-order (row, col) of each patch inside its image, for 2D RoPE
      num_patches       []      S, the number of real patches (real merged tokens: S // u, first in
                                image order; they fill the <|image_pad|> tokens of the batch in order)
    Optional (`full_rows`): the full-attention blocks attend per image instead of over all P patches
    (HF attends per image too; dense P x P costs ~8x more for a batch of 8 images):
      full_index        [R, Lr] the window-order patch in each slot of R rows of Lr slots, whole frames
                                packed into rows; P marks an empty slot
      full_slot         [P]     the slot (row * Lr + column) holding each patch (padding patches: any)
    """
    window_index: np.ndarray
    reverse_index: np.ndarray
    window_segments: np.ndarray
    full_segments: np.ndarray
    rotary_hw: np.ndarray
    num_patches: np.ndarray
    full_index: np.ndarray | None = None
    full_slot: np.ndarray | None = None

    def map(self, fn) -> "VisionLayout":
        """`fn` applied to every present field (e.g. jnp.asarray); absent optional fields stay None."""
        return VisionLayout(*(None if a is None else fn(a) for a in self))


def layout_from_fields(fields: Mapping[str, Any], prefix: str = "vision_") -> VisionLayout | None:
    """The `VisionLayout` of a batch dict holding its fields as `{prefix}{name}` (None without a layout;
    the optional fields may be absent)."""
    if f"{prefix}window_index" not in fields:
        return None
    return VisionLayout(*(fields.get(f"{prefix}{k}") for k in VisionLayout._fields))


def frame_lengths(image_grid_thw: np.ndarray | None) -> list[int]:
    """Patches of every frame (full-attention segment) of the non-padding images, in order."""
    return [int(h * w) for t, h, w in valid_grids(image_grid_thw).tolist() for _ in range(t)]


def row_length(longest_frame: int) -> int:
    """Slots per full-attention row: a power of two >= 64 and >= the longest frame (few distinct shapes,
    each one compilation)."""
    return max(64, 1 << (max(1, int(longest_frame)) - 1).bit_length())


def full_attention_rows(frame_lengths: Sequence[int], num_patches: int) -> tuple[int, int] | None:
    """(R, Lr) of the per-image full-attention rows for frames of these lengths (patches), or None when
    dense attention over all `num_patches` is no dearer. Lr = `row_length` of the longest frame; frames
    are packed first-fit decreasing; R is rounded up to a power of two (few distinct shapes)."""
    lengths = [int(n) for n in frame_lengths if n > 0]
    if not lengths:
        return None
    Lr = row_length(max(lengths))
    R = 1 << (len(_pack(lengths, Lr)) - 1).bit_length()
    return None if R * Lr * Lr >= num_patches * num_patches else (R, Lr)


def _pack(lengths: Sequence[int], Lr: int) -> list[list[int]]:
    """First-fit decreasing: frame indices per row."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(Lr - lengths[i])
    return rows


def _rows_layout(full_segments: np.ndarray, rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """full_index [R, Lr] / full_slot [P] for the frames of `full_segments` (contiguous, ids 1..F)."""
    R, Lr = rows
    P = len(full_segments)
    ids = full_segments[full_segments > 0]
    starts = np.flatnonzero(np.diff(np.concatenate([[0], full_segments])) != 0)
    starts = starts[full_segments[starts] > 0]
    lengths = np.bincount(ids)[1:] if len(ids) else np.zeros(0, np.int64)
    lengths = lengths[lengths > 0]
    if len(lengths) and lengths.max() > Lr:
        raise ValueError(f"full_rows={rows}: a frame of {lengths.max()} patches does not fit rows of {Lr}")
    packed = _pack(lengths.tolist(), Lr)
    if len(packed) > R:
        raise ValueError(f"full_rows={rows}: the {len(lengths)} frames need {len(packed)} rows of {Lr}")
    index = np.full((R, Lr), P, np.int64)
    slot = np.zeros(P, np.int64)
    used = np.zeros(R, np.int64)
    for r, frames in enumerate(packed):
        for f in frames:
            n, s = int(lengths[f]), int(starts[f])
            index[r, used[r]:used[r] + n] = np.arange(s, s + n)
            slot[s:s + n] = r * Lr + used[r] + np.arange(n)
            used[r] += n
    empty = np.flatnonzero(index.ravel() == P)
    slot[full_segments == 0] = empty[0] if len(empty) else 0      # padding patches read any slot
    return index.astype(np.int32), slot.astype(np.int32)


def vision_layout(
    image_grid_thw: np.ndarray | None,
    *,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    window_size: int = 112,
    num_patches_padded: int | None = None,
    full_rows: bool | tuple[int, int] = False,
) -> VisionLayout:
    """Window order, segment ids and 2D rotary positions of the patches of `image_grid_thw`.

    Reproduces HF `get_vision_window_index` (windows of window_size/patch/merge merged tokens, partial at
    the bottom/right edge, per frame), `get_vision_cu_seqlens` (one full-attention segment per frame) and
    `get_vision_position_ids` (block-major (h, w) ids). Padding patches up to `num_patches_padded` get
    segment id 0 in both segmentations, so they never attend to or are attended by real patches.

    full_rows: also lay out per-image full attention (`full_index`, `full_slot`): True picks the shape
    (`full_attention_rows`; none when dense is no dearer), (R, Lr) forces one (e.g. the largest over
    micro-batches that must stack), False leaves the full-attention blocks dense.
    window_size 0 (Qwen2-VL, no window attention): one window per frame, the window order is the image
    order (window_index the identity).
    """
    grids = valid_grids(image_grid_thw)
    m = spatial_merge_size
    unit = m * m
    win = window_size // m // patch_size     # 0: no windows (Qwen2-VL), one window per frame
    window_index, window_seg_units, full_seg_units, hw = [], [], [], []
    unit_offset = 0
    n_windows = 0
    n_frames = 0
    for t, h, w in grids.tolist():
        if h % m or w % m:
            raise ValueError(f"image grid {(t, h, w)} is not a multiple of spatial_merge_size {m}")
        gh, gw = h // m, w // m
        win_h, win_w = (win, win) if win else (gh, gw)
        nwh, nww = -(-gh // win_h), -(-gw // win_w)
        # (row, col) window of every merged token, then sort units by (frame, window row, window col,
        # row, col) -- the order of HF's padded reshape/permute.
        uh, uw = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        uh, uw = uh.ravel(), uw.ravel()
        wid = (uh // win_h) * nww + (uw // win_w)
        order = np.lexsort((uw, uh, wid))       # within one frame
        for f in range(t):
            window_index.append(order + unit_offset + f * gh * gw)
            window_seg_units.append(wid[order] + n_windows + f * nwh * nww + 1)
            full_seg_units.append(np.full(gh * gw, n_frames + f + 1))
        n_windows += t * nwh * nww
        n_frames += t
        # patch (row, col) in block-major order: unit (uh, uw), inner (i, j)
        ii, jj = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
        ph = (uh[:, None] * m + ii.ravel()[None]).ravel()
        pw = (uw[:, None] * m + jj.ravel()[None]).ravel()
        hw.append(np.tile(np.stack([ph, pw], -1), (t, 1)))
        unit_offset += t * gh * gw
    S = unit_offset * unit
    P = S if num_patches_padded is None else int(num_patches_padded)
    if P < S or P % unit:
        raise ValueError(f"num_patches_padded={P} must be >= {S} real patches and a multiple of {unit}")
    pad_units = P // unit - unit_offset
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,), np.int64)  # noqa: E731
    widx = np.concatenate([cat(window_index), unit_offset + np.arange(pad_units)])
    wseg_u = np.concatenate([cat(window_seg_units), np.zeros(pad_units, np.int64)])
    fseg_u = np.concatenate([cat(full_seg_units), np.zeros(pad_units, np.int64)])
    hw_img = np.concatenate(hw + [np.zeros((pad_units * unit, 2), np.int64)]) if hw else \
        np.zeros((P, 2), np.int64)
    hw_win = hw_img.reshape(-1, unit, 2)[widx].reshape(P, 2)
    full_seg = np.repeat(fseg_u, unit)
    index = slot = None
    if full_rows is True:
        full_rows = full_attention_rows(frame_lengths(grids), P)
    if full_rows:
        index, slot = _rows_layout(full_seg, tuple(int(x) for x in full_rows))
    return VisionLayout(
        window_index=widx.astype(np.int32),
        reverse_index=np.argsort(widx).astype(np.int32),
        window_segments=np.repeat(wseg_u, unit).astype(np.int32),
        full_segments=full_seg.astype(np.int32),
        rotary_hw=hw_win.astype(np.int32),
        num_patches=np.asarray(S, np.int32),
        full_index=index,
        full_slot=slot,
    )


def image_rows(input_ids: np.ndarray, image_grid_thw: np.ndarray | None, *, image_token_id: int = 151655,
               spatial_merge_size: int = 2) -> np.ndarray:
    """The batch row of each (non-padding) image: images fill the <|image_pad|> tokens in row-major order,
    each image within one row."""
    ids = np.asarray(input_ids)
    grids = valid_grids(image_grid_thw)
    per_image = np.prod(grids, axis=1) // spatial_merge_size ** 2
    per_row = (ids == image_token_id).sum(axis=1)
    if per_image.sum() != per_row.sum():
        raise ValueError(f"input_ids hold {int(per_row.sum())} image tokens; image_grid_thw implies "
                         f"{int(per_image.sum())}")
    row_end = np.cumsum(per_row)
    first = np.cumsum(per_image) - per_image
    rows = np.searchsorted(row_end, first, side="right")
    last = np.searchsorted(row_end, first + per_image - 1, side="right")
    if (rows != last).any():
        raise ValueError(f"image {int(np.flatnonzero(rows != last)[0])} spans two rows of input_ids")
    return rows.astype(np.int32)


def group_full_rows(frame_lengths_per_group: Sequence[Sequence[int]], num_patches: int) -> tuple[int, int] | None:
    """One (R, Lr) per-image full-attention shape for several image groups of `num_patches` slots each, or
    None (dense) where any group with images would gain nothing or no group has images. Lr = `row_length`
    of the longest frame of any group; R = the most rows any group's frames pack into at that Lr (a power
    of two), so every group's images fit the shape."""
    groups = [[int(n) for n in f if n > 0] for f in frame_lengths_per_group]
    groups = [g for g in groups if g]
    if not groups or not all(full_attention_rows(g, num_patches) for g in groups):
        return None
    Lr = row_length(max(max(g) for g in groups))
    R = 1 << (max(len(_pack(g, Lr)) for g in groups) - 1).bit_length()
    return None if R * Lr * Lr >= num_patches * num_patches else (R, Lr)


def grouped_vision(
    pixel_values: np.ndarray,
    image_grid_thw: np.ndarray | None,
    image_group: np.ndarray,
    groups: int,
    *,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    window_size: int = 112,
    num_patches_padded: int | None = None,
    full_rows: bool | tuple[int, int] = False,
) -> tuple[np.ndarray, VisionLayout]:
    """The images of a batch as `groups` image groups, each laid out on its own (`vision_layout`).

    pixel_values [S, patch_dim]: the real patches of every image in image order (rows past them are
    ignored); image_group [N] (non-decreasing): the group of each non-padding image, e.g. its row //
    (rows per group). A group's images are contiguous in pixel_values, so group g's patches are one
    slice. Returns (pixel_values [G, P, patch_dim], the layout with a leading G axis on every field),
    P = num_patches_padded (default: the largest group, rounded up to the merge unit). full_rows: True
    picks one per-image full-attention shape for all groups (`group_full_rows`), (R, Lr) forces one,
    False keeps the full-attention blocks dense within each group.
    """
    grids = valid_grids(image_grid_thw)
    image_group = np.asarray(image_group, np.int64).reshape(-1)
    unit = spatial_merge_size ** 2
    if len(image_group) != len(grids):
        raise ValueError(f"image_group has {len(image_group)} entries for {len(grids)} images")
    if len(image_group) and ((np.diff(image_group) < 0).any() or image_group.min() < 0
                             or image_group.max() >= groups):
        raise ValueError(f"image groups must be non-decreasing in [0, {groups}), got {image_group.tolist()}")
    sizes = np.prod(grids, axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    members = [np.flatnonzero(image_group == g) for g in range(groups)]
    counts = [int(sizes[m].sum()) for m in members]
    P = -(-max(counts + [unit]) // unit) * unit if num_patches_padded is None else int(num_patches_padded)
    if max(counts) > P:
        raise ValueError(f"an image group holds {max(counts)} patches, more than num_patches_padded={P}")
    if full_rows is True:
        full_rows = group_full_rows([frame_lengths(grids[m]) for m in members], P) or False
    pixel_values = np.asarray(pixel_values)
    out = np.zeros((groups, P, pixel_values.shape[-1]), pixel_values.dtype)
    layouts = []
    for g, m in enumerate(members):
        if len(m):
            out[g, :counts[g]] = pixel_values[offsets[m[0]]:offsets[m[-1] + 1]]
        layouts.append(vision_layout(grids[m], patch_size=patch_size, spatial_merge_size=spatial_merge_size,
                                     window_size=window_size, num_patches_padded=P, full_rows=full_rows))
    return out, VisionLayout(*(None if f[0] is None else np.stack(f) for f in zip(*layouts)))


def image_token_count(image_grid_thw: np.ndarray | None, spatial_merge_size: int = 2) -> int:
    """Number of <|image_pad|> tokens the (non-padding) images of `image_grid_thw` fill."""
    g = valid_grids(image_grid_thw)
    return int(np.prod(g, axis=1).sum()) // spatial_merge_size ** 2
