"""Token sampling: greedy, temperature, top-k, top-p, with one PRNG stream per output row.

The processing order is HF's (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`): divide
by the temperature, keep the k largest, then keep the smallest set of most likely tokens whose
probability reaches top_p (at least one token). Tokens outside the kept set get -inf, so the policy's
log-probabilities are `log_softmax` of the processed logits and sampled tokens never leave the set.

Randomness is per row: row r of a batch draws step t's token with `fold_in(fold_in(seed_key, r), t)`, so
a row's sample does not depend on the batch size, the other rows or the mesh it runs on.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    temperature: softmax temperature; 0 means greedy (argmax; the reported policy log-probs are then
        those of the temperature-1 distribution after top-k/top-p). Paper's GRPO rollouts: 0.8.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus mass in (0, 1] (1 = off).
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampling top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_any(cls, value: "SamplingConfig | dict | None") -> "SamplingConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        return cls(**dict(value))


def process_logits(logits: jax.Array, temperature: jax.Array | float, *, top_k: int = 0,
                   top_p: jax.Array | float | None = None) -> jax.Array:
    """float32 logits [..., V] -> temperature-scaled logits with tokens outside top-k / top-p at -inf.

    top_k is static (0 = off); top_p None means off (a traced value may be passed when it is on)."""
    x = logits.astype(jnp.float32) / temperature
    vocab = x.shape[-1]
    k = min(int(top_k), vocab) if top_k else 0
    if k:
        top_vals, _ = jax.lax.top_k(x, k)
        x = jnp.where(x < top_vals[..., -1:], -jnp.inf, x)
    if top_p is not None:
        # Sorted candidates: the top-k values when top-k is on (the rest are -inf already).
        srt = top_vals if k else -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass of the strictly more likely tokens
        keep = before < top_p
        keep = keep.at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, -jnp.inf, x)
    return x


def categorical(key: jax.Array, logits: jax.Array, block: int = 1024) -> jax.Array:
    """One draw from softmax(logits) [V] (entries at -inf are never drawn) with ONE uniform number.

    `jax.random.categorical` adds Gumbel noise to every logit: 151,936 random numbers per row per step,
    which cost ~5x the rest of a sampling step on CPU. Inverse-CDF sampling needs one; it is done in two
    levels (block sums, then the chosen block's entries) so float32 cumulative sums stay short and exact
    to ~1e-7 of a block's mass rather than drifting over the whole vocabulary."""
    vocab = logits.shape[-1]
    block = min(block, vocab)
    nb = -(-vocab // block)
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.pad(p, (0, nb * block - vocab)).reshape(nb, block)
    sums = jnp.sum(p, axis=-1)
    csum = jnp.cumsum(sums)
    u = jax.random.uniform(key, (), jnp.float32) * csum[-1]
    b = jnp.clip(jnp.searchsorted(csum, u, side="right"), 0, nb - 1)
    b = jnp.where(sums[b] > 0, b, jnp.argmax(jnp.where(sums > 0, jnp.arange(nb), -1)))  # rounding past the end
    row = p[b]
    inner = jnp.cumsum(row)
    i = jnp.clip(jnp.searchsorted(inner, u - (csum[b] - sums[b]), side="right"), 0, block - 1)
    i = jnp.where(row[i] > 0, i, jnp.argmax(jnp.where(row > 0, jnp.arange(block), -1)))  # never a p = 0 entry
    return (b * block + i).astype(jnp.int32)


def row_keys(rng: jax.Array, num_rows: int, offset: int = 0) -> jax.Array:
    """One PRNG key per row: fold_in(rng, offset + row)."""
    return jax.vmap(lambda r: jax.random.fold_in(rng, r))(offset + jnp.arange(num_rows))


def choose(logits: jax.Array, keys: jax.Array, step: jax.Array, *, greedy: bool, temperature: jax.Array | float,
           top_k: int = 0, top_p: jax.Array | float | None = None
           ) -> tuple[jax.Array, jax.Array]:
    """Picks the next token of every row.

    logits [R, V] float32 (raw model logits), keys [R] per-row keys, step [] the decode step, or [R] each
    row's own (the continuous-batching engine: the number of tokens the row has drawn so far).
    Returns (tokens int32 [R], sampling log-probs [R] = log_softmax(processed logits) at the token)."""
    logits = logits.astype(jnp.float32)
    processed = process_logits(logits, 1.0 if greedy else temperature, top_k=top_k, top_p=top_p)
    if greedy:
        tokens = jnp.argmax(processed, axis=-1)
    else:
        steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), keys.shape[:1])
        step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
        tokens = jax.vmap(categorical)(step_keys, processed)
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), tokens[:, None], axis=-1)[:, 0]
