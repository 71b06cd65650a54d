"""Qwen2 decoder of Qwen2.5-VL: GQA with q/k/v bias, M-RoPE, RMSNorm, SwiGLU, optional KV cache.

Masks come from segment ids ([B, L] int, 0 = padding; an HF attention_mask is a valid segment array)
plus causality over cache slots, so left padding, right padding and packed rows all use one path.

Decoder layers are stacked (`TextModel.layers` is ONE `DecoderLayer` whose parameters carry a leading
layer axis, logical axis "layers") and run by `jax.lax.scan`, with remat inside the scanned body: the
program holds one layer's body however deep the model is, so compile time and program size do not grow
with depth.

KV cache (for the sampler): `KVCache` holds the keys/values of all layers [num_layers, B, S, K, H] for S
preallocated slots (carried through the layer scan and written in place), the segment id of every slot
(0 = empty or padding) and `index`, the next slot to write: one scalar for all rows (the static
sampler), or one per row [B] (the continuous-batching engine, whose rows are at different points of
different requests). A forward with a cache writes its T new tokens at slots [index, index + T) of each
row (writes past the end are dropped) and attends to every filled slot at or before its own: prefill is
a call with index 0 and the prompt; decoding is a call with T = 1. The caller gives
the rotary positions of the new tokens (from `layout.mrope_positions`: a decoded token's position is
its number of valid predecessors + rope_delta on all three axes).

Decoding layout (`DecodeLinear`, `Qwen25VL.decode_view`): a decode step multiplies a handful of rows by
every weight, so it is bound by reading the weights. XLA:CPU streams a weight stored [out, in] about 2x
faster as `W @ x.T` than a weight stored [in, out] as `x @ W` (measured on the 2-core EPYC dev machine,
batch 8, float32: 151936x2048 head 115 vs 239 ms, 2048x11008 gate 3.6 vs 14.6 ms, 11008x2048 down 10.7 vs
17.5 ms). The decode view therefore holds transposed copies of the decoder's kernels, made once per
jitted generate call, one array per layer, and runs the layers one after the other instead of scanning
them: XLA:CPU copies a layer's slice of a stacked weight before multiplying it, which doubled the time
of a decode step (measured: 4 layers at the 3B widths, 8 rows, 106 -> 206 ms per token).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vlaa_jax import nn
from vlaa_jax import sharding as shd
from vlaa_jax.sharding import ACTIVATION_AXES
from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig


def rows_matmul(x: jax.Array, weight_t: jax.Array) -> jax.Array:
    """x [..., K] @ weight_t.T for a weight stored [N, K], computed as (weight_t @ x.T).T: the weight-major
    product that XLA:CPU streams fastest when x has few rows. The barrier keeps XLA from folding the
    (small) output transpose back into the dot, which would turn it into the slow x @ W form."""
    y = jax.lax.dot_general(weight_t, x, (((1,), (x.ndim - 1,)), ((), ())))     # [N, ...]
    return jnp.moveaxis(jax.lax.optimization_barrier(y), 0, -1)


def weight_major(w: jax.Array) -> jax.Array:
    """A materialised transposed copy of a [K, N] weight, [N, K] (the barrier stops XLA from folding the
    transpose into the consuming dot as a strided operand)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(w, 0, 1))


def decode_kernel(linear: nn.Linear, layer: int | None = None) -> jax.Array:
    """The [out, in] copy of a Linear's kernel that `DecodeLinear` multiplies (of one `layer` of a stacked
    Linear, whose kernel has a leading layer axis)."""
    k = linear.kernel[...] if layer is None else linear.kernel[layer]
    return weight_major(k.reshape(k.shape[0], -1).astype(linear.dtype))


DECODE_LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                  ("mlp", ("gate_proj", "up_proj", "down_proj")))


class DecodeLinear(nnx.Module):
    """`nn.Linear` for decoding (few rows per call): the same y = x @ kernel + bias, from a transposed
    kernel copy [out, in] multiplied weight-major (`rows_matmul`). Built from a Linear inside a jitted
    program (`Qwen25VL.decode_view`); never saved."""

    def __init__(self, linear: nn.Linear, kernel_t: jax.Array | None = None):
        k = linear.kernel[...]
        self.dtype = linear.dtype
        self.out_shape = tuple(k.shape[1:])
        self.kernel_t = decode_kernel(linear) if kernel_t is None else kernel_t
        self.bias = None if linear.bias is None else linear.bias[...].astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rows_matmul(x.astype(self.dtype), self.kernel_t).reshape(*x.shape[:-1], *self.out_shape)
        return y if self.bias is None else y + self.bias


class KVCache(NamedTuple):
    k: jax.Array                 # [num_layers, B, S, K, H]
    v: jax.Array                 # [num_layers, B, S, K, H]
    segments: jax.Array          # [B, S] int32, 0 = empty / padding slot
    index: jax.Array             # [] or [B] int32, next slot to write (all rows / per row)

    @property
    def max_len(self) -> int:
        return self.segments.shape[1]


def init_cache(config: Qwen25VLConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` slots (dtype defaults to the compute dtype)."""
    t = config.text
    dtype = config.jnp_dtype if dtype is None else jnp.dtype(dtype)
    shape = (t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segments=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def write_slots(buf: jax.Array, x: jax.Array, index: jax.Array, layer: jax.Array | int | None = None) -> jax.Array:
    """buf [(layers,) B, S, ...] with x [B, T, ...] written at slots [index, index + T) of every row (of
    `layer`): one slice for a scalar index, a per-row scatter (out-of-range slots dropped) for index [B]."""
    lead = () if layer is None else (layer,)
    if jnp.ndim(index) == 0:
        at = lead + (0, index) + (0,) * (x.ndim - 2)
        return jax.lax.dynamic_update_slice(buf, (x[None] if lead else x).astype(buf.dtype), at)
    B, T = x.shape[:2]
    rows = jnp.arange(B)[:, None]
    slots = index[:, None] + jnp.arange(T)[None]
    return buf.at[lead + (rows, slots)].set(x.astype(buf.dtype), mode="drop")


class LayerCache(NamedTuple):
    """One layer's handle on the stacked cache: all layers' keys/values and which layer this is (traced
    inside the layer scan), so the layer writes its new keys/values in place."""
    k: jax.Array                 # [num_layers, B, S, K, H]
    v: jax.Array                 # [num_layers, B, S, K, H]
    layer: jax.Array | int


class Attention(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.num_heads, self.num_kv_heads, self.head_dim = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        self.impl = config.attention_impl
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.q_proj = nn.Linear(t.hidden_size, t.num_attention_heads * t.head_dim, names=("embed", "heads"),
                                use_bias=True, **kw)
        self.k_proj = nn.Linear(t.hidden_size, t.num_key_value_heads * t.head_dim, names=("embed", "kv_heads"),
                                use_bias=True, **kw)
        self.v_proj = nn.Linear(t.hidden_size, t.num_key_value_heads * t.head_dim, names=("embed", "kv_heads"),
                                use_bias=True, **kw)
        self.o_proj = nn.Linear(t.num_attention_heads * t.head_dim, t.hidden_size, names=("heads", "embed"),
                                use_bias=False, **kw)

    def __call__(self, x, cos, sin, mask, segment_ids, kv_cache: LayerCache | None = None, index=None,
                 last_only=False):
        """last_only: keys/values (and the cache) for all T tokens, but queries and output for the last
        token only ([B, 1, D]): all a prefill's top layer has to compute."""
        B, T, _ = x.shape
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        k = nn.apply_rotary(k, cos, sin)
        if last_only:
            x, cos, sin, mask = x[:, -1:], cos[:, -1:], sin[:, -1:], mask[:, :, -1:]
            segment_ids = None
        q = nn.apply_rotary(self.q_proj(x).reshape(B, x.shape[1], self.num_heads, self.head_dim), cos, sin)
        if kv_cache is not None:
            ck, cv, layer = kv_cache
            ck, cv = write_slots(ck, k, index, layer), write_slots(cv, v, index, layer)
            kv_cache = LayerCache(ck, cv, layer)
            k = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False).astype(q.dtype)
            v = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False).astype(q.dtype)
        # Without a cache, the mask is causal + segment equality: splash can use its fast path.
        out = nn.dot_product_attention(q, k, v, mask, implementation=self.impl, causal=True,
                                       segment_ids=segment_ids if kv_cache is None else None)
        return self.o_proj(out.reshape(B, q.shape[1], -1)), kv_cache


class DecoderLayer(nnx.Module):
    """Pre-norm attention + SwiGLU block. Built like vision.VisionBlock, but not shared with it: the
    attribute names are HF's parameter names (input_layernorm / self_attn vs norm1 / attn), and the call
    signatures differ (KV cache vs window attention)."""

    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.input_layernorm = nn.RMSNorm(t.hidden_size, eps=t.rms_norm_eps, **kw)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = nn.RMSNorm(t.hidden_size, eps=t.rms_norm_eps, **kw)
        self.mlp = nn.SwiGLU(t.hidden_size, t.intermediate_size, act=t.hidden_act, use_bias=False, **kw)

    def __call__(self, x, cos, sin, mask, segment_ids, kv_cache=None, index=None, last_only=False):
        h, kv_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, segment_ids, kv_cache, index,
                                     last_only)
        x = (x[:, -1:] if last_only else x) + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        # Block boundary: rows stay split over the data-parallel axes (FSDP then gathers weights
        # instead of all-reducing activations).
        return shd.constrain(x, ACTIVATION_AXES), kv_cache


class TextModel(nnx.Module):
    """Embedding, decoder layers (stacked, scanned) and final norm (the lm_head lives in the full model)."""

    # Set on decode views only (`use_decode_layout`): per decoder Linear, one [out, in] kernel per layer.
    _decode_kernels: dict[str, tuple[jax.Array, ...]] | None = None

    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.embed_tokens = nn.param(rngs, nnx.initializers.normal(1.0), (t.vocab_size, t.hidden_size),
                                     config.param_dtype, ("vocab", "embed"))
        self.layers = nn.stacked(lambda r: DecoderLayer(config, rngs=r), t.num_hidden_layers, rngs)
        self.norm = nn.RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=config.dtype,
                               param_dtype=config.param_dtype, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.config.jnp_dtype)

    def decode_kernels(self) -> dict[str, tuple[jax.Array, ...]]:
        """Per decoder Linear (by name), the transposed kernel [out, in] of every layer (`decode_kernel`),
        each its own array (see the module docstring, "Decoding layout")."""
        return {name: tuple(decode_kernel(getattr(getattr(self.layers, part), name), i)
                            for i in range(self.config.text.num_hidden_layers))
                for part, names in DECODE_LINEARS for name in names}

    def use_decode_layout(self, kernels: dict[str, tuple[jax.Array, ...]] | None = None) -> None:
        """Makes this model a decode view (in place: call it on a view made inside a jitted program, see
        `Qwen25VL.decode_view`): its layers then run one by one, every decoder Linear as a `DecodeLinear`
        on its layer's kernel from `kernels` (`decode_kernels()`, made here when not given)."""
        self._decode_kernels = nnx.data(self.decode_kernels() if kernels is None else kernels)

    def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, segment_ids: jax.Array,
                 cache: KVCache | None = None, last_only: bool = False, shared_prefix: bool = False
                 ) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds [B, T, D], position_ids [3, B, T], segment_ids [B, T] -> (final-norm hidden
        [B, T, D], updated cache or None). last_only: hidden of the last token only, [B, 1, D] (a
        prefill: layers 0..N-2 run in the scan, then the top layer, its slice of the stacked parameters,
        computes keys/values for every token and the rest for the last one, the only one whose output
        is used). shared_prefix (no cache): segment 1 is read by every segment of its row
        (`nn.attention_mask`); attention then takes the dense mask, not the segment-id kernel path."""
        t = self.config.text
        cos, sin = nn.mrope(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
        segment_ids = segment_ids.astype(jnp.int32)
        if cache is None:
            mask = nn.attention_mask(segment_ids, segment_ids, causal=True, shared_prefix=shared_prefix)
        elif shared_prefix:
            raise ValueError("shared_prefix is for a forward without a KV cache")
        else:
            T = inputs_embeds.shape[1]
            segments = write_slots(cache.segments, segment_ids, cache.index)
            q_slots = jnp.reshape(cache.index, (-1, 1)) + jnp.arange(T)[None]
            mask = nn.attention_mask(segment_ids, segments, causal=True, q_slots=q_slots)
        index = None if cache is None else cache.index
        graphdef, stacked = nnx.split(self.layers)
        num_layers = t.num_hidden_layers

        def layer_at(i):
            """Layer i (traced or static) as a module: its slice of the stacked state."""
            return nnx.merge(graphdef, jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                                                    stacked))

        def run(layer, carry, i, last_only=False):
            x, kv = carry
            x, kv = layer(x, cos, sin, mask, None if shared_prefix else segment_ids,
                          None if kv is None else LayerCache(*kv, i), index, last_only=last_only)
            return x, None if kv is None else kv[:2]

        def body(carry, xs):
            params, i = xs
            return run(layer_at(i) if params is None else nnx.merge(graphdef, params), carry, i), None

        carry = (inputs_embeds, None if cache is None else (cache.k, cache.v))
        if self._decode_kernels is not None:          # decode view: layer by layer, per-layer kernels
            for i in range(num_layers):
                carry = run(self._decode_layer(layer_at(i), i), carry, i, last_only and i == num_layers - 1)
        else:
            # Remat only pays in a backward pass; with a KV cache (prefill / decode inside the sampler's
            # while_loop) there is none. Inside the scan it covers one layer, as the unscanned layers did.
            policy = self.config.remat_policy if cache is None else "none"
            if policy != "none":
                body = jax.checkpoint(body, policy=nn.remat_policy(policy), prevent_cse=False)
            scanned = num_layers - 1 if last_only else num_layers
            # All layers: their parameters are the scan's inputs (their gradients its outputs). The
            # prefill's first N-1: indexed out of the stacked state (inference only), no sliced copy.
            xs = (stacked if scanned == num_layers else None, jnp.arange(scanned, dtype=jnp.int32))
            if scanned:
                carry, _ = jax.lax.scan(body, carry, xs)
            if last_only:
                carry = run(layer_at(num_layers - 1), carry, num_layers - 1, last_only=True)
        x, kv = carry
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], segments=segments, index=cache.index + inputs_embeds.shape[1])
        return self.norm(x), cache

    def _decode_layer(self, layer: DecoderLayer, i: int) -> DecoderLayer:
        """Layer i of a decode view: its decoder Linears swapped (in place) for `DecodeLinear`s on the
        layer's own kernel copies (its sliced standard kernels are then unused, and dropped by XLA)."""
        for part, names in DECODE_LINEARS:
            module = getattr(layer, part)
            for name in names:
                setattr(module, name, DecodeLinear(getattr(module, name), self._decode_kernels[name][i]))
        return layer
