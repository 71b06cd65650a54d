"""Config validation before anything is built or compiled: every key present, none unknown, sane values.

The reference for the key set of a mode is the `demo` preset of that mode's config file (configs/sft.py
for "sft", configs/grpo.py for "grpo", "eval" and "generate"): every preset is built from the same
`configs/base.py`, so a missing key means a hand-written config forgot it and an unknown one is a typo.
Errors name the key (`train.batch_size`), never a traceback from deep inside a trainer.
"""
from __future__ import annotations

from typing import Any, Iterator

import ml_collections

from vlaa_jax.nn import ATTENTION_IMPLS

MODES = ("sft", "grpo", "eval", "generate")
REF_DTYPES = ("bfloat16", "float32", "param")  # grpo.ref_dtype ("param" = model.param_dtype)


class ConfigError(ValueError):
    """A bad, missing or unknown config key; the message starts with the key's dotted name."""


def _reference(mode: str) -> ml_collections.ConfigDict:
    if mode == "sft":
        from configs import sft
        return sft.get_config("demo")
    from configs import grpo
    return grpo.get_config("demo")


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


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r}: {message}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first missing / unknown / ill-typed / out-of-range key."""
    mode = config.get("mode", None)
    _require(mode in MODES, "mode", f"must be one of {MODES}, got {mode!r}")
    ref = dict(_items(_reference(mode)))
    got = dict(_items(config))
    for key in ref:
        if key not in got:
            raise ConfigError(f"config key {key!r} is missing (mode {mode!r} needs it; see configs/base.py)")
    for key in got:
        if key not in ref:
            raise ConfigError(f"config key {key!r} is unknown for mode {mode!r} (typo?)")
        want, have = _kind(ref[key]), _kind(got[key])
        _require(want == have, key, f"expected a {want}, got {got[key]!r}")

    t, d, o, m = config.train, config.data, config.optim, config.model
    _require(m.init in ("pretrained", "tiny"), "model.init", f"'pretrained' or 'tiny', got {m.init!r}")
    _require(m.init != "pretrained" or bool(m.path), "model.path",
             "needed when model.init == 'pretrained' (a vlaa-jax or HF model directory)")
    _require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
             f"one of {ATTENTION_IMPLS}, got {m.attention_impl!r}")
    _require(d.source in ("vlaa_thinking", "demo"), "data.source",
             f"'vlaa_thinking' or 'demo', got {d.source!r}")
    _require(d.source != "vlaa_thinking" or bool(d.dir), "data.dir", "needed for data.source='vlaa_thinking'")
    _require(t.num_steps >= 0, "train.num_steps", "must be >= 0")
    _require(t.batch_size > 0, "train.batch_size", "must be positive")
    _require(t.grad_accum_steps > 0 and t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
             f"must divide train.batch_size={t.batch_size}")
    _require(t.nonfinite_policy in ("skip", "stop"), "train.nonfinite_policy",
             f"'skip' or 'stop', got {t.nonfinite_policy!r}")
    _require(t.log_every > 0, "train.log_every", "must be positive")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    _require(t.keep_checkpoints > 0, "train.keep_checkpoints", "must be positive")
    _require(o.learning_rate >= 0, "optim.learning_rate", "must be >= 0")
    _require(0 <= o.min_learning_rate <= o.learning_rate, "optim.min_learning_rate",
             f"must lie in [0, optim.learning_rate={o.learning_rate}]")
    _require(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must lie in [0, 1)")
    if mode == "eval":
        e = config.eval
        _require(e.batch_size > 0, "eval.batch_size", "must be positive")
        _require(e.max_new_tokens > 0, "eval.max_new_tokens", "must be positive")
        _require(e.limit >= 0, "eval.limit", "must be >= 0 (0 = all items)")
        _require(0 < e.min_pixels <= e.max_pixels, "eval.min_pixels",
                 f"must lie in (0, eval.max_pixels={e.max_pixels}]")
        _require(e.length_bins > 0, "eval.length_bins", "must be positive")
    if mode in ("grpo", "eval", "generate"):
        g = config.grpo
        _require(g.rollout_batch_prompts > 0, "grpo.rollout_batch_prompts", "must be positive")
        _require(g.rollout_micro_batch >= 0 and (g.rollout_micro_batch == 0
                                                 or g.rollout_batch_prompts % g.rollout_micro_batch == 0),
                 "grpo.rollout_micro_batch",
                 f"must divide grpo.rollout_batch_prompts={g.rollout_batch_prompts} (0 = all in one call), "
                 f"got {g.rollout_micro_batch}")
        _require(g.ref_dtype in REF_DTYPES, "grpo.ref_dtype", f"one of {REF_DTYPES}, got {g.ref_dtype!r}")
        _require(g.num_samples > 0, "grpo.num_samples", "must be positive")
        _require(g.temperature > 0, "grpo.temperature", "must be positive (greedy is used for eval)")
        _require(g.max_new_tokens > 0, "grpo.max_new_tokens", "must be positive")
        _require(g.kl_controller in ("adaptive", "fixed"), "grpo.kl_controller",
                 f"'adaptive' or 'fixed', got {g.kl_controller!r}")
        samples = g.rollout_batch_prompts * g.num_samples
        _require(mode != "grpo" or samples % t.batch_size == 0, "train.batch_size",
                 f"must divide grpo.rollout_batch_prompts * grpo.num_samples = {samples}")
        from vlaa_jax.rl.grpo import GRPOConfig
        try:
            GRPOConfig.from_config(g.loss)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config block 'grpo.loss': {e}") from e
        from vlaa_jax.rewards.mixed import RewardConfig
        try:
            RewardConfig.from_config(config.reward)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config block 'reward': {e}") from e
