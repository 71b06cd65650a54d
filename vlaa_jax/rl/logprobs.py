"""Per-token log-probs and entropies of sampled tokens without the full [B, L, vocab] float32 logits.

With Qwen2.5's 151,936-entry vocabulary, float32 logits for a 256 x 2048 train batch would be ~300 GiB.
The tokens are flattened to [B*L] and processed `chunk_size` at a time under `lax.map`; each chunk's
body is wrapped in `jax.checkpoint`, so the backward pass keeps only the chunk inputs (hidden states,
targets) as residuals and recomputes that chunk's logits: peak memory is O(chunk_size * vocab) in both
the forward and the gradient.

Alignment is the caller's: logp[b, t] = log softmax(hidden[b, t] @ lm_head.T / temperature)[targets[b, t]],
so for next-token prediction pass hidden[:, :-1] with targets = input_ids[:, 1:]. Positions where
mask == 0 return 0 (their targets may be any id, e.g. padding).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _logp_and_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits float32 [C, V], targets int [C] -> (log p(target) [C], entropy [C])."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logits - lse[:, None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)
    return target_logit - lse, entropy


def _chunked(fn, xs: tuple[jax.Array, ...], num_tokens: int, chunk_size: int):
    """Runs fn over token chunks of the flattened leading axis (padding the tail chunk)."""
    chunk = max(1, min(int(chunk_size), num_tokens))
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens

    def split(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num_chunks, chunk) + x.shape[1:])

    out = jax.lax.map(jax.checkpoint(fn), tuple(split(x) for x in xs))
    return tuple(o.reshape(-1)[:num_tokens] for o in out)


def _finish(logp, entropy, shape, mask):
    logp, entropy = logp.reshape(shape), entropy.reshape(shape)
    if mask is not None:
        valid = jnp.asarray(mask).astype(bool)
        logp = jnp.where(valid, logp, 0.0)
        entropy = jnp.where(valid, entropy, 0.0)
    return logp, entropy


def token_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array,
                   mask: jax.Array | None = None, *, chunk_size: int = 512,
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(log p(target), entropy), both float32 [B, L], from final hidden states [B, L, D] and the
    output projection lm_head [vocab, D] (the tied embedding for Qwen2.5-VL-3B).

    The matmul runs in the inputs' dtype with float32 accumulation; `temperature` divides the logits
    (pass the sampling temperature so the ratio matches the rollout's log-probs).
    """
    batch, length, dim = hidden.shape
    if lm_head.ndim != 2 or lm_head.shape[1] != dim:
        raise ValueError(f"lm_head must be [vocab, {dim}], got {lm_head.shape}")
    vocab = lm_head.shape[0]
    flat_h = hidden.reshape(batch * length, dim)
    flat_t = jnp.clip(targets.reshape(batch * length).astype(jnp.int32), 0, vocab - 1)

    def body(args):
        h, t = args
        logits = jnp.einsum("cd,vd->cv", h, lm_head, preferred_element_type=jnp.float32)
        return _logp_and_entropy(logits / temperature, t)

    logp, entropy = _chunked(body, (flat_h, flat_t), batch * length, chunk_size)
    return _finish(logp, entropy, (batch, length), mask)


def token_logprobs_from_logits(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None,
                               *, chunk_size: int = 512,
                               temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Same as `token_logprobs` from logits [B, L, V] (any dtype): the float32 upcast and the
    softmax are done chunk by chunk, so only the logits themselves are ever whole."""
    batch, length, vocab = logits.shape
    flat_l = logits.reshape(batch * length, vocab)
    flat_t = jnp.clip(targets.reshape(batch * length).astype(jnp.int32), 0, vocab - 1)

    def body(args):
        l, t = args
        return _logp_and_entropy(l.astype(jnp.float32) / temperature, t)

    logp, entropy = _chunked(body, (flat_l, flat_t), batch * length, chunk_size)
    return _finish(logp, entropy, (batch, length), mask)
