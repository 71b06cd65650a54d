"""Splash attention (Pallas, TPU): the model's `attention_impl="splash"` back end.

Same contract as `vlaa_jax.nn.dot_product_attention`: query [B, T, N, H], key/value [B, S, K, H]
(GQA: N % K == 0), boolean mask [B, 1 or N, T, S], softmax scale (default 1/sqrt(H)); returns
[B, T, N, H] in the query dtype.

Two mask paths:
  * `segment_ids=` [B, T] (+ `causal=`) — the fast path: a static causal/full mask AND-ed with
    segment equality inside the kernel; fully masked blocks are skipped.
  * a dense boolean `mask` — a dynamic per-example mask (works, but pays for mask processing at run
    time); prefer segment ids where the caller has them.
Under a mesh (`jax.set_mesh`), the kernel runs per shard through `jax.shard_map`, batch over the
rules' `batch` axes and heads over the `heads` axes (Pallas calls cannot be auto-partitioned).
On a non-TPU back end it raises a clear error, unless `interpret=True` (the Pallas interpreter: any
platform, slow; the CPU tests run whole models through it with
`functools.partial(dot_product_attention, interpret=True)` in place of this function).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from vlaa_jax import sharding as shd

# Kernel blocks (tokens): 512 is the library default; blocks are multiples of the 128 TPU lanes, and
# sequences are padded to a multiple of 128 (padding never mixes with real tokens).
DEFAULT_BLOCK = 512
LANES = 128


def _check_backend(interpret: bool) -> None:
    if not interpret and jax.default_backend() != "tpu":
        raise ValueError(
            f"attention_impl='splash' needs a TPU (the Pallas splash kernel), but the JAX back end is "
            f"{jax.default_backend()!r}; use attention_impl='xla' (any platform) or 'cudnn' (GPU)")


def _block(n: int, block: int) -> int:
    """The largest of `block`, 512, 256, 128 that divides `n` (a multiple of 128)."""
    for b in (block, 512, 256, LANES):
        if b <= n and n % b == 0 and b % LANES == 0:
            return b
    return LANES


def _block_sizes(t: int, s: int, block: int):
    bq, bkv = _block(t, block), _block(s, block)
    return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                         block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def _per_shard(q, k, v, mask, segment_ids, *, causal, block, interpret):
    """q [B, N, T, H] (already scaled), k/v [B, N, S, H]; vmapped over B; no mesh here."""
    _, n, t, _ = q.shape
    s = k.shape[2]
    sizes = _block_sizes(t, s, block)
    if mask is None:
        head = sa.CausalMask((t, s)) if causal else sa.FullMask((t, s))
        kernel = sa.make_splash_mha(sa.MultiHeadMask([head] * n), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
        if segment_ids is None:
            return jax.vmap(kernel)(q, k, v)
        seg = segment_ids.astype(jnp.int32)
        return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(s1, s1)))(
            q, k, v, seg)

    def one(q1, k1, v1, m1):
        kernel = sa.make_splash_mha(jnp.broadcast_to(m1, (n, t, s)), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
        # The library turns the Python flag `is_dynamic_mask` into an array, a tracer under jit: restore it.
        for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
            info = getattr(kernel, name)
            if info is not None:
                setattr(kernel, name, info._replace(is_dynamic_mask=True))
        return kernel(q1, k1, v1)

    return jax.vmap(one)(q, k, v, mask)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None, *, scale: float | None = None,
                          segment_ids: jax.Array | None = None, causal: bool = False,
                          block: int = DEFAULT_BLOCK, interpret: bool = False) -> jax.Array:
    """Splash attention with the `jax.nn.dot_product_attention` layout (see the module docstring)."""
    _check_backend(interpret)
    if mask is not None and segment_ids is not None:
        raise ValueError("splash attention: give either a dense `mask` or `segment_ids`, not both")
    b, t, n, h = query.shape
    kh = key.shape[2]
    if n % kh:
        raise ValueError(f"splash attention: {n} query heads are not a multiple of {kh} key/value heads")
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    q = (query * jnp.asarray(scale, query.dtype)).transpose(0, 2, 1, 3)
    # GQA: repeat key/value heads so heads shard the same way as the query heads.
    k = jnp.repeat(key.transpose(0, 2, 1, 3), n // kh, axis=1)
    v = jnp.repeat(value.transpose(0, 2, 1, 3), n // kh, axis=1)
    s_len = key.shape[1]
    tp, sp = -t % LANES, -s_len % LANES
    if mask is None and segment_ids is None and (tp or sp):
        mask = jnp.ones((b, 1, t, s_len), jnp.bool_)
        if causal:
            mask = jnp.tril(mask, s_len - t)
    if mask is not None:
        mask = jnp.broadcast_to(mask.astype(jnp.bool_), (b, mask.shape[1], t, s_len))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, tp), (0, sp)))
        # The kernel's softmax needs at least one allowed key per query row; rows without one (padding)
        # may see key min(i, S - 1). Their outputs are garbage either way, but finite.
        t2, s2 = t + tp, s_len + sp
        fallback = jnp.arange(s2)[None, :] == jnp.minimum(jnp.arange(t2), s2 - 1)[:, None]
        mask = mask | (fallback & ~jnp.any(mask, axis=-1, keepdims=True))
    if segment_ids is not None:
        if t != s_len:
            raise ValueError(f"splash attention: segment_ids need self-attention (T == S), got {t} != {s_len}")
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp)), constant_values=-1)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, tp), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, sp), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, sp), (0, 0)))
    fn = functools.partial(_per_shard, causal=causal, block=block, interpret=interpret)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and math.prod(mesh.axis_sizes) > 1:
        P = jax.sharding.PartitionSpec
        qspec = shd.logical_to_spec(("batch", "heads", None, None), shd.active_rules(),
                                    shape=q.shape, mesh=mesh)
        bspec = qspec[0] if len(qspec) else None
        hspec = qspec[1] if len(qspec) > 1 else None
        mspec = None if mask is None else P(bspec, hspec if mask.shape[1] == n else None)
        sspec = None if segment_ids is None else P(bspec)
        body = lambda q_, k_, v_, m_, s_: fn(q_, k_, v_, m_, s_)
        out = jax.shard_map(body, in_specs=(P(bspec, hspec), P(bspec, hspec), P(bspec, hspec), mspec,
                                            sspec),
                            out_specs=P(bspec, hspec), check_vma=False)(q, k, v, mask, segment_ids)
    else:
        out = fn(q, k, v, mask, segment_ids)
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(query.dtype)
