"""Rollout engine: batched generation with a KV cache for GRPO rollouts, evaluation and inference."""
from vlaa_jax.rollout.sampler import (
    NEW_TOKEN_BUCKETS, Generation, concat_generations, decode_weights, generate, new_token_bucket, prefill,
    prompt_batch, release_decode_weights)
from vlaa_jax.rollout.sampling import SamplingConfig, choose, process_logits, row_keys

__all__ = [
    "Generation", "SamplingConfig", "generate", "prompt_batch", "prefill", "new_token_bucket", "concat_generations",
    "decode_weights", "release_decode_weights", "choose", "process_logits", "row_keys", "NEW_TOKEN_BUCKETS",
]
