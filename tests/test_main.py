"""The entry point: config presets build, and bad / missing / unknown keys fail before any compilation
with a message naming the key (in-process for the validator, one subprocess for the real CLI); the GRPO
demo's SFT warm-start stage is a whole SFT config sharing the GRPO run's seed, model and data."""
import json
import os
import subprocess
import sys

import pytest

from configs import base as base_config
from configs import grpo as grpo_config
from configs import sft as sft_config
from tests.fixtures.hf_models import tiny_hf_config_dict
from vlaa_jax import main
from vlaa_jax.train import common, config_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", [sft_config, grpo_config])
@pytest.mark.parametrize("preset", ["demo", "vlaa_thinker_3b", "vlaa_thinker_7b", "qwen2_vl_2b", "qwen2_vl_7b"])
def test_presets_validate(module, preset):
    main.check(module.get_config(preset), module.get_config(preset))


@pytest.mark.parametrize("module", [sft_config, grpo_config])
def test_qwen2_vl_presets_are_the_paper_recipe_on_the_other_base_models(module):
    """Qwen2-VL-2B/7B presets: the Qwen2.5-VL recipe (the paper states one for all base models), only the
    model directory differs (its config.json names the family)."""
    for qwen2, qwen25 in (("qwen2_vl_2b", "vlaa_thinker_3b"), ("qwen2_vl_7b", "vlaa_thinker_7b")):
        a, b = module.get_config(qwen2).to_dict(), module.get_config(qwen25).to_dict()
        assert a.pop("preset") == qwen2 and a["model"].pop("path") == f"ckpt/{qwen2}"
        b.pop("preset"), b["model"].pop("path")
        assert a == b


def test_reference_is_the_preset_file_loaded_by_path():
    ref = main.load_preset(os.path.join(REPO, "configs", "grpo.py") + ":vlaa_thinker_7b")
    assert ref.to_dict() == grpo_config.get_config("vlaa_thinker_7b").to_dict()
    assert main.load_preset("configs/sft.py").preset == "demo"  # no ":preset": get_config()


def test_paper_recipe_values():
    c = grpo_config.get_config("vlaa_thinker_3b")
    assert (c.grpo.num_samples, c.grpo.temperature, c.grpo.rollout_batch_prompts) == (4, 0.8, 512)
    assert (c.train.batch_size, c.data.num_epochs) == (256, 1)
    assert (c.optim.warmup_ratio, c.optim.min_learning_rate) == (0.03, 5e-7)
    assert (c.grpo.kl_controller, c.grpo.init_kl_coef, c.grpo.kl_target) == ("adaptive", 1e-3, 5e-4)
    s = sft_config.get_config("vlaa_thinker_7b")
    assert (s.train.batch_size, s.model.freeze_vision) == (128, True)
    # Scale knobs of the real presets (the demo keeps the plain defaults).
    assert (c.model.attention_impl, s.model.attention_impl, c.grpo.ref_dtype) == ("cudnn", "cudnn", "bfloat16")
    assert c.grpo.rollout_batch_prompts % c.grpo.rollout_micro_batch == 0
    assert (grpo_config.get_config("demo").grpo.rollout_micro_batch, base_config.get_config().model.attention_impl
            ) == (0, "xla")


def test_attention_impl_reaches_the_model_config(qwen_tokenizer, tmp_path):
    """model.attention_impl in the model config of both branches: model.tiny and a model directory."""
    c = grpo_config.get_config("demo")
    for impl in ("cudnn", "splash"):
        c.model.attention_impl = impl
        assert common.model_config(c, qwen_tokenizer).attention_impl == impl
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config_dict()))
    c.model.init, c.model.path = "pretrained", str(tmp_path)
    assert common.model_config(c, qwen_tokenizer).attention_impl == "splash"


def _drop(config, dotted):
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    with node.unlocked():
        del node[leaf]


@pytest.mark.parametrize("key", ["train.batch_size", "grpo.kl_target", "optim", "grpo.loss.clip_low", "eval.data"])
def test_missing_key_is_named(key):
    c = grpo_config.get_config("demo")
    _drop(c, key)
    with pytest.raises(config_check.ConfigError, match=f"'{key}' is missing"):
        config_check.validate(c, grpo_config.get_config("demo"))


def test_unknown_key_is_named():
    c = sft_config.get_config("demo")
    c.train.batchsize = 3
    with pytest.raises(config_check.ConfigError, match="'train.batchsize' is unknown"):
        config_check.validate(c, sft_config.get_config("demo"))


@pytest.mark.parametrize("module,mode,match", [
    (grpo_config, "sft", "'grpo' is unknown for mode 'sft'"),  # an SFT run of a GRPO config
    (sft_config, "eval", "'grpo' is missing"),                  # eval / generate / grpo need a GRPO config
    (sft_config, "grpo", "'grpo' is missing"),
])
def test_mode_needs_its_blocks(module, mode, match):
    c = module.get_config("demo")
    c.mode = mode
    with pytest.raises(config_check.ConfigError, match=match):
        config_check.validate(c, module.get_config("demo"))


@pytest.mark.parametrize("key,value,match", [
    ("train.nonfinite_policy", "sometimes", "train.nonfinite_policy"),
    ("train.grad_accum_steps", 3, "train.grad_accum_steps"),
    ("train.batch_size", "8", "train.batch_size"),  # wrong type
    ("grpo.loss.loss_agg_mode", "mean", "grpo.loss"),
    ("mode", "dance", "mode"),
    ("model.attention_impl", "flash", "model.attention_impl"),
    ("grpo.ref_dtype", "float16", "grpo.ref_dtype"),
    ("grpo.old_logprobs", "cached", "grpo.old_logprobs"),
    ("grpo.rollout_micro_batch", 3, "grpo.rollout_micro_batch"),  # does not divide the 8 prompts
    ("grpo.rollout_micro_batch", -8, "grpo.rollout_micro_batch"),
])
def test_bad_value_is_named(key, value, match):
    c = grpo_config.get_config("demo")
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(config_check.ConfigError, match=match.replace(".", r"\.")):
        config_check.validate(c, grpo_config.get_config("demo"))


@pytest.mark.parametrize("key,value", [("eval.max_new_tokens", 0), ("eval.batch_size", -1),
                                       ("eval.min_pixels", -1), ("eval.limit", -2)])
def test_bad_eval_value_is_named(key, value):
    c = grpo_config.get_config("demo")
    c.mode = "eval"
    config_check.validate(c, grpo_config.get_config("demo"))  # the demo preset is a valid eval config
    c.eval[key.split(".")[1]] = value
    with pytest.raises(config_check.ConfigError, match=key.replace(".", r"\.")):
        config_check.validate(c, grpo_config.get_config("demo"))


def test_warm_start_stage_shares_the_grpo_run():
    """The GRPO demo's `warm_start` block is configs/sft.py:demo for 100 updates whose seed, model, data
    source / dir and progress bar follow the GRPO config's (as command-line overrides set them)."""
    c = grpo_config.get_config("demo")
    w = c.warm_start
    assert (w.mode, w.train.num_steps, w.train.export_hf, w.train.checkpoint_every) == ("sft", 100, False, 0)
    assert w.data.train_split == sft_config.get_config("demo").data.train_split
    c.lock()  # as config_flags does before applying overrides
    c.seed, c.data.dir, c.train.progress_bar, c.model.tiny.hidden_size = 7, "/data/demo", False, 96
    assert (w.seed, w.data.dir, w.train.progress_bar, w.model.tiny.hidden_size) == (7, "/data/demo", False, 96)
    assert "warm_start" not in grpo_config.get_config("vlaa_thinker_3b")


def test_warm_start_stage_is_checked_and_grpo_starts_from_its_model():
    c = grpo_config.get_config("demo")
    c.warm_start.train.grad_accum_steps = 3
    with pytest.raises(config_check.ConfigError, match=r"'warm_start\.train\.grad_accum_steps'"):
        main.check(c, grpo_config.get_config("demo"))
    c = grpo_config.get_config("demo")
    grpo = main.starting_from(c, "/runs/x/warm_start/model")
    assert (grpo.model.init, grpo.model.path) == ("pretrained", "/runs/x/warm_start/model")
    assert (c.model.init, c.model.path) == ("tiny", "")  # the user's config is left as it was


def test_cli_rejects_bad_keys_before_compiling(tmp_path):
    """Real CLI: a typo'd override and a bad value both exit non-zero naming the key, fast, and
    leave no checkpoint behind (nothing was built)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "vlaa_jax.main", "--config", "configs/sft.py:demo",
            "--workdir", str(tmp_path)]
    bad_key = subprocess.run(base + ["--config.train.batchsize=3"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert bad_key.returncode != 0 and "batchsize" in bad_key.stderr
    bad_value = subprocess.run(base + ["--config.train.nonfinite_policy=maybe"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=120)
    assert bad_value.returncode != 0 and "train.nonfinite_policy" in bad_value.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_warm_start_runs_only_from_scratch():
    """The demo's SFT stage runs before GRPO on the random model only: a pretrained model.path (an SFT
    run's model: the SFT -> GRPO recipe) is trained as given, and grpo.warm_start=False is GRPO alone."""
    c = grpo_config.get_config("demo")
    assert main.runs_warm_start(c)
    c.model.init, c.model.path = "pretrained", "/runs/sft/model"
    assert not main.runs_warm_start(c)
    c = grpo_config.get_config("demo")
    c.grpo.warm_start = False
    assert not main.runs_warm_start(c)
    assert not main.runs_warm_start(grpo_config.get_config("vlaa_thinker_3b"))
