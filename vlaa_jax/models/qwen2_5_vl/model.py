"""Qwen2.5-VL / Qwen2-VL: vision tower + decoder, image features scattered into the <|image_pad|> tokens.

Two ways in:
  * `model(input_ids, attention_mask=..., pixel_values=..., image_grid_thw=...)`: HF-shaped convenience
    call (NumPy or JAX inputs); computes the host layout and returns logits [B, L, vocab] (float32).
  * `model.forward(input_ids, position_ids, segment_ids, pixel_values=..., vision=..., cache=...)`: the
    jit-friendly core over precomputed fixed-shape arrays; returns (logits or final hidden states, cache).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import vlaa_jax.models.qwen2_5_vl.layout as layout_lib
from vlaa_jax import nn
from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from vlaa_jax.models.qwen2_5_vl.text import KVCache, TextModel, init_cache, rows_matmul, weight_major
from vlaa_jax.models.qwen2_5_vl.vision import VisionTransformer


def scatter_image_features(inputs_embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                           image_token_id: int) -> jax.Array:
    """Puts the image features of each group of rows at its <|image_pad|> tokens, in order (row-major
    within the group, like HF masked_scatter). features [G, F, D] for G groups of B // G consecutive
    rows (the vision tower's image groups), or [F, D] for one group. Fixed shapes: a group's features
    may hold more rows than it has image tokens (bucket padding)."""
    if features.ndim == 2:
        features = features[None]
    B, L = input_ids.shape
    G = features.shape[0]
    if B % G:
        raise ValueError(f"{G} image groups do not divide the batch of {B} rows")
    is_img = (input_ids == image_token_id).reshape(G, (B // G) * L)
    k = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = shd.constrain(jnp.take_along_axis(features, k[..., None], axis=1), shd.ACTIVATION_AXES)
    gathered = shd.constrain(gathered.reshape(B, L, -1), shd.ACTIVATION_AXES)
    return jnp.where(is_img.reshape(B, L)[..., None], gathered.astype(inputs_embeds.dtype), inputs_embeds)


class Qwen25VL(nnx.Module):
    """Qwen2_5_VLForConditionalGeneration / Qwen2VLForConditionalGeneration (by `config.model_type`) in Flax
    NNX (state paths: visual.*, language_model.*, lm_head)."""

    # Set on decode views only (`decode_view`): the output projection stored [vocab, hidden].
    _vocab_major_head: jax.Array | None = None

    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.visual = VisionTransformer(config, rngs=rngs)
        self.language_model = TextModel(config, rngs=rngs)
        t = config.text
        self.lm_head = None if config.tie_word_embeddings else nn.param(
            rngs, nnx.initializers.normal(1.0 / np.sqrt(t.hidden_size)), (t.hidden_size, t.vocab_size),
            config.param_dtype, ("embed", "vocab"))

    # ---------------------------------------------------------------------------------- pieces
    def lm_head_weight(self) -> jax.Array:
        """The output projection [hidden, vocab] (the transposed embedding when tied), param dtype.
        For chunked log-probs: logits = hidden @ lm_head_weight()."""
        if self.lm_head is None:
            return self.language_model.embed_tokens[...].T
        return self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states [..., D] -> float32 logits [..., vocab]."""
        if self._vocab_major_head is not None:
            w = self._vocab_major_head.astype(self.config.jnp_dtype)
            return rows_matmul(hidden.astype(w.dtype), w).astype(jnp.float32)
        w = self.lm_head_weight().astype(self.config.jnp_dtype)
        logits = jnp.einsum("...d,dv->...v", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)
        names = {2: (shd.LOGITS_AXES[0], shd.LOGITS_AXES[-1]), 3: shd.LOGITS_AXES}.get(logits.ndim)
        return logits if names is None else shd.constrain(logits, names)

    def encode_images(self, pixel_values: jax.Array, vision: layout_lib.VisionLayout) -> jax.Array:
        """pixel_values [G, P, patch_dim] + the groups' layout (`layout.grouped_vision`) -> merged image
        tokens [G, P // merge**2, hidden]; [P, patch_dim] with one layout -> [P // merge**2, hidden]."""
        return self.visual(pixel_values, vision.window_index, vision.reverse_index, vision.window_segments,
                           vision.full_segments, vision.rotary_hw, vision.full_index, vision.full_slot)

    def decode_weights(self) -> dict[str, Any]:
        """The transposed copies a decode view multiplies (`decode_view(weights)`): made once per set of
        weights (the sampler keeps them while the weights stay the same, rollout/sampler.py)."""
        out: dict[str, Any] = {"layers": self.language_model.decode_kernels()}
        if self.lm_head is not None:
            out["head"] = weight_major(self.lm_head[...])
        return out

    def decode_view(self, weights: dict[str, Any] | None = None) -> "Qwen25VL":
        """This model laid out for decoding a few rows per step (see text.py, "Decoding layout"): a new
        module object sharing this one's arrays, whose decoder Linears are `DecodeLinear`s and whose
        output projection is stored [vocab, hidden] (the embedding itself when tied: no copy). Call it
        inside the jitted program that decodes, with `weights` from `decode_weights()` or without (the
        transposed copies are then made there); the same numbers up to float32 summation order. Do not
        split or save it."""
        view = nnx.merge(*nnx.split(self))
        view.language_model.use_decode_layout(None if weights is None else weights["layers"])
        if view.lm_head is None:
            view._vocab_major_head = view.language_model.embed_tokens[...]
        else:
            view._vocab_major_head = weight_major(view.lm_head[...]) if weights is None else weights["head"]
        return view

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return init_cache(self.config, batch, max_len, dtype)

    # ------------------------------------------------------------------------------- jit-friendly core
    def forward(self, input_ids: jax.Array, position_ids: jax.Array, segment_ids: jax.Array, *,
                pixel_values: jax.Array | None = None, vision: layout_lib.VisionLayout | None = None,
                cache: KVCache | None = None, return_hidden: bool = False, last_only: bool = False,
                shared_prefix: bool = False) -> tuple[jax.Array, KVCache | None]:
        """input_ids [B, T], position_ids [3, B, T] (`layout.mrope_positions`), segment_ids [B, T]
        (attention_mask, 0 = padding), optional pixel_values [G, P, patch_dim] (image groups of B // G
        rows; or [P, patch_dim], one group) with `vision` =
        `layout.grouped_vision(...)` (or `layout.vision_layout(..., num_patches_padded=P)`), optional KV cache.
        Returns (float32 logits [B, T, vocab], or final hidden states [B, T, D] with return_hidden; the
        updated cache or None). last_only: outputs of the last position only ([B, 1, ...]; with a cache,
        the whole prompt's keys/values are still written: a prefill). shared_prefix: segment 1 of a row is
        read by all its other segments (`TextModel.__call__`)."""
        x = shd.constrain(self.language_model.embed(input_ids), shd.ACTIVATION_AXES)
        if pixel_values is not None:
            if vision is None:
                raise ValueError("pixel_values given without its vision layout")
            feats = self.encode_images(pixel_values, vision)
            x = scatter_image_features(x, input_ids, feats, self.config.image_token_id)
        hidden, cache = self.language_model(x, position_ids, segment_ids, cache, last_only=last_only,
                                            shared_prefix=shared_prefix)
        return (hidden if return_hidden else self.logits(hidden)), cache

    # ------------------------------------------------------------------------------- HF-shaped call
    def __call__(self, input_ids: Any, attention_mask: Any = None, pixel_values: Any = None,
                 image_grid_thw: Any = None, *, return_hidden: bool = False) -> jax.Array:
        """Logits [B, L, vocab] (float32) like `Qwen2_5_VLForConditionalGeneration(...).logits`; the M-RoPE
        positions and the vision layout are computed on the host from the inputs."""
        c = self.config
        ids = np.asarray(input_ids)
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
        grid = None if image_grid_thw is None else np.asarray(image_grid_thw)
        position_ids, _ = layout_lib.mrope_positions(
            ids, grid, mask, spatial_merge_size=c.vision.spatial_merge_size,
            image_token_id=c.image_token_id, vision_start_token_id=c.vision_start_token_id)
        vision = None
        if pixel_values is not None:
            v = c.vision
            pixel_values = np.asarray(pixel_values)
            n_real = layout_lib.image_token_count(grid, v.spatial_merge_size) * v.spatial_merge_size ** 2
            n_img_tokens = int((ids == c.image_token_id).sum())
            if pixel_values.shape[0] < n_real or n_img_tokens * v.spatial_merge_size ** 2 != n_real:
                raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches and input_ids {n_img_tokens} "
                                 f"image tokens; image_grid_thw implies {n_real} patches")
            # Rows beyond the real patches (a bucket) are padding: they get segment id 0.
            vision = layout_lib.vision_layout(grid, patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
                                              window_size=v.window_size, num_patches_padded=pixel_values.shape[0])
            vision = vision.map(jnp.asarray)
        out, _ = _jit_forward(self, jnp.asarray(ids, jnp.int32), jnp.asarray(position_ids), jnp.asarray(mask),
                              None if pixel_values is None else jnp.asarray(pixel_values), vision, return_hidden)
        return out


def abstract_model(config: Qwen25VLConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract state (shapes, dtypes, logical axes; no memory) of the model."""
    abstract = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


@nnx.jit(static_argnums=(6,))
def _jit_forward(model, input_ids, position_ids, segment_ids, pixel_values, vision, return_hidden):
    return model.forward(input_ids, position_ids, segment_ids, pixel_values=pixel_values, vision=vision,
                         return_hidden=return_hidden)
