"""One SFT and one GRPO step of a tiny Qwen2-VL through the trainers (a subprocess each, one CPU device):
the family comes from the model directory's config.json alone, and the trainer's HF export loads in
`Qwen2VLForConditionalGeneration` with no missing or unexpected keys; the export records the pixel bounds
it was trained with, as for Qwen2.5-VL."""
import json
import os

import numpy as np
import pytest

from tests.train.helpers import run_trainer
from vlaa_jax.eval import harness


@pytest.mark.parametrize("mode,extra", [("sft", []), ("grpo", ["--toy_reward"])])
def test_one_step_of_a_tiny_qwen2_vl(mode, extra, tiny_qwen2_vl_train_dir, demo_data_dir, jax_cache_dir, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration
    s = run_trainer(mode, tmp_path / "w", demo_data_dir, "--steps", "1", "--checkpoint_every", "1", *extra,
                    "--set", 'model.init="pretrained"', "--set", f'model.path="{tiny_qwen2_vl_train_dir}"',
                    "--set", "train.export_hf=true", cache_dir=jax_cache_dir)
    assert s["steps"] == 1 and not s["skipped_nonfinite"]
    if mode == "sft":
        assert np.isfinite(s["first_loss"])
    else:
        assert len(s["reward_history"]) == 1
    for key in ("model_dir", "hf_dir"):
        with open(os.path.join(s[key], "config.json")) as f:
            conf = json.load(f)
        assert conf["model_type"] == "qwen2_vl" and conf["architectures"] == ["Qwen2VLForConditionalGeneration"]
    # generate / evaluate / mode=eval resize images as this run trained (the demo's 56*56 bounds)
    assert harness.pixel_limits(s["model_dir"]) == (56 * 56, 56 * 56)
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(s["hf_dir"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.vision_config.embed_dim == 32
