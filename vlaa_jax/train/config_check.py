"""Config validation before anything is built or compiled: every key present, none unknown, sane values.

The reference for the key set is given by the caller: vlaa_jax.main checks the config of a run (a
preset plus `--config.key=value` overrides) against the same preset un-overridden, so an override of a
key the preset does not have is a typo and one of another type is a mistake. The package never reads
configs/ itself. Errors name the key (`train.batch_size`) and its valid range, never a traceback from
deep inside a trainer. Every field whose valid range is known is checked here (RANGES and the rules in
`validate`); the blocks that are dataclasses (`grpo.loss` = GRPOConfig, `reward` = RewardConfig) check
their own fields, and their errors are reported under the full key.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator

import ml_collections

from vlaa_jax.models.qwen2_5_vl.config import DTYPES
from vlaa_jax.nn import ATTENTION_IMPLS
from vlaa_jax.rewards.mixed import RewardConfig
from vlaa_jax.rl.grpo import GRPOConfig
from vlaa_jax.sharding.mesh import check_mesh_shape
from vlaa_jax.sharding.rules import RULE_PRESETS

MODES = ("sft", "grpo", "eval", "generate")
GRPO_BLOCKS = ("grpo", "reward")  # what modes grpo, eval and generate read beyond configs/base.py
REF_DTYPES = ("bfloat16", "float32", "param")  # grpo.ref_dtype ("param" = model.param_dtype)
OLD_LOGPROBS = ("recompute", "sampler")         # grpo.old_logprobs (vlaa_jax/train/grpo_step.py)
ROLLOUT_ENGINES = ("continuous", "static")       # grpo.rollout_engine (vlaa_jax/rollout/)


class ConfigError(ValueError):
    """A bad, missing or unknown config key; the message starts with the key's dotted name."""


Rule = tuple[str, Callable[[Any], bool]]  # (what the message says the value must be, the test)


def _integer(low: int, high: int | None = None) -> Rule:
    text = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return text, lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= low
                            and (high is None or v <= high))


def _real(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True) -> Rule:
    if high == math.inf:
        text = f"a finite number {'>' if low_open else '>='} {low}"
    else:
        text = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def test(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return text, test


_TINY_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vision_depth", "vision_hidden_size", "vision_intermediate_size",
               "vision_num_heads", "vision_window_size")

# Ranges of single fields, checked for every key the config has (mode blocks exist only in their modes;
# model.tiny only matters, and is checked, when model.init == "tiny"; eval.* in mode eval).
RANGES: tuple[tuple[str, Rule], ...] = (
    ("seed", _integer(0, 2 ** 31 - 1)),  # Grain's shuffle takes [0, 2**32); seed offsets are added to it
    ("data.max_length", _integer(1)),
    ("data.max_prompt_length", _integer(1)),
    ("data.min_pixels", _integer(1)),
    ("data.max_pixels", _integer(1)),
    ("data.num_epochs", _integer(1)),
    ("data.worker_count", _integer(0)),
    ("optim.learning_rate", _real(0, low_open=True)),
    ("optim.warmup_ratio", _real(0, 1)),
    ("optim.weight_decay", _real(0)),
    ("optim.b1", _real(0, 1)),
    ("optim.b2", _real(0, 1)),
    ("optim.eps", _real(0, low_open=True)),
    ("optim.max_grad_norm", _real(0)),
    ("train.num_steps", _integer(0)),
    ("train.batch_size", _integer(1)),
    ("train.grad_accum_steps", _integer(1)),
    ("train.log_every", _integer(1)),
    ("train.eval_every", _integer(0)),
    ("train.eval_batches", _integer(1)),
    ("train.checkpoint_every", _integer(0)),
    ("train.keep_checkpoints", _integer(1)),
    ("sft.logits_chunk", _integer(1)),
    ("grpo.rollout_batch_prompts", _integer(1)),
    ("grpo.rollout_micro_batch", _integer(0)),
    ("grpo.num_samples", _integer(1)),
    ("grpo.temperature", _real(0, low_open=True)),
    ("grpo.top_p", _real(0, 1, low_open=True, high_open=False)),
    ("grpo.max_new_tokens", _integer(1)),
    ("grpo.update_epochs", _integer(1)),
    ("grpo.logprob_chunk", _integer(1)),
    ("grpo.init_kl_coef", _real(0)),
    ("grpo.log_samples", _integer(0)),
    ("grpo.eval_prompts", _integer(0)),
    ("eval.limit", _integer(0)),
    ("eval.batch_size", _integer(1)),
    ("eval.max_new_tokens", _integer(1)),
    ("eval.min_pixels", _integer(0)),  # 0 = the model directory's (vlaa_jax.eval.harness.pixel_limits)
    ("eval.max_pixels", _integer(0)),
    ("eval.length_bins", _integer(1)),
    *((f"model.tiny.{k}", _integer(1)) for k in _TINY_SIZES),
    ("model.tiny.rope_theta", _real(0, low_open=True)),
    ("model.tiny.embedding_init_std", _real(0, low_open=True)),
)
SPLIT_CONFIGS = ("sft", "grpo")  # data.*_split: "<sft|grpo>[:<tfds split>]" (data_pipeline.loader)


def _value(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _block_error(prefix: str, block: str, cls: type, e: Exception) -> "ConfigError":
    """A dataclass block's error ("<field> must ...", or "reward.<field> must ...") under the full key."""
    head, _, rest = str(e).partition(" ")
    field = head.rstrip(":").rsplit(".", 1)[-1]
    if field in {f.name for f in dataclasses.fields(cls)}:
        return ConfigError(f"config key '{prefix}{block}.{field}': {rest}")
    return ConfigError(f"config block '{prefix}{block}': {e}")


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
    for key, (rule, test) in RANGES:
        present, value = _value(config, key)
        if present and not (key.startswith("model.tiny.") and m.init != "tiny") and not (
                key.startswith("eval.") and mode != "eval"):
            require(test(value), key, f"must be {rule}, got {value!r}")
    for key in ("model.param_dtype", "model.compute_dtype"):
        require(_value(config, key)[1] in DTYPES, key, f"one of {DTYPES}, got {_value(config, key)[1]!r}")
    if m.init == "tiny":
        depth = m.tiny.vision_depth
        require(all(isinstance(i, int) and 0 <= i < depth for i in m.tiny.vision_fullatt_block_indexes),
                "model.tiny.vision_fullatt_block_indexes",
                f"block indexes in [0, model.tiny.vision_depth={depth}), got {list(m.tiny.vision_fullatt_block_indexes)}")
        require(len(m.tiny.mrope_section) == 3 and all(isinstance(i, int) and i >= 0 for i in m.tiny.mrope_section),
                "model.tiny.mrope_section", f"3 integers >= 0 (t, h, w), got {list(m.tiny.mrope_section)}")
    require(d.min_pixels <= d.max_pixels, "data.max_pixels",
            f"must be >= data.min_pixels={d.min_pixels}, got {d.max_pixels}")
    for key, split, none_ok in (("data.train_split", d.train_split, False), ("data.eval_split", d.eval_split, True)):
        require((none_ok and split == "") or split.partition(":")[0] in SPLIT_CONFIGS, key,
                f"must be '<sft|grpo>[:<tfds split>]', e.g. 'grpo:train'{' (or empty: none)' if none_ok else ''}, "
                f"got {split!r}")
    try:
        check_mesh_shape(config.sharding.mesh_shape)
    except ValueError as e:
        raise ConfigError(f"config key '{prefix}sharding.mesh_shape': {e}") from None
    require(config.sharding.rules in RULE_PRESETS, "sharding.rules",
            f"one of {sorted(RULE_PRESETS)}, got {config.sharding.rules!r}")
    require(m.init != "pretrained" or bool(m.path), "model.path",
            "needed when model.init == 'pretrained' (a vlaa-jax or HF model directory)")
    require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
            f"one of {ATTENTION_IMPLS}, got {m.attention_impl!r}")
    require(d.source in ("vlaa_thinking", "demo"), "data.source",
            f"'vlaa_thinking' or 'demo', got {d.source!r}")
    require(d.source != "vlaa_thinking" or bool(d.dir), "data.dir", "needed for data.source='vlaa_thinking'")
    require(isinstance(d.system_prompt, str) and bool(d.system_prompt), "data.system_prompt",
            f"'vlaa' (the VLAA-Thinker prompt), 'default' (the chat template's) or the prompt's text, got "
            f"{d.system_prompt!r}")
    require(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
            f"must divide train.batch_size={t.batch_size}, got {t.grad_accum_steps}")
    require(t.nonfinite_policy in ("skip", "stop"), "train.nonfinite_policy",
            f"'skip' or 'stop', got {t.nonfinite_policy!r}")
    require(o.min_learning_rate <= o.learning_rate and _real(0)[1](o.min_learning_rate), "optim.min_learning_rate",
            f"must lie in [0, optim.learning_rate={o.learning_rate}], got {o.min_learning_rate!r}")
    if mode == "eval":
        e = config.eval
        require(not (e.min_pixels and e.max_pixels) or e.min_pixels <= e.max_pixels, "eval.min_pixels",
                f"must lie in (0, eval.max_pixels={e.max_pixels}], got {e.min_pixels}")
    if mode in ("grpo", "eval", "generate"):
        g = config.grpo
        require(g.rollout_micro_batch == 0 or g.rollout_batch_prompts % g.rollout_micro_batch == 0,
                "grpo.rollout_micro_batch",
                f"must divide grpo.rollout_batch_prompts={g.rollout_batch_prompts} (0 = all in one call), "
                f"got {g.rollout_micro_batch}")
        require(g.rollout_engine in ROLLOUT_ENGINES, "grpo.rollout_engine",
                f"one of {ROLLOUT_ENGINES}, got {g.rollout_engine!r}")
        require(g.rollout_slots >= 0, "grpo.rollout_slots", f"must be >= 0 (0 = one static call's rows), "
                f"got {g.rollout_slots}")
        require(g.ref_dtype in REF_DTYPES, "grpo.ref_dtype", f"one of {REF_DTYPES}, got {g.ref_dtype!r}")
        require(g.old_logprobs in OLD_LOGPROBS, "grpo.old_logprobs", f"one of {OLD_LOGPROBS}, got {g.old_logprobs!r}")
        require(mode != "grpo" or g.num_samples >= 2, "grpo.num_samples",
                f"must be >= 2 for GRPO (a group of one sample has advantage 0: nothing to learn), "
                f"got {g.num_samples}")
        require(g.kl_controller in ("adaptive", "fixed"), "grpo.kl_controller",
                f"'adaptive' or 'fixed', got {g.kl_controller!r}")
        if g.kl_controller == "adaptive":
            for key in ("kl_target", "kl_horizon"):
                rule, test = _real(0, low_open=True)
                require(test(g[key]), f"grpo.{key}",
                        f"must be {rule} for grpo.kl_controller='adaptive', got {g[key]!r}")
        samples = g.rollout_batch_prompts * g.num_samples
        require(mode != "grpo" or samples % t.batch_size == 0, "train.batch_size",
                f"must divide grpo.rollout_batch_prompts * grpo.num_samples = {samples}")
        try:
            GRPOConfig.from_config(g.loss)
        except (TypeError, ValueError) as e:
            raise _block_error(prefix, "grpo.loss", GRPOConfig, e) from e
        try:
            reward = RewardConfig.from_config(config.reward)
        except (TypeError, ValueError) as e:
            raise _block_error(prefix, "reward", RewardConfig, e) from e
        path = reward.reward_model_path
        require(reward.open_ended_scorer != "jax_rm" or os.path.isfile(os.path.join(path, "config.json")),
                "reward.reward_model_path", f"must be an HF reward-model directory (with config.json) for "
                f"reward.open_ended='jax_rm', got {path!r}")
