"""Config validation before anything is built or compiled: every key present, none unknown, sane values.

The reference for the key set is given by the caller: vlaa_jax.main checks the config of a run (a
preset plus `--config.key=value` overrides) against the same preset un-overridden, so an override of a
key the preset does not have is a typo and one of another type is a mistake. The package never reads
configs/ itself. Errors name the key (`train.batch_size`), never a traceback from deep inside a trainer.
"""
from __future__ import annotations

from typing import Any, Iterator

import ml_collections

from vlaa_jax.nn import ATTENTION_IMPLS
from vlaa_jax.rewards.mixed import RewardConfig
from vlaa_jax.rl.grpo import GRPOConfig

MODES = ("sft", "grpo", "eval", "generate")
GRPO_BLOCKS = ("grpo", "reward")  # what modes grpo, eval and generate read beyond configs/base.py
REF_DTYPES = ("bfloat16", "float32", "param")  # grpo.ref_dtype ("param" = model.param_dtype)
OLD_LOGPROBS = ("recompute", "sampler")         # grpo.old_logprobs (vlaa_jax/train/grpo_step.py)


class ConfigError(ValueError):
    """A bad, missing or unknown config key; the message starts with the key's dotted name."""


def _items(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key in sorted(cfg.keys()):
        value = cfg[key]
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield name, value
            yield from _items(value, name + ".")
        else:
            yield name, value


def _kind(value: Any) -> str:
    if isinstance(value, ml_collections.ConfigDict):
        return "block"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "sequence"
    return type(value).__name__


def validate(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, *,
             prefix: str = "") -> None:
    """Raises ConfigError naming the first missing / unknown / ill-typed / out-of-range key of `config`,
    with `reference` (the preset it was built from) giving the key set and the type of each key.
    `prefix` names where `config` sits in a larger one (a pipeline stage, e.g. "warm_start.")."""

    def require(cond: bool, key: str, message: str) -> None:
        if not cond:
            raise ConfigError(f"config key {prefix + key!r}: {message}")

    mode = config.get("mode", None)
    require(mode in MODES, "mode", f"must be one of {MODES}, got {mode!r}")
    for block in GRPO_BLOCKS:
        if mode == "sft" and block in config:
            raise ConfigError(f"config key {prefix + block!r} is unknown for mode 'sft' (see configs/sft.py)")
        if mode != "sft" and block not in config:
            raise ConfigError(f"config key {prefix + block!r} is missing (mode {mode!r} needs it; "
                              "see configs/grpo.py)")
    ref = dict(_items(reference))
    got = dict(_items(config))
    for key in ref:
        if key not in got:
            raise ConfigError(f"config key {prefix + key!r} is missing (mode {mode!r} needs it; "
                              "see configs/base.py)")
    for key in got:
        if key not in ref:
            raise ConfigError(f"config key {prefix + key!r} is unknown for mode {mode!r} (typo?)")
        want, have = _kind(ref[key]), _kind(got[key])
        require(want == have, key, f"expected a {want}, got {got[key]!r}")

    t, d, o, m = config.train, config.data, config.optim, config.model
    require(m.init in ("pretrained", "tiny"), "model.init", f"'pretrained' or 'tiny', got {m.init!r}")
    require(m.init != "pretrained" or bool(m.path), "model.path",
            "needed when model.init == 'pretrained' (a vlaa-jax or HF model directory)")
    require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
            f"one of {ATTENTION_IMPLS}, got {m.attention_impl!r}")
    require(d.source in ("vlaa_thinking", "demo"), "data.source",
            f"'vlaa_thinking' or 'demo', got {d.source!r}")
    require(d.source != "vlaa_thinking" or bool(d.dir), "data.dir", "needed for data.source='vlaa_thinking'")
    require(t.num_steps >= 0, "train.num_steps", "must be >= 0")
    require(t.batch_size > 0, "train.batch_size", "must be positive")
    require(t.grad_accum_steps > 0 and t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
            f"must divide train.batch_size={t.batch_size}")
    require(t.nonfinite_policy in ("skip", "stop"), "train.nonfinite_policy",
            f"'skip' or 'stop', got {t.nonfinite_policy!r}")
    require(t.log_every > 0, "train.log_every", "must be positive")
    require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    require(t.keep_checkpoints > 0, "train.keep_checkpoints", "must be positive")
    require(o.learning_rate >= 0, "optim.learning_rate", "must be >= 0")
    require(0 <= o.min_learning_rate <= o.learning_rate, "optim.min_learning_rate",
            f"must lie in [0, optim.learning_rate={o.learning_rate}]")
    require(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must lie in [0, 1)")
    if mode == "eval":
        e = config.eval
        require(e.batch_size > 0, "eval.batch_size", "must be positive")
        require(e.max_new_tokens > 0, "eval.max_new_tokens", "must be positive")
        require(e.limit >= 0, "eval.limit", "must be >= 0 (0 = all items)")
        require(0 < e.min_pixels <= e.max_pixels, "eval.min_pixels",
                f"must lie in (0, eval.max_pixels={e.max_pixels}]")
        require(e.length_bins > 0, "eval.length_bins", "must be positive")
    if mode in ("grpo", "eval", "generate"):
        g = config.grpo
        require(g.rollout_batch_prompts > 0, "grpo.rollout_batch_prompts", "must be positive")
        require(g.rollout_micro_batch >= 0 and (g.rollout_micro_batch == 0
                                                or g.rollout_batch_prompts % g.rollout_micro_batch == 0),
                "grpo.rollout_micro_batch",
                f"must divide grpo.rollout_batch_prompts={g.rollout_batch_prompts} (0 = all in one call), "
                f"got {g.rollout_micro_batch}")
        require(g.ref_dtype in REF_DTYPES, "grpo.ref_dtype", f"one of {REF_DTYPES}, got {g.ref_dtype!r}")
        require(g.old_logprobs in OLD_LOGPROBS, "grpo.old_logprobs", f"one of {OLD_LOGPROBS}, got {g.old_logprobs!r}")
        require(g.num_samples > 0, "grpo.num_samples", "must be positive")
        require(g.temperature > 0, "grpo.temperature", "must be positive (greedy is used for eval)")
        require(g.max_new_tokens > 0, "grpo.max_new_tokens", "must be positive")
        require(g.kl_controller in ("adaptive", "fixed"), "grpo.kl_controller",
                f"'adaptive' or 'fixed', got {g.kl_controller!r}")
        samples = g.rollout_batch_prompts * g.num_samples
        require(mode != "grpo" or samples % t.batch_size == 0, "train.batch_size",
                f"must divide grpo.rollout_batch_prompts * grpo.num_samples = {samples}")
        try:
            GRPOConfig.from_config(g.loss)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config block '{prefix}grpo.loss': {e}") from e
        try:
            RewardConfig.from_config(config.reward)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config block '{prefix}reward': {e}") from e
