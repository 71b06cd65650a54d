"""GRPO building blocks as pure (jit-able) functions; the trainer wires them together."""
from vlaa_jax.rl.grpo import (ADVANTAGE_MODES, LOSS_AGG_MODES, GRPOConfig, aggregate_loss,
                              group_advantages, grpo_loss, loss_normalizer)
from vlaa_jax.rl.kl import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty,
                            make_kl_controller)
from vlaa_jax.rl.logprobs import token_logprobs
from vlaa_jax.rl.dynamic_sampling import GroupFilterResult, filter_zero_variance_groups

__all__ = [
    "ADVANTAGE_MODES", "LOSS_AGG_MODES", "GRPOConfig", "aggregate_loss", "group_advantages",
    "grpo_loss", "loss_normalizer", "KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController",
    "kl_penalty", "make_kl_controller", "token_logprobs",
    "GroupFilterResult", "filter_zero_variance_groups",
]
