"""config_check.validate rejects every value outside its known range before anything is built (issue 22).

One row per bad value: the preset it is set on, the key, the value, and words of the message. Each row
asserts a ConfigError whose message names the full key and says the valid range, and that validation
took well under a second (nothing was built). The presets themselves validate: tests/test_main.py.
"""
import math
import time

import pytest

from configs import grpo as grpo_config
from configs import sft as sft_config
from vlaa_jax import main
from vlaa_jax.train import config_check

INT1 = "must be an integer >= 1"
INT0 = "must be an integer >= 0"
POS = "must be a finite number > 0"
NONNEG = "must be a finite number >= 0"
UNIT = "must be a number in [0, 1)"
URL = "must be http(s)://host[:port][/path]"

# (mode of the row: "grpo" / "sft" / "eval" (the GRPO demo as an eval config), key, bad value, message)
BAD = [
    ("grpo", "seed", -1, "must be an integer in [0, 2147483647], got -1"),
    ("sft", "seed", 2 ** 40, "must be an integer in [0, 2147483647]"),
    ("sft", "data.max_length", 0, INT1 + ", got 0"),
    ("grpo", "data.max_prompt_length", -5, INT1),
    ("grpo", "data.min_pixels", 0, INT1),
    ("grpo", "data.max_pixels", 100, "must be >= data.min_pixels=3136, got 100"),
    ("sft", "data.num_epochs", 0, INT1),
    ("sft", "data.worker_count", -1, INT0),
    ("grpo", "data.train_split", "train", "must be '<sft|grpo>[:<tfds split>]'"),
    ("sft", "data.train_split", "", "must be '<sft|grpo>[:<tfds split>]'"),
    ("sft", "data.eval_split", "validation", "(or empty: none), got 'validation'"),
    ("sft", "optim.learning_rate", 0.0, POS + ", got 0.0"),
    ("grpo", "optim.learning_rate", -1e-5, POS),
    ("grpo", "optim.learning_rate", math.nan, POS + ", got nan"),
    ("grpo", "optim.learning_rate", math.inf, POS + ", got inf"),
    ("grpo", "optim.min_learning_rate", 1.0, "must lie in [0, optim.learning_rate=0.0005], got 1.0"),
    ("sft", "optim.min_learning_rate", -1e-3, "must lie in [0, optim.learning_rate=0.01]"),
    ("sft", "optim.warmup_ratio", 1.0, UNIT),
    ("grpo", "optim.weight_decay", -0.1, NONNEG),
    ("grpo", "optim.b1", 1.0, UNIT),
    ("sft", "optim.b2", -0.5, UNIT),
    ("sft", "optim.eps", 0.0, POS),
    ("grpo", "optim.max_grad_norm", -1.0, NONNEG),
    ("sft", "train.num_steps", -1, INT0),
    ("sft", "train.batch_size", 0, INT1),
    ("sft", "train.batch_size", 2.5, INT1 + ", got 2.5"),  # a float where an integer belongs
    ("sft", "train.grad_accum_steps", 0, INT1),
    ("grpo", "train.grad_accum_steps", 3, "must divide train.batch_size=16, got 3"),
    ("sft", "train.log_every", 0, INT1),
    ("sft", "train.eval_every", -1, INT0),
    ("sft", "train.eval_batches", 0, INT1),
    ("grpo", "train.checkpoint_every", -5, INT0),
    ("grpo", "train.keep_checkpoints", 0, INT1),
    ("grpo", "train.batch_size", 6, "must divide grpo.rollout_batch_prompts * grpo.num_samples = 32"),
    ("sft", "sharding.mesh_shape", (1, -1, -1), "at most one entry may be -1"),
    ("grpo", "sharding.mesh_shape", (1, 0, 1), "entries must be positive or -1"),
    ("grpo", "sharding.mesh_shape", (1, 8), "must have 3 entries"),
    ("sft", "sharding.rules", "tp", "one of ['dp', 'fsdp', 'fsdp_tp'], got 'tp'"),
    ("sft", "model.param_dtype", "float64", "one of ('float32', 'bfloat16', 'float16'), got 'float64'"),
    ("grpo", "model.compute_dtype", "int8", "one of ('float32', 'bfloat16', 'float16')"),
    ("sft", "model.tiny.hidden_size", 0, INT1),
    ("grpo", "model.tiny.num_attention_heads", -2, INT1),
    ("grpo", "model.tiny.embedding_init_std", 0.0, POS),
    ("sft", "model.tiny.rope_theta", -1.0, POS),
    ("sft", "model.tiny.vision_fullatt_block_indexes", [5], "block indexes in [0, model.tiny.vision_depth=2)"),
    ("grpo", "model.tiny.mrope_section", [2, 3], "3 integers >= 0 (t, h, w)"),
    ("sft", "sft.logits_chunk", 0, INT1),
    ("grpo", "grpo.top_p", 0.0, "must be a number in (0, 1], got 0.0"),
    ("grpo", "grpo.top_p", 1.5, "must be a number in (0, 1], got 1.5"),
    ("grpo", "grpo.temperature", -0.1, POS),
    ("grpo", "grpo.temperature", 0.0, POS),
    ("grpo", "grpo.num_samples", 1, "must be >= 2 for GRPO"),
    ("eval", "grpo.num_samples", 0, INT1),
    ("grpo", "grpo.update_epochs", 0, INT1),
    ("grpo", "grpo.logprob_chunk", 0, INT1),
    ("grpo", "grpo.init_kl_coef", -1e-3, NONNEG),
    ("grpo", "grpo.kl_target", 0.0, POS + " for grpo.kl_controller='adaptive'"),
    ("grpo", "grpo.kl_horizon", -1, POS + " for grpo.kl_controller='adaptive'"),
    ("grpo", "grpo.log_samples", -1, INT0),
    ("grpo", "grpo.eval_prompts", -1, INT0),
    ("grpo", "grpo.max_new_tokens", 0, INT1),
    ("grpo", "grpo.rollout_batch_prompts", 0, INT1),
    ("grpo", "grpo.loss.clip_low", 1.0, "must lie in [0, 1)"),
    ("grpo", "grpo.loss.clip_low", -0.1, "must lie in [0, 1)"),
    ("grpo", "grpo.loss.clip_high", -0.2, "must be >= 0"),
    ("grpo", "grpo.loss.advantage_eps", 0.0, "must be > 0"),
    ("grpo", "grpo.loss.kl_estimator", "k4", "must be one of"),
    ("grpo", "grpo.loss.ratio_level", "seq", "must be 'token' or 'sequence'"),
    ("grpo", "grpo.loss.advantage_mode", "ppo", "must be one of"),
    ("grpo", "reward.math_timeout_s", -1.0, POS + ", got -1.0"),
    ("grpo", "reward.math_timeout_s", 0.0, POS),
    ("grpo", "reward.reward_model_timeout_s", math.inf, POS + ", got inf"),
    ("grpo", "reward.reward_model_url", "ftp://127.0.0.1/score", URL),
    ("grpo", "reward.reward_model_url", "localhost:8000", URL),
    ("grpo", "reward.reward_model_url", "http://", URL),
    ("grpo", "reward.reward_model_url", "http://127.0.0.1:99999/score", URL),
    ("grpo", "reward.reward_model_url", " http://127.0.0.1:8000/score", URL),
    ("grpo", "reward.reward_model_url", "http://127.0.0.1:8000/scöre", URL),
    ("grpo", "reward.num_workers", 0, "must be an integer >= 1"),
    ("grpo", "reward.reward_model_retries", -1, "must be an integer >= 0"),
    ("grpo", "reward.open_ended_beta", 0.0, POS),
    ("grpo", "reward.iou_pred_frame", "pixels", "must be one of"),
    ("grpo", "reward.max_answer_chars", 0, "must be an integer >= 1"),
    ("eval", "eval.batch_size", 0, INT1),
    ("eval", "eval.min_pixels", -1, INT0),  # 0 = the model directory's bounds
    ("eval", "eval.max_pixels", -1, INT0),
    ("eval", "eval.length_bins", 0, INT1),
    # a tired user: the right number as the wrong type
    ("grpo", "grpo.top_p", "0.9", "expected a number, got '0.9'"),
    ("sft", "train.batch_size", True, "expected a number, got True"),
]


def _config(mode):
    c = (sft_config if mode == "sft" else grpo_config).get_config("demo")
    if mode == "eval":
        c.mode = "eval"
    return c


def _set(config, key, value):
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value


def _key_of(key, message):
    return key


@pytest.mark.parametrize("mode,key,value,message", BAD, ids=[f"{m}:{k}={v!r}" for m, k, v, _ in BAD])
def test_bad_value_is_rejected_naming_the_key_and_range(mode, key, value, message):
    c = _config(mode)
    _set(c, key, value)
    t0 = time.monotonic()
    with pytest.raises(config_check.ConfigError) as err:
        config_check.validate(c, _config(mode))
    assert time.monotonic() - t0 < 1.0
    text = str(err.value)
    assert text.startswith(f"config key '{_key_of(key, message)}'"), text
    assert message in text, text


GOOD = [  # edge values inside the ranges: still valid
    ("grpo", "grpo.top_p", 1.0), ("grpo", "grpo.top_p", 1e-6), ("grpo", "grpo.num_samples", 2),
    ("grpo", "grpo.init_kl_coef", 0.0), ("grpo", "grpo.loss.clip_low", 0.0), ("sft", "optim.warmup_ratio", 0.0),
    ("sft", "optim.max_grad_norm", 0.0), ("sft", "data.eval_split", ""), ("sft", "seed", 2 ** 31 - 1),
    ("eval", "grpo.num_samples", 1), ("grpo", "grpo.kl_controller", "fixed"),
    ("grpo", "reward.reward_model_url", "https://scorer.internal:8443/v1/score"),
    ("grpo", "reward.reward_model_url", "http://[::1]:8000"), ("sft", "sharding.mesh_shape", (2, 2, 2)),
]


@pytest.mark.parametrize("mode,key,value", GOOD, ids=[f"{m}:{k}={v!r}" for m, k, v in GOOD])
def test_edge_values_inside_the_ranges_validate(mode, key, value):
    c = _config(mode)
    _set(c, key, value)
    if key == "grpo.kl_controller":  # a fixed coefficient needs no target
        _set(c, "grpo.kl_target", 0.0)
    config_check.validate(c, _config(mode))


def test_the_warm_start_stage_is_range_checked_under_its_prefix():
    c = grpo_config.get_config("demo")
    c.warm_start.optim.learning_rate = 0.0
    with pytest.raises(config_check.ConfigError, match=r"^config key 'warm_start\.optim\.learning_rate': must be a "
                                                       r"finite number > 0"):
        main.check(c, grpo_config.get_config("demo"))
