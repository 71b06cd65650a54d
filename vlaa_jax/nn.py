"""Layers shared by the vision towers and the decoder: parameters with logical axes, linear, RMSNorm,
LayerNorm, SwiGLU, a two-layer MLP, rotary embeddings (2D for vision, M-RoPE for text) and the ONE attention function.

Numerics follow HF Qwen2.5-VL: norms and softmax in float32, rotary angles in float32, matmuls in the
compute dtype. Parameters carry logical axis names (vlaa_jax/sharding/) in their `out_sharding`
metadata; which mesh axes they land on is decided by the sharding module, never here.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd

from vlaa_jax import sharding as shd
from vlaa_jax.kernels import splash_attention
from vlaa_jax.sharding import LOGICAL_AXES

ATTENTION_IMPLS = ("xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "save_dots")


# ------------------------------------------------------------------------------------------------ params

def _eager_sharding() -> bool:
    """Shard parameters at creation only where that can work: eager sharding on (Flax default), a mesh
    set (`jax.set_mesh`) and logical-axis rules active (`nnx.logical_axis_rules`). Otherwise parameters
    are created unsharded (still annotated), e.g. on one CPU in tests and tools."""
    return (nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
            and bool(spmd.get_logical_axis_rules()))


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], dtype, names: Sequence[str | None]) -> nnx.Param:
    """An `nnx.Param` annotated with logical axis `names` (one per dim, None = replicated)."""
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} axis names {names} for a parameter of shape {tuple(shape)}")
    for n in names:
        if n is not None and n not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {n!r}; known: {LOGICAL_AXES}")
    value = init(rngs.params(), tuple(shape), jnp.dtype(dtype))
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=_eager_sharding())


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel [*in_shape, *out_shape] (HF torch weight transposed)."""

    def __init__(self, in_features: int, out_shape: int | Sequence[int], *, names: Sequence[str | None],
                 use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.dtype = jnp.dtype(dtype)
        init = nnx.initializers.normal(1.0 / np.sqrt(in_features))
        self.kernel = param(rngs, init, (in_features, *out_shape), param_dtype, names)
        self.bias = param(rngs, nnx.initializers.zeros, out_shape, param_dtype, names[1:]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(self.dtype)
        y = jnp.tensordot(x.astype(self.dtype), k, axes=1)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, normalised in float32 (HF Qwen2RMSNorm)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = jnp.dtype(dtype)
        self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * xf.astype(self.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias, normalised in float32 (torch LayerNorm; Qwen2-VL's vision tower)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = jnp.dtype(dtype)
        self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * xf.astype(self.dtype) + self.bias[...].astype(self.dtype)


ACTIVATIONS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class SwiGLU(nnx.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, *, act: str, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(dim, hidden, names=("embed", "mlp"), **kw)
        self.up_proj = Linear(dim, hidden, names=("embed", "mlp"), **kw)
        self.down_proj = Linear(hidden, dim, names=("mlp", "embed"), **kw)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = shd.constrain(self.act(self.gate_proj(x)) * self.up_proj(x), shd.MLP_AXES)
        return self.down_proj(h)


class FeedForward(nnx.Module):
    """fc2(act(fc1(x))), with biases (the ViT MLP of Qwen2-VL's vision tower)."""

    def __init__(self, dim: int, hidden: int, *, act: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(dim, hidden, names=("embed", "mlp"), **kw)
        self.fc2 = Linear(hidden, dim, names=("mlp", "embed"), **kw)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(shd.constrain(self.act(self.fc1(x)), shd.MLP_AXES))


# ------------------------------------------------------------------------------------------------ rotary

def inv_frequencies(dim: int, theta: float) -> jax.Array:
    """1 / theta^(2i/dim), i < dim/2, rounded to float32 like torch."""
    return jnp.asarray(1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)), jnp.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., T, N, H] rotated by cos/sin [..., T, H] (broadcast over heads), in float32."""
    xf = x.astype(jnp.float32)
    out = xf * cos[..., None, :] + rotate_half(xf) * sin[..., None, :]
    return out.astype(x.dtype)


def rotary_2d(hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Vision 2D RoPE: hw int [T, 2] (row, col) -> cos, sin [T, head_dim]. The first quarter of the
    frequencies rotate by row, the second by column, and the pattern repeats for the second half."""
    inv = inv_frequencies(head_dim // 2, theta)                      # [head_dim / 4]
    freqs = hw.astype(jnp.float32)[..., None] * inv                  # [T, 2, head_dim / 4]
    freqs = freqs.reshape(*hw.shape[:-1], -1)                        # [T, head_dim / 2] = (h | w)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope(position_ids: jax.Array, head_dim: int, theta: float,
          section: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Multimodal RoPE: position_ids [3, B, T] (temporal, height, width) -> cos, sin [B, T, head_dim].
    Frequency band j uses axis (j-th section) % 3: sections (16, 24, 24) give t, h, w bands."""
    inv = inv_frequencies(head_dim, theta)                           # [head_dim / 2]
    axis = np.repeat(np.arange(len(section)) % 3, section)           # frequency band -> position axis
    pos = position_ids.astype(jnp.float32)[axis]                     # [head_dim / 2, B, T]
    freqs = jnp.moveaxis(pos, 0, -1) * inv                           # [B, T, head_dim / 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# --------------------------------------------------------------------------------------------- attention

def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, *, causal: bool,
                   q_slots: jax.Array | None = None, kv_slots: jax.Array | None = None,
                   shared_prefix: bool = False) -> jax.Array:
    """Boolean mask [B, 1, T, S]: same segment id (0 = padding, never attends or is attended) and, when
    `causal`, key slot <= query slot (slots default to 0..T-1 / 0..S-1). shared_prefix: keys of segment
    1 are also read by every other segment of the row (one prompt laid out once before its n responses,
    each its own segment: the prompt's forward is shared, `grpo_step.response_logprobs`)."""
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    if shared_prefix:
        same |= kv_segments[:, None, :] == 1
    mask = same & (kv_segments[:, None, :] > 0)
    mask &= (q_segments[:, :, None] > 0)
    if causal:
        T, S = q_segments.shape[1], kv_segments.shape[1]
        qs = jnp.arange(T)[None] if q_slots is None else q_slots
        ks = jnp.arange(S)[None] if kv_slots is None else kv_slots
        mask &= ks[:, None, :] <= qs[:, :, None]
    return mask[:, None]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array, *,
                          implementation: str = "xla", scale: float | None = None,
                          segment_ids: jax.Array | None = None, causal: bool = False) -> jax.Array:
    """Attention for both towers. query [B, T, N, H], key/value [B, S, K, H] (GQA: N % K == 0), boolean
    mask [B, 1 or N, T, S] (from `attention_mask`). Softmax in float32. Rows with no allowed key give
    finite garbage (padding positions).

    implementation: "xla" (`jax.nn.dot_product_attention`, any platform); "cudnn" (cuDNN fused kernel on
    GPU for bf16/fp16; falls back to "xla" elsewhere, e.g. CPU or float32); "splash"
    (`vlaa_jax.kernels.splash_attention.dot_product_attention`, TPU). For self-attention
    (T == S, no cache) callers may also give the `segment_ids` [B, T] and `causal` flag the mask was
    built from: splash then uses its segment-id fast path instead of the dense mask (padding tokens,
    id 0, may then attend to each other; their outputs are ignored anyway).
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {ATTENTION_IMPLS}")
    if implementation == "splash":
        if segment_ids is not None:       # the kernel's fast path: static mask AND segment equality
            return splash_attention.dot_product_attention(query, key, value, scale=scale, segment_ids=segment_ids,
                                                          causal=causal)
        return splash_attention.dot_product_attention(query, key, value, mask=mask, scale=scale)
    impl = "xla"
    if (implementation == "cudnn" and jax.default_backend() == "gpu"
            and query.dtype in (jnp.bfloat16, jnp.float16) and query.shape[-1] % 8 == 0):
        impl = "cudnn"
    return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, implementation=impl)


def local_segment_attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array, *,
                            max_segment_len: int, implementation: str = "xla",
                            scale: float | None = None) -> jax.Array:
    """Non-causal self-attention within contiguous segments no longer than `max_segment_len` (the vision
    windows, in window order), in O(T * max_segment_len) instead of O(T^2) memory and compute.

    query/key/value [B, T, N, H], segment_ids [B, T] (0 = padding; B independent sequences, e.g. image
    groups). Each sequence is cut into chunks of C = 2 * max_segment_len queries; each chunk attends to
    its keys plus a halo of max_segment_len on each side, which holds every key of every segment the
    chunk touches. Keys outside a query's segment are masked, so the result equals the dense
    segment-masked attention. Fixed shapes; no loop over images.
    """
    B, T = query.shape[:2]
    halo = max_segment_len
    C = 2 * max_segment_len
    if T <= C + 2 * halo or implementation == "splash":   # small, or a kernel that skips masked blocks
        mask = attention_mask(segment_ids, segment_ids, causal=False)
        return dot_product_attention(query, key, value, mask, implementation=implementation, scale=scale,
                                     segment_ids=segment_ids)
    n = -(-T // C)
    pad = n * C - T
    heads = query.shape[2:]
    q = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B * n, C, *heads)
    q_seg = jnp.pad(segment_ids, ((0, 0), (0, pad))).reshape(B * n, C)
    idx = jnp.arange(n)[:, None] * C + jnp.arange(C + 2 * halo)[None]    # [n, C + 2 halo] into padded kv
    kv_pad = ((0, 0), (halo, pad + halo), (0, 0), (0, 0))
    k = jnp.pad(key, kv_pad)[:, idx].reshape(B * n, C + 2 * halo, *key.shape[2:])
    v = jnp.pad(value, kv_pad)[:, idx].reshape(B * n, C + 2 * halo, *value.shape[2:])
    kv_seg = jnp.pad(segment_ids, ((0, 0), (halo, pad + halo)))[:, idx].reshape(B * n, C + 2 * halo)
    mask = attention_mask(q_seg, kv_seg, causal=False)
    out = dot_product_attention(q, k, v, mask, implementation=implementation, scale=scale)
    return out.reshape(B, n * C, *out.shape[2:])[:, :T]


# ------------------------------------------------------------------------------------------ stacked blocks

def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n identical blocks as ONE module whose parameters have a leading axis of size n (logical axis
    "layers" prepended to each parameter's names), for a scan over depth: `nnx.vmap` over one key per
    block, so the blocks are initialised independently, as separate modules would be."""
    keys = jax.random.split(rngs.params(), n)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def one(key: jax.Array) -> nnx.Module:
        return make(nnx.Rngs(params=key))

    return one(keys)


# ------------------------------------------------------------------------------------------------- remat

def remat_policy(name: str):
    """`jax.checkpoint` policy for the config's remat_policy ("none" -> no remat)."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"remat_policy={name!r}: expected one of {REMAT_POLICIES}")
