"""Rollout engines for GRPO rollouts, evaluation and inference: the static batched sampler (sampler.py)
and the continuous-batching engine (engine.py), both over a preallocated KV cache."""
from vlaa_jax.rollout.sampler import (
    NEW_TOKEN_BUCKETS, Generation, concat_generations, decode_weights, generate, new_token_bucket, prefill,
    prompt_batch, release_decode_weights)
from vlaa_jax.rollout.sampling import SamplingConfig, choose, process_logits, row_keys
from vlaa_jax.rollout.engine import Engine, EngineStats, PromptSource, static_stats

__all__ = [
    "Generation", "SamplingConfig", "generate", "prompt_batch", "prefill", "new_token_bucket", "concat_generations",
    "decode_weights", "release_decode_weights", "choose", "process_logits", "row_keys", "NEW_TOKEN_BUCKETS",
    "Engine", "EngineStats", "PromptSource", "static_stats",
]
