"""`sampling.categorical` (inverse-CDF, two levels) against the exact softmax probabilities."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from vlaa_jax.rollout.sampling import categorical


def _draw(logits: np.ndarray, n: int, block: int, seed: int = 0) -> np.ndarray:
    keys = jax.random.split(jax.random.key(seed), n)
    f = jax.jit(jax.vmap(lambda k: categorical(k, jnp.asarray(logits), block=block)))
    return np.asarray(f(keys))


def test_matches_softmax_and_never_draws_masked():
    rng = np.random.default_rng(0)
    vocab, block = 1000, 64                      # 16 blocks, the last one partly padding
    logits = np.full(vocab, -np.inf, np.float32)
    support = rng.choice(vocab, 40, replace=False)
    support = np.append(support, [0, vocab - 1])  # both ends of the vocabulary
    logits[support] = rng.normal(0, 1.5, support.size)
    logits[128:192] = -np.inf                     # a whole block masked (as top-k / top-p do)
    n = 20000
    draws = _draw(logits, n, block)
    probs = np.exp(logits.astype(np.float64) - logits[np.isfinite(logits)].max())
    probs /= probs.sum()
    assert set(np.unique(draws)) <= set(np.flatnonzero(probs > 0))
    counts = np.bincount(draws, minlength=vocab)
    keep = probs * n >= 50                         # the rest pooled into one bin
    obs = np.append(counts[keep], n - counts[keep].sum())
    exp = np.append(probs[keep] * n, n - (probs[keep] * n).sum())
    assert exp[-1] >= 5 and keep.sum() > 20
    assert scipy.stats.chisquare(obs, exp).pvalue > 1e-4


def test_single_token_and_real_vocabulary():
    vocab = 151936                                 # Qwen's vocabulary: 149 blocks of 1024, padded
    for t in (0, 5000, vocab - 1):
        logits = np.full(vocab, -np.inf, np.float32)
        logits[t] = 0.0
        assert (_draw(logits, 64, 1024) == t).all()
    two = np.full(vocab, -np.inf, np.float32)
    two[[3, vocab - 2]] = np.log([0.25, 0.75])
    draws = _draw(two, 4000, 1024, seed=1)
    assert set(np.unique(draws)) == {3, vocab - 2}
    assert abs((draws == 3).mean() - 0.25) < 0.03
