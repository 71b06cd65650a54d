"""Qwen2.5-VL vision tower: patch embedding, ViT blocks with window / full attention, 2x2 patch merger.

Works on all patches of a batch at once ([P, patch_dim], P a bucket), laid out by `layout.vision_layout`:
the tower runs in window order, attention is restricted by segment ids (windows, or whole image frames
in `fullatt_block_indexes`), and the merged tokens come back in image order.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vlaa_jax import nn
from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig


class FullRows(NamedTuple):
    """Per-image full attention (`layout.VisionLayout.full_index` / `full_slot`), with the segment ids
    and mask of its rows, built once per forward."""
    index: jax.Array      # [R, Lr]
    slot: jax.Array       # [P]
    segments: jax.Array   # [R, Lr], 0 = empty slot
    mask: jax.Array       # [R, 1, Lr, Lr]


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
        """Window blocks (`window_len` = the longest window, in patches) use chunked local attention;
        full-attention blocks attend within each image: per row of `rows` when given, else the dense
        segment `mask` over all patches."""
        P = x.shape[0]
        qkv = self.qkv(x).reshape(P, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = nn.apply_rotary(q, cos, sin), nn.apply_rotary(k, cos, sin)
        if window_len is not None:
            out = nn.local_segment_attention(q, k, v, segments, max_segment_len=window_len,
                                             implementation=self.impl)
        elif rows is not None:
            # Gather whole images into rows (slot P of the padded arrays: an empty slot), attend per row,
            # gather every patch back from its slot.
            padded = [jnp.concatenate([t, jnp.zeros((1,) + t.shape[1:], t.dtype)]) for t in (q, k, v)]
            qr, kr, vr = (t[rows.index] for t in padded)                   # [R, Lr, N, H]
            out = nn.dot_product_attention(qr, kr, vr, rows.mask, implementation=self.impl,
                                           segment_ids=rows.segments)
            out = out.reshape(-1, *out.shape[2:])[rows.slot]
        else:
            out = nn.dot_product_attention(q[None], k[None], v[None], mask, implementation=self.impl,
                                           segment_ids=segments[None])[0]
        return self.proj(out.reshape(P, -1))


class VisionBlock(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.norm1 = nn.RMSNorm(v.hidden_size, eps=v.rms_norm_eps, **kw)
        self.attn = VisionAttention(config, rngs=rngs)
        self.norm2 = nn.RMSNorm(v.hidden_size, eps=v.rms_norm_eps, **kw)
        self.mlp = nn.SwiGLU(v.hidden_size, v.intermediate_size, act=v.hidden_act, use_bias=True, **kw)

    def __call__(self, x, cos, sin, segments, mask, window_len=None, rows=None):
        x = x + self.attn(self.norm1(x), cos, sin, segments, mask, window_len, rows)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each group of merge**2 consecutive patches -> one token via a GELU MLP."""

    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.unit = v.spatial_merge_size ** 2
        wide = v.hidden_size * self.unit
        self.ln_q = nn.RMSNorm(v.hidden_size, eps=v.rms_norm_eps, **kw)
        self.fc1 = nn.Linear(wide, wide, names=("embed", "mlp"), use_bias=True, **kw)
        self.fc2 = nn.Linear(wide, v.out_hidden_size, names=("mlp", "embed"), use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(x.shape[0] // self.unit, -1)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTransformer(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.config = config
        self.patch_embed = nn.Linear(v.patch_dim, v.hidden_size, names=("patch", "embed"), use_bias=False,
                                     dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(config, rngs=rngs) for _ in range(v.depth)])
        self.merger = PatchMerger(config, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, window_index: jax.Array, reverse_index: jax.Array,
                 window_segments: jax.Array, full_segments: jax.Array, rotary_hw: jax.Array,
                 full_index: jax.Array | None = None, full_slot: jax.Array | None = None) -> jax.Array:
        """pixel_values [P, patch_dim] (image order) + layout arrays -> merged tokens [P // unit,
        out_hidden] in image order (the first num_patches // unit are real). With `full_index` /
        `full_slot` the full-attention blocks attend per image (rows), else densely over all patches."""
        v = self.config.vision
        unit = v.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values)
        P, D = x.shape
        x = x.reshape(P // unit, unit, D)[window_index].reshape(P, D)
        cos, sin = nn.rotary_2d(rotary_hw, v.head_dim, v.rope_theta)
        rows, full_mask = None, None
        if full_index is not None:
            row_segments = jnp.concatenate([full_segments, jnp.zeros((1,), full_segments.dtype)])[full_index]
            rows = FullRows(full_index, full_slot, row_segments,
                            nn.attention_mask(row_segments, row_segments, causal=False))
        else:
            full_mask = nn.attention_mask(full_segments[None], full_segments[None], causal=False)
        window_len = (v.window_size // v.patch_size) ** 2      # patches in the largest window
        policy = self.config.remat_policy
        window_step = nn.maybe_remat(lambda blk, *a: blk(*a, None, window_len), policy)
        full_step = nn.maybe_remat(lambda blk, x, cos, sin, seg, mask, rows: blk(x, cos, sin, seg, mask, None, rows),
                                   policy)
        for i, blk in enumerate(self.blocks):
            if i in v.fullatt_block_indexes:
                x = full_step(blk, x, cos, sin, full_segments, full_mask, rows)
            else:
                x = window_step(blk, x, cos, sin, window_segments)
        return self.merger(x)[reverse_index]
