"""Per-token log-probs and entropies of sampled tokens without the full [B, L, vocab] float32 logits.

With Qwen2.5's 151,936-entry vocabulary, float32 logits for a 256 x 2048 train batch would be ~300 GiB,
and even one chunk's logits (e.g. 32 x 64 tokens x 151,936 x 4 B = 1.2 GB) is several passes over main
memory per elementwise step. `token_logprobs` is a fused head with a hand-written backward
(`jax.custom_vjp`) that never holds more than one small logits block:

- The sequence axis is cut into chunks of `chunk_size` positions (the batch axis stays whole, so
  data-parallel sharding of B is untouched: no gather of the hidden states), walked one after the other.
- Within a chunk the vocabulary is walked in blocks of about `vocab_block` rows (a strided set of rows:
  block k holds rows j * num_blocks + k, so a vocabulary sharded in contiguous ranges over tensor-parallel
  devices stays sharded within every block). Each block's logits [B, chunk, block] stay in cache: the
  forward keeps a running max, sum of exp and sum of exp * (max - logit) (online softmax) per token, so
  the log-normaliser and the entropy come out of one pass over the vocabulary; the target's logit is
  hidden . lm_head[target] (a gather of D-vectors, no [.., V] select).
- The backward keeps as residuals only the inputs (hidden, lm_head, targets) and the per-token
  log-normaliser and entropy; per block it recomputes the logits and the softmax and forms the logits'
  gradient g_logp * (onehot - p) - g_ent * p * (log p + H) (over the temperature), then
  d hidden += it @ block and d lm_head[block] = it^T @ hidden as a contraction over the tokens (no
  transposed copy of a [V, tokens] array). Peak extra memory: one block's logits and its gradient, plus a
  float32 lm_head gradient when there are several chunks.

Alignment is the caller's: logp[b, t] = log softmax(hidden[b, t] @ lm_head.T / temperature)[targets[b, t]],
so for next-token prediction pass hidden[:, :-1] with targets = input_ids[:, 1:]. Positions where
mask == 0 return 0 (their targets may be any id, e.g. padding) and get no gradient.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Default vocabulary block: about this many bytes of float32 logits per block (B x chunk x block x 4),
# a block that stays in a CPU core's cache with its gradient; at least _MIN_BLOCK rows.
_BLOCK_BYTES = 4 << 20
_MIN_BLOCK = 256


class _Spec(NamedTuple):
    """The static layout of one head call."""
    chunk: int            # sequence positions per chunk
    num_chunks: int
    num_blocks: int       # vocabulary blocks
    block: int            # rows per block (num_blocks * block >= vocab; the rest is padding)
    vocab: int
    temperature: float


def _vocab_blocks(vocab: int, block: int) -> tuple[int, int]:
    """(num_blocks, rows per block) for `vocab` rows cut into blocks of about `block` rows: a divisor of
    vocab when one gives blocks of block / 2 to block rows (no padding; Qwen2.5's 151,936 = 128 x 1187),
    else the fewest equal blocks of at most `block` rows, the last rows of the last blocks padding."""
    block = max(1, min(int(block), vocab))
    fewest = -(-vocab // block)
    for num in range(fewest, 2 * fewest + 1):
        if vocab % num == 0:
            return num, vocab // num
    return fewest, -(-vocab // fewest)


def _split(x: jax.Array, spec: _Spec) -> jax.Array:
    """[B, L, ...] -> [num_chunks, B, chunk, ...], the tail padded with zeros."""
    pad = spec.num_chunks * spec.chunk - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((x.shape[0], spec.num_chunks, spec.chunk) + x.shape[2:]), 1, 0)


def _merge(x: jax.Array, length: int) -> jax.Array:
    """[num_chunks, B, chunk, ...] -> [B, L, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


def _over_chunks(fn, xs: tuple, spec: _Spec, carry=None):
    """fn(carry, chunk_xs) -> (carry, ys) over the chunks of every x [B, L, ...] (one chunk: no loop)."""
    if spec.num_chunks == 1:
        ys = fn(carry, tuple(x for x in xs))
        return ys
    split = tuple(_split(x, spec) for x in xs)
    carry, ys = lax.scan(fn, carry, split)
    return carry, ys


def _blocked(w: jax.Array, spec: _Spec) -> jax.Array:
    """lm_head [V, D] -> [block, num_blocks, D]: [j, k] is row j * num_blocks + k (zero rows padding)."""
    pad = spec.num_blocks * spec.block - spec.vocab
    if pad:
        w = jnp.pad(w, [(0, pad), (0, 0)])
    return w.reshape(spec.block, spec.num_blocks, w.shape[-1])


def _block_logits(h: jax.Array, w3: jax.Array, k, spec: _Spec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(raw logits float32 [B, c, block] of vocabulary block k (not divided by the temperature: the
    callers fold 1 / temperature into their elementwise pass), the block's rows [block, D], their
    vocabulary ids [block]); padding rows' logits are -1e30 (exp gives 0)."""
    wk = w3[:, 0] if spec.num_blocks == 1 else lax.dynamic_index_in_dim(w3, k, axis=1, keepdims=False)
    z = lax.dot_general(h, wk, (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ids = jnp.arange(spec.block, dtype=jnp.int32) * spec.num_blocks + k
    if spec.num_blocks * spec.block > spec.vocab:
        z = jnp.where(ids < spec.vocab, z, -1e30)
    return z, wk, ids


def _over_blocks(fn, carry, spec: _Spec):
    """fn(carry, k) -> carry over the vocabulary blocks (one block: no loop)."""
    if spec.num_blocks == 1:
        return fn(carry, 0)
    return lax.fori_loop(0, spec.num_blocks, lambda k, c: fn(c, k), carry)


def _forward(hidden, w, targets, spec: _Spec):
    """(logp, entropy, lse), float32 [B, L]."""
    w3 = _blocked(w, spec)

    def chunk_stats(carry, xs):
        (h,) = xs

        # Online over the blocks, per token, in raw logits r (z = r / T): the running max m, s = sum
        # exp((r - m) / T) and q = sum exp((r - m) / T) * (m - r) >= 0. Then lse = m / T + log s and
        # H = log s + q / (T s): two non-negative terms (a peaked distribution makes both small), not the
        # difference of lse and E[z], which cancels ~|z| to give a small entropy.
        def step(c, k):
            m, s, q = c
            r, _, _ = _block_logits(h, w3, k, spec)
            m_new = jnp.maximum(m, jnp.max(r, axis=-1))
            shift = m_new - m                                   # >= 0; inf on the first block
            scale = jnp.exp(-shift / spec.temperature)
            d = m_new[..., None] - r
            e = jnp.exp(-d / spec.temperature)
            q_old = jnp.where(s > 0, scale * (q + shift * s), 0.0)
            return m_new, s * scale + jnp.sum(e, axis=-1), q_old + jnp.sum(e * d, axis=-1)

        shape = h.shape[:2]
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape, jnp.float32))
        m, s, q = _over_blocks(step, init, spec)
        log_s = jnp.log(s)
        return carry, (m / spec.temperature + log_s, log_s + q / (spec.temperature * s))

    _, (lse, entropy) = _over_chunks(chunk_stats, (hidden,), spec)
    if spec.num_chunks > 1:
        lse, entropy = _merge(lse, hidden.shape[1]), _merge(entropy, hidden.shape[1])
    rows = jnp.take(w, targets, axis=0)                                # [B, L, D]
    target_logit = lax.dot_general(hidden, rows, (((2,), (2,)), ((0, 1), (0, 1))),
                                   preferred_element_type=jnp.float32) / spec.temperature
    return target_logit - lse, entropy, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head(hidden, w, targets, spec: _Spec):
    logp, entropy, _ = _forward(hidden, w, targets, spec)
    return logp, entropy


def _head_fwd(hidden, w, targets, spec: _Spec):
    logp, entropy, lse = _forward(hidden, w, targets, spec)
    return (logp, entropy), (hidden, w, targets, lse, entropy)


def _head_bwd(spec: _Spec, res, cts):
    hidden, w, targets, lse, entropy = res
    g_logp, g_ent = (jnp.asarray(g, jnp.float32) for g in cts)
    w3 = _blocked(w, spec)
    # One chunk: each block's gradient is written once, in lm_head's dtype; several: accumulated in float32.
    acc_dtype = w.dtype if spec.num_chunks == 1 else jnp.promote_types(w.dtype, jnp.float32)

    def chunk_grad(dw3, xs):
        h, t, lse_c, ent_c, glp, gent = (x[..., None] if x.ndim == 2 else x for x in xs)
        # d lm_head[block]^T = hidden^T @ d logits: hidden^T [D, B * c] once per chunk (the dot's lhs
        # contracting its minor axis), not a transposed copy of every block's [B, c, block] gradient.
        h_t = h.reshape(-1, h.shape[-1]).T

        def step(c, k):
            dh, dw3 = c
            r, wk, ids = _block_logits(h, w3, k, spec)
            z = r / spec.temperature
            p = jnp.exp(z - lse_c)
            # d logp / dz = onehot - p;  d H / dz = -p (z - lse + H)   (log p = z - lse)
            dz = jnp.where(ids == t, glp, 0.0) - p * (glp + gent * (z - lse_c + ent_c))
            dz = dz / spec.temperature
            dh = dh + lax.dot_general(dz, wk, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            dwk = lax.dot_general(h_t, dz.reshape(-1, dz.shape[-1]), (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32).T
            if spec.num_blocks == 1:
                return dh, (dw3 + dwk[:, None]).astype(acc_dtype)
            old = lax.dynamic_index_in_dim(dw3, k, axis=1, keepdims=False)
            return dh, lax.dynamic_update_index_in_dim(dw3, (old + dwk).astype(acc_dtype), k, axis=1)

        dh0 = jnp.zeros(h.shape, jnp.float32)
        dh, dw3 = _over_blocks(step, (dh0, dw3), spec)
        return dw3, dh.astype(hidden.dtype)

    dw3 = jnp.zeros(w3.shape, acc_dtype)
    dw3, dh = _over_chunks(chunk_grad, (hidden, targets, lse, entropy, g_logp, g_ent), spec, dw3)
    if spec.num_chunks > 1:
        dh = _merge(dh, hidden.shape[1])
    dw = dw3.reshape(-1, w.shape[-1])[:spec.vocab].astype(w.dtype)
    return dh, dw, None


_head.defvjp(_head_fwd, _head_bwd)


def _finish(logp, entropy, mask):
    if mask is not None:
        valid = jnp.asarray(mask).astype(bool)
        logp = jnp.where(valid, logp, 0.0)
        entropy = jnp.where(valid, entropy, 0.0)
    return logp, entropy


def head_vocab_blocks(batch: int, chunk: int, vocab: int, vocab_block: int | None = None) -> tuple[int, int]:
    """(num_blocks, rows per block) of a head call over [batch, chunk] positions (the default block: about
    4 MiB of float32 logits, at least 256 rows); also what tools/plan_memory.py counts for its logits."""
    if vocab_block is None:
        vocab_block = max(_MIN_BLOCK, _BLOCK_BYTES // (4 * batch * chunk))
    return _vocab_blocks(vocab, vocab_block)


def token_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array,
                   mask: jax.Array | None = None, *, chunk_size: int = 256,
                   temperature: float = 1.0, vocab_block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(log p(target), entropy), both float32 [B, L], from final hidden states [B, L, D] and the
    output projection lm_head [vocab, D] (the tied embedding for Qwen2.5-VL-3B).

    chunk_size: sequence positions per chunk. vocab_block: vocabulary rows per block (default: about
    4 MiB of float32 logits per block, B * chunk * rows * 4 bytes, at least 256 rows).
    The matmuls run in the inputs' dtype with float32 accumulation; `temperature` (a Python number)
    divides the logits (pass the sampling temperature so the ratio matches the rollout's log-probs).
    Differentiable in hidden and lm_head.
    """
    batch, length, dim = hidden.shape
    if lm_head.ndim != 2 or lm_head.shape[1] != dim:
        raise ValueError(f"lm_head must be [vocab, {dim}], got {lm_head.shape}")
    vocab = lm_head.shape[0]
    targets = jnp.clip(targets.astype(jnp.int32), 0, vocab - 1)
    chunk = max(1, min(int(chunk_size), length))
    num_blocks, block = head_vocab_blocks(batch, chunk, vocab, vocab_block)
    spec = _Spec(chunk, -(-length // chunk), num_blocks, block, vocab, float(temperature))
    logp, entropy = _head(hidden, lm_head, targets, spec)
    return _finish(logp, entropy, mask)
