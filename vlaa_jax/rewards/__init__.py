"""The paper's mixed reward: answer extraction + one verifier per `verifier_type` (see mixed.py)."""
from vlaa_jax.rewards.digit import digit_reward
from vlaa_jax.rewards.extract import extract_answer, last_boxed
from vlaa_jax.rewards.iou import box_iou, iou_reward, parse_box
from vlaa_jax.rewards.math import MathResult, MathVerifyPool, verify_math
from vlaa_jax.rewards.mcq import mcq_reward, parse_options, read_choice
from vlaa_jax.rewards.mixed import (REWARD_TYPES, MixedReward, RewardConfig, canonical_verifier_type,
                                    compute_rewards)
from vlaa_jax.rewards.open_ended import (CallableScorer, HTTPScorer, ScoreRequest, ScorerError,
                                         open_ended_reward, open_ended_rewards)

__all__ = [
    "digit_reward", "extract_answer", "last_boxed", "box_iou", "iou_reward", "parse_box",
    "MathResult", "MathVerifyPool", "verify_math", "mcq_reward", "parse_options", "read_choice",
    "REWARD_TYPES", "MixedReward", "RewardConfig", "canonical_verifier_type", "compute_rewards",
    "CallableScorer", "HTTPScorer", "ScoreRequest", "ScorerError", "open_ended_reward",
    "open_ended_rewards",
]
