"""The trainers' one door to sampling: `generate(...)` -> response tokens, log-probs and mask.

GRPO rollouts, the before/after evaluation and `mode=generate` all call this function; it is backed
by the rollout engine (vlaa_jax.rollout: one prefill per prompt into a KV cache shared by its
`num_samples` continuations, then a jitted decode loop). Rows are prompt-major: row i*n + j is
sample j of prompt i. A row ends at its first stop id (kept, mask 1); later slots hold `pad_id`.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from vlaa_jax import rollout


class Generation(NamedTuple):
    tokens: np.ndarray    # int32 [B*n, T] sampled ids; pad_id after the end
    logprobs: np.ndarray  # float32 [B*n, T] log p(token) under the sampling distribution (0 after the end)
    mask: np.ndarray      # int32 [B*n, T] 1 up to and including the stop token


def generate(graphdef: Any, params: Any, rest: Any, prompt: Mapping[str, np.ndarray], *, rng: jax.Array,
             num_samples: int, max_new_tokens: int, temperature: float, top_p: float = 1.0,
             eos_ids: tuple[int, ...], pad_id: int, mesh=None, rules=None, row_offset: int = 0) -> Generation:
    """`num_samples` continuations of every row of `prompt` (left-padded input_ids, attention_mask,
    position_ids, rope_deltas, optional pixel_values + vision_* fields); temperature 0 = greedy. Output row
    r samples with fold_in(rng, row_offset + r): a batch split into calls, each given its first output
    row, samples what one call would."""
    out = rollout.generate(
        graphdef, (params, rest), prompt, max_new_tokens=max_new_tokens, num_samples=num_samples,
        sampling=rollout.SamplingConfig(temperature=temperature, top_p=top_p), rng=rng,
        stop_ids=eos_ids, pad_id=pad_id, mesh=mesh, rules=rules, row_offset=row_offset)
    return Generation(out.tokens, out.logprobs, out.mask)


def concat_generations(parts: Sequence[Generation], pad_id: int) -> Generation:
    """The rows of several `generate` calls (micro-batches of prompts) as one Generation, in order; a
    narrower part is padded on the right with pad_id tokens, log-prob 0 and mask 0 (past its end)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.tokens.shape[1] for p in parts)

    def pad(x: np.ndarray, value) -> np.ndarray:
        return np.pad(x, [(0, 0), (0, width - x.shape[1])], constant_values=value)

    return Generation(np.concatenate([pad(p.tokens, pad_id) for p in parts]),
                      np.concatenate([pad(p.logprobs, 0.0) for p in parts]),
                      np.concatenate([pad(p.mask, 0) for p in parts]))
