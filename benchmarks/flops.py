"""Model FLOPs of an SFT step and HBM bytes of a decode step of Qwen2.5-VL, counted from the config.

Model FLOPs (issue 10: "do only the work the loss needs") count the matrix multiplications and the
attention products that the loss mathematically requires, on real (unpadded) tokens; one multiply-add
is 2 FLOPs:
  * decoder, every token of every row: forward 2 * N_mm per token (N_mm = the decoder's matmul weights:
    q/k/v/o and the SwiGLU gate/up/down), plus causal attention: QK^T and PV over the n(n+1)/2
    (query, key) pairs a causal row of n tokens has, 4 * (heads * head_dim) per pair and layer. The
    backward pass is 2x the forward (input and weight gradients), so the decoder counts 3x;
  * output projection (lm_head, the tied embedding for 3B) only at the `response_tokens` positions
    whose next token is a target: 2 * D * V per position, 3x with the backward. No logits for the
    prompt or image positions;
  * vision tower: forward only when frozen (patch embedding, blocks, attention 4 * d_v per (query,
    key) pair inside each window / whole image for the full-attention blocks); no backward through the
    frozen blocks. The patch merger is trained (vlaa_jax.train.common.VISION_FROZEN_PATTERNS): forward
    + weight gradients (fc1: 2x, fc2: 3x its forward, as no gradient flows below the merger). With
    `frozen_vision=False` the whole tower counts 3x;
  * not counted: norms, rotary, softmax, SwiGLU activation, embedding gather, the optimiser update
    (memory bound), and recomputation (rematerialisation is hardware work, not model work).
This is the definition `benchmarks/gpu.py` divides by step time and peak FLOP/s for MFU (and the one
of benchmarks/train_step.py). `executed_flops_estimate` adds what our step recomputes on purpose: the
decoder forward again under remat "full", and the chunked lm_head forward (jax.checkpoint per chunk).

Decode bytes: one decode step of the rollout sampler reads every decoder weight, the final norm and
the output projection once (plus one embedding row per sequence), and the keys / values of every
cached position of every row; see `decode_bytes_per_step`. The HBM-bandwidth bound on decode
throughput is batch / (bytes per step / bandwidth).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def _text_dims(config: Any) -> dict[str, int]:
    t = config.text
    hd = t.hidden_size // t.num_attention_heads
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    d = t.hidden_size
    return dict(d=d, q=q, kv=kv, hd=hd, layers=t.num_hidden_layers, inter=t.intermediate_size,
                vocab=t.vocab_size, kv_heads=t.num_key_value_heads,
                # matmul weights of one decoder layer: q, k, v, o projections and gate, up, down
                layer_mm=d * (q + 2 * kv) + q * d + 3 * d * t.intermediate_size,
                # every weight of one layer: + q/k/v biases + two RMSNorm scales
                layer_all=d * (q + 2 * kv) + q * d + 3 * d * t.intermediate_size + (q + 2 * kv) + 2 * d)


def _grid(image_patches: int, image_grid: Sequence[int] | None) -> tuple[int, int]:
    if image_grid is not None:
        h, w = (int(x) for x in image_grid)
        if h * w != image_patches:
            raise ValueError(f"image_grid {tuple(image_grid)} has {h * w} patches, image_patches={image_patches}")
        return h, w
    side = math.isqrt(image_patches)
    if side * side != image_patches:
        raise ValueError(f"image_patches={image_patches} is not a square: pass image_grid=(h, w) in patches")
    return side, side


def vision_attention_pairs(config: Any, image_grid: Sequence[int]) -> tuple[int, int]:
    """(query, key) pairs of one image of (h, w) patches: (per window-attention block, per
    full-attention block), from the same window layout the model uses."""
    from vlaa_jax.models.qwen2_5_vl import layout
    v = config.vision
    h, w = (int(x) for x in image_grid)
    lay = layout.vision_layout(np.array([[1, h, w]]), patch_size=v.patch_size,
                               spatial_merge_size=v.spatial_merge_size, window_size=v.window_size)
    counts = np.bincount(lay.window_segments)[1:]
    return int(np.sum(counts.astype(np.int64) ** 2)), (h * w) ** 2


def sft_step_flops(model_config: Any, *, batch: int, image_patches: int, text_tokens: int,
                   response_tokens: int, frozen_vision: bool = True,
                   image_grid: Sequence[int] | None = None) -> dict[str, float]:
    """Model FLOPs of one SFT train step (forward + backward) on `batch` rows, each holding one image
    of `image_patches` 14x14 patches (0 = no image; `image_grid` = (h, w) in patches, default square),
    `text_tokens` decoder positions (the whole row: image tokens, prompt, response; no padding) and
    `response_tokens` target positions (next-token loss). See the module docstring for what counts.

    Returns a dict of FLOPs (floats): model_flops (the MFU numerator), its parts, the forward-only
    figures and executed_flops_estimate (with remat recomputation, per model_config.remat_policy).
    """
    if response_tokens > text_tokens:
        raise ValueError(f"response_tokens={response_tokens} > text_tokens={text_tokens}")
    t = _text_dims(model_config)
    n = int(text_tokens)
    dec_mm_fwd = 2 * t["layer_mm"] * n * t["layers"]
    dec_attn_fwd = 4 * t["q"] * (n * (n + 1) // 2) * t["layers"]
    lm_head_fwd = 2 * t["d"] * t["vocab"] * int(response_tokens)
    vis_fwd = merger_fc1_fwd = merger_fc2_fwd = 0
    if image_patches:
        v = model_config.vision
        dv, unit = v.hidden_size, v.spatial_merge_size ** 2
        h, w = _grid(image_patches, image_grid)
        p = image_patches
        win_pairs, full_pairs = vision_attention_pairs(model_config, (h, w))
        n_full = sum(1 for i in range(v.depth) if i in v.fullatt_block_indexes)
        mlp_mats = 2 if v.mlp == "fc" else 3       # Qwen2-VL fc1/fc2, Qwen2.5-VL gate/up/down
        block_mm = 2 * p * (3 * dv * dv + dv * dv + mlp_mats * dv * v.intermediate_size)
        vis_fwd = (2 * p * v.patch_dim * dv + v.depth * block_mm
                   + 4 * dv * ((v.depth - n_full) * win_pairs + n_full * full_pairs))
        wide = dv * unit
        merger_fc1_fwd = 2 * (p // unit) * wide * wide
        merger_fc2_fwd = 2 * (p // unit) * wide * v.out_hidden_size
    merger_fwd = merger_fc1_fwd + merger_fc2_fwd
    if frozen_vision:
        vision = vis_fwd + merger_fwd + (merger_fc1_fwd + 2 * merger_fc2_fwd)
    else:
        vision = 3 * (vis_fwd + merger_fwd)
    per_row = {
        "decoder_matmuls": 3 * dec_mm_fwd,
        "decoder_attention": 3 * dec_attn_fwd,
        "lm_head": 3 * lm_head_fwd,
        "vision": vision,
    }
    model = sum(per_row.values())
    remat = 1 if getattr(model_config, "remat_policy", "none") == "full" else 0
    recompute = remat * (dec_mm_fwd + dec_attn_fwd) + lm_head_fwd
    if remat and not frozen_vision:
        recompute += vis_fwd
    out = {f"{k}_flops": float(batch * v) for k, v in per_row.items()}
    out.update(
        model_flops=float(batch * model),
        forward_flops=float(batch * (dec_mm_fwd + dec_attn_fwd + lm_head_fwd + vis_fwd + merger_fwd)),
        executed_flops_estimate=float(batch * (model + recompute)),
        six_n_t_flops=float(batch * 6 * (t["layer_mm"] * t["layers"]) * n),   # the "6 N T" rule of thumb
    )
    return out


def decoder_weight_count(model_config: Any) -> int:
    """Weights one decode step reads: every decoder layer, the final norm and the output projection."""
    t = _text_dims(model_config)
    return t["layers"] * t["layer_all"] + t["d"] + t["vocab"] * t["d"]


def decode_bytes_per_step(model_config: Any, *, batch: int, context_len: float, weight_bytes: int = 2,
                          kv_bytes: int = 2) -> dict[str, float]:
    """HBM bytes one decode step (one new token for each of `batch` rows) must move at least.

    context_len: cached positions each row's new token attends to (average over the decode, e.g.
    prompt + new_tokens / 2 for the ideal; the whole preallocated cache for a kernel that reads every
    slot). weight_bytes / kv_bytes: bytes per element of the weights as stored for decoding and of the
    KV cache. Returns weight_bytes, kv_cache_bytes (read, plus the new token's keys/values written),
    total_bytes.
    """
    t = _text_dims(model_config)
    weights = (decoder_weight_count(model_config) + batch * t["d"]) * weight_bytes   # + embedding rows
    kv_per_token = t["layers"] * 2 * t["kv_heads"] * t["hd"] * kv_bytes
    kv = batch * (float(context_len) + 1.0) * kv_per_token
    return {"weight_bytes": float(weights), "kv_cache_bytes": float(kv), "total_bytes": float(weights + kv),
            "kv_bytes_per_token": float(kv_per_token)}


def decode_bound_tokens_per_s(model_config: Any, *, batch: int, context_len: float, hbm_bytes_per_s: float,
                              weight_bytes: int = 2, kv_bytes: int = 2) -> float:
    """Upper bound on decode tokens/s from HBM bandwidth: batch / (bytes per step / bandwidth)."""
    b = decode_bytes_per_step(model_config, batch=batch, context_len=context_len, weight_bytes=weight_bytes,
                              kv_bytes=kv_bytes)
    return batch * hbm_bytes_per_s / b["total_bytes"]
