"""Rollout engine: batched generation with a KV cache for GRPO rollouts, evaluation and inference."""
from vlaa_jax.rollout.sampler import (
    ENDOFTEXT_ID, IM_END_ID, NEW_TOKEN_BUCKETS, Generation, decode_weights, default_stop_ids, generate, new_token_bucket,
    prefill, prompt_batch, release_decode_weights)
from vlaa_jax.rollout.sampling import SamplingConfig, choose, process_logits, row_keys

__all__ = [
    "Generation", "SamplingConfig", "generate", "prompt_batch", "prefill", "default_stop_ids", "new_token_bucket",
    "decode_weights", "release_decode_weights", "choose", "process_logits", "row_keys", "IM_END_ID", "ENDOFTEXT_ID", "NEW_TOKEN_BUCKETS",
]
