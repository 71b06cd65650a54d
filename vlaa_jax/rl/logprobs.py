"""Per-token log-probs and entropies of sampled tokens without the full [B, L, vocab] float32 logits.

With Qwen2.5's 151,936-entry vocabulary, float32 logits for a 256 x 2048 train batch would be ~300 GiB.
The sequence axis is cut into chunks of `chunk_size` positions processed one after the other under
`lax.map` (the batch axis stays whole, so data-parallel sharding of B is untouched); each chunk's body
is wrapped in `jax.checkpoint`, so the backward pass keeps only the chunk inputs (hidden states,
targets) as residuals and recomputes that chunk's logits. Peak logits memory is
B_local * chunk_size * vocab * 4 bytes, in the forward and in the gradient (e.g. 4 sequences per
device x 256 positions x 151,936 x 4 B = 622 MB). When all positions fit in one chunk, the logits are
kept for the backward pass instead of recomputed: the same peak memory (the backward of the loss
starts right after its forward), one vocabulary projection (2 * B * L * vocab * D FLOPs) less.

Alignment is the caller's: logp[b, t] = log softmax(hidden[b, t] @ lm_head.T / temperature)[targets[b, t]],
so for next-token prediction pass hidden[:, :-1] with targets = input_ids[:, 1:]. Positions where
mask == 0 return 0 (their targets may be any id, e.g. padding).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _logp_and_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits float32 [..., V], targets int [...] -> (log p(target), entropy), both [...].

    One exp pass over the vocabulary serves the log-normaliser and the entropy (softmax = e / sum e);
    logsumexp followed by exp(logits - lse) would take two, and on CPU these elementwise passes over
    [..., V] cost more than the vocabulary matmul (tiny demo model: 2.5 s vs 4.1 s a forward)."""
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - peak)
    total = jnp.sum(e, axis=-1)
    lse = peak[..., 0] + jnp.log(total)
    # The target's logit by a one-hot select-and-sum (exact: one term plus zeros) rather than
    # take_along_axis: its gradient is then an elementwise select that fuses into the softmax
    # gradient, where a gather's gradient is a scatter into a zeroed [..., V] buffer.
    one_hot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    target_logit = jnp.sum(jnp.where(one_hot, logits, 0.0), axis=-1)
    entropy = lse - jnp.sum(e * logits, axis=-1) / total
    return target_logit - lse, entropy


def _chunked(fn, xs: tuple[jax.Array, ...], length: int, chunk_size: int):
    """Runs fn over chunks of the sequence axis (axis 1) of every x [B, L, ...], padding the tail.

    The batch axis stays whole inside each chunk, so a batch sharded over data-parallel devices stays
    sharded (no gather); lax.map walks the chunks one after the other."""
    chunk = max(1, min(int(chunk_size), length))
    num_chunks = -(-length // chunk)
    if num_chunks == 1:   # no loop, no remat: the backward reuses the forward's logits
        return fn(xs)
    pad = num_chunks * chunk - length

    def split(x):  # [B, L, ...] -> [num_chunks, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((x.shape[0], num_chunks, chunk) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    out = jax.lax.map(jax.checkpoint(fn), tuple(split(x) for x in xs))
    return tuple(jnp.moveaxis(o, 0, 1).reshape(o.shape[1], -1)[:, :length] for o in out)


def _finish(logp, entropy, mask):
    if mask is not None:
        valid = jnp.asarray(mask).astype(bool)
        logp = jnp.where(valid, logp, 0.0)
        entropy = jnp.where(valid, entropy, 0.0)
    return logp, entropy


def token_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array,
                   mask: jax.Array | None = None, *, chunk_size: int = 256,
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(log p(target), entropy), both float32 [B, L], from final hidden states [B, L, D] and the
    output projection lm_head [vocab, D] (the tied embedding for Qwen2.5-VL-3B).

    chunk_size: sequence positions per chunk (memory B * chunk_size * vocab * 4 bytes).
    The matmul runs in the inputs' dtype with float32 accumulation; `temperature` divides the logits
    (pass the sampling temperature so the ratio matches the rollout's log-probs).
    """
    batch, length, dim = hidden.shape
    if lm_head.ndim != 2 or lm_head.shape[1] != dim:
        raise ValueError(f"lm_head must be [vocab, {dim}], got {lm_head.shape}")
    vocab = lm_head.shape[0]
    targets = jnp.clip(targets.astype(jnp.int32), 0, vocab - 1)

    def body(args):
        h, t = args
        logits = jnp.einsum("bcd,vd->bcv", h, lm_head, preferred_element_type=jnp.float32)
        return _logp_and_entropy(logits / temperature, t)

    logp, entropy = _chunked(body, (hidden, targets), length, chunk_size)
    return _finish(logp, entropy, mask)
