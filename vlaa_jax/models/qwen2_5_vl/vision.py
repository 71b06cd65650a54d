"""Qwen2.5-VL / Qwen2-VL vision tower: patch embedding, ViT blocks with window / full attention, 2x2 merger.

The two families' towers differ in three config fields only (config.py `VisionConfig`): Qwen2.5-VL has
RMSNorm, a SwiGLU MLP and window attention in all blocks but `fullatt_block_indexes`; Qwen2-VL has
LayerNorm (`norm="layer"`, also the merger's `ln_q`), an fc1/fc2 MLP (`mlp="fc"`, QuickGELU) and full
attention in every block (`window_size=0`, its layout is the identity window order).

Works on image groups: pixel_values [G, P, patch_dim] holds in group g the patches of the images of the
g-th group of batch rows (P a bucket), laid out per group by `layout.vision_layout` (stacked by
`layout.grouped_vision`). The group axis is a batch axis: it is split over the data-parallel devices,
so every device encodes only the images of its own rows. The tower runs in window order, attention is
restricted by segment ids (windows, or whole image frames in `fullatt_block_indexes`), and the merged
tokens come back in image order. A 2-D pixel_values [P, patch_dim] with unbatched layout arrays is one
group (all images of the batch together, as HF lays them out).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vlaa_jax import nn
from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig


class FullRows(NamedTuple):
    """Per-image full attention (`layout.VisionLayout.full_index` / `full_slot`, per group), with the
    segment ids and mask of its rows, built once per forward."""
    index: jax.Array      # [G, R, Lr]
    slot: jax.Array       # [G, P]
    segments: jax.Array   # [G * R, Lr], 0 = empty slot
    mask: jax.Array       # [G * R, 1, Lr, Lr]


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [G, P, ...] gathered along axis 1 by index [G, K] -> [G, K, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class VisionAttention(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.num_heads, self.head_dim = v.num_heads, v.head_dim
        self.impl = config.attention_impl
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        # q, k, v fused like HF ([D, 3, D]: the "3" axis stays whole so "heads" shards cleanly).
        self.qkv = nn.Linear(v.hidden_size, (3, v.hidden_size), names=("embed", None, "heads"),
                             use_bias=True, **kw)
        self.proj = nn.Linear(v.hidden_size, v.hidden_size, names=("heads", "embed"), use_bias=True, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array,
                 mask: jax.Array | None, window_len: int | None, rows: "FullRows | None" = None) -> jax.Array:
        """x [G, P, D] (window order) -> [G, P, D]. window_len: windowed blocks (chunked local attention);
        rows: per-image full attention; else dense attention with `mask` over each group's patches."""
        G, P = x.shape[:2]
        qkv = self.qkv(x).reshape(G, P, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = nn.apply_rotary(q, cos, sin), nn.apply_rotary(k, cos, sin)
        if window_len is not None:
            out = nn.local_segment_attention(q, k, v, segments, max_segment_len=window_len,
                                             implementation=self.impl)
        elif rows is not None:
            # Gather whole images into rows (slot P of the padded arrays: an empty slot), attend per row,
            # gather every patch back from its slot.
            R, Lr = rows.index.shape[1:]
            flat = rows.index.reshape(G, R * Lr)
            padded = [jnp.concatenate([t, jnp.zeros((G, 1) + t.shape[2:], t.dtype)], axis=1) for t in (q, k, v)]
            qr, kr, vr = (_take(t, flat).reshape(G * R, Lr, *t.shape[2:]) for t in padded)
            out = nn.dot_product_attention(qr, kr, vr, rows.mask, implementation=self.impl,
                                           segment_ids=rows.segments)
            out = _take(out.reshape(G, R * Lr, *out.shape[2:]), rows.slot)
        else:
            out = nn.dot_product_attention(q, k, v, mask, implementation=self.impl, segment_ids=segments)
        return self.proj(out.reshape(G, P, -1))


def _norm(config: Qwen25VLConfig, rngs: nnx.Rngs) -> nnx.Module:
    v = config.vision
    norm = nn.LayerNorm if v.norm == "layer" else nn.RMSNorm
    return norm(v.hidden_size, eps=v.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)


class VisionBlock(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.norm1 = _norm(config, rngs)
        self.attn = VisionAttention(config, rngs=rngs)
        self.norm2 = _norm(config, rngs)
        if v.mlp == "fc":
            self.mlp = nn.FeedForward(v.hidden_size, v.intermediate_size, act=v.hidden_act, **kw)
        else:
            self.mlp = nn.SwiGLU(v.hidden_size, v.intermediate_size, act=v.hidden_act, use_bias=True, **kw)

    def __call__(self, x, cos, sin, segments, mask, window_len=None, rows=None):
        x = x + self.attn(self.norm1(x), cos, sin, segments, mask, window_len, rows)
        return shd.constrain(x + self.mlp(self.norm2(x)), shd.ACTIVATION_AXES)


class PatchMerger(nnx.Module):
    """RMSNorm (Qwen2-VL: LayerNorm), then each group of merge**2 consecutive patches -> one token via a
    GELU MLP."""

    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.unit = v.spatial_merge_size ** 2
        wide = v.hidden_size * self.unit
        self.ln_q = _norm(config, rngs)
        self.fc1 = nn.Linear(wide, wide, names=("embed", "mlp"), use_bias=True, **kw)
        self.fc2 = nn.Linear(wide, v.out_hidden_size, names=("mlp", "embed"), use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[G, P, D] -> [G, P // unit, out_hidden]."""
        x = shd.constrain(self.ln_q(x).reshape(*x.shape[:-2], x.shape[-2] // self.unit, -1), shd.ACTIVATION_AXES)
        h = shd.constrain(jax.nn.gelu(self.fc1(x), approximate=False), shd.MLP_AXES)
        return shd.constrain(self.fc2(h), shd.ACTIVATION_AXES)


class VisionTransformer(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.config = config
        self.patch_embed = nn.Linear(v.patch_dim, v.hidden_size, names=("patch", "embed"), use_bias=False,
                                     dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        # All blocks as one module with a leading block axis, run by a scan (compile time and program size
        # do not grow with depth); window and full-attention blocks share the weights' shapes.
        self.blocks = nn.stacked(lambda r: VisionBlock(config, rngs=r), v.depth, rngs)
        self.merger = PatchMerger(config, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, window_index: jax.Array, reverse_index: jax.Array,
                 window_segments: jax.Array, full_segments: jax.Array, rotary_hw: jax.Array,
                 full_index: jax.Array | None = None, full_slot: jax.Array | None = None) -> jax.Array:
        """pixel_values [G, P, patch_dim] (image order per group) + the groups' layout arrays (leading
        axis G) -> merged tokens [G, P // unit, out_hidden] in image order (per group, the first
        num_patches // unit are real). With `full_index` / `full_slot` the full-attention blocks attend
        per image (rows), else densely over each group's patches. A 2-D pixel_values [P, patch_dim] with
        unbatched layout arrays is one group and gives [P // unit, out_hidden]."""
        if pixel_values.ndim == 2:
            args = (pixel_values, window_index, reverse_index, window_segments, full_segments, rotary_hw,
                    full_index, full_slot)
            return self(*(None if a is None else a[None] for a in args))[0]
        v = self.config.vision
        unit = v.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values)
        G, P, D = x.shape
        x = _take(x.reshape(G, P // unit, unit, D), window_index).reshape(G, P, D)
        x = shd.constrain(x, shd.ACTIVATION_AXES)
        cos, sin = nn.rotary_2d(rotary_hw, v.head_dim, v.rope_theta)
        rows, full_mask = None, None
        if full_index is not None:
            R, Lr = full_index.shape[1:]
            padded = jnp.concatenate([full_segments, jnp.zeros((G, 1), full_segments.dtype)], axis=1)
            row_segments = _take(padded, full_index.reshape(G, R * Lr)).reshape(G * R, Lr)
            rows = FullRows(full_index, full_slot, row_segments,
                            nn.attention_mask(row_segments, row_segments, causal=False))
        else:
            full_mask = nn.attention_mask(full_segments, full_segments, causal=False)
        window_len = (v.window_size // v.patch_size) ** 2      # patches in the largest window
        graphdef, stacked = nnx.split(self.blocks)
        all_full = set(range(v.depth)) <= set(v.fullatt_block_indexes)   # Qwen2-VL: no window blocks

        def body(x, xs):
            params, full = xs
            blk = nnx.merge(graphdef, params)
            window = lambda x: blk(x, cos, sin, window_segments, None, window_len)  # noqa: E731
            dense = lambda x: blk(x, cos, sin, full_segments, full_mask, None, rows)  # noqa: E731
            return (dense(x) if all_full else jax.lax.cond(full, dense, window, x)), None

        policy = self.config.remat_policy
        if policy != "none":          # remat inside the scan: one block's activations at a time
            body = jax.checkpoint(body, policy=nn.remat_policy(policy), prevent_cse=False)
        is_full = jnp.asarray([i in v.fullatt_block_indexes for i in range(v.depth)])
        x, _ = jax.lax.scan(body, x, (stacked, is_full))
        return shd.constrain(_take(self.merger(x), reverse_index), shd.ACTIVATION_AXES)
