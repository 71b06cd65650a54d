"""Data pipeline throughput: our Grain SFT / GRPO loaders vs the same work with HF Qwen2_5_VLProcessor.

    python benchmarks/data_pipeline.py [--n 200] [--epochs 3] [--batch_size 8] [--workers 2]

Prints one JSON object. Both sides read the same TFDS data source (raw image bytes) of the demo data.
Run it on an otherwise idle machine: the figures move with other load. HF side, per batch: PIL decode, `apply_chat_template` for each record, one batched processor call
(tokenize + image preprocessing, padding=True) -- what a typical HF collator does. Ours does more: bucketed
padding, loss masks (SFT), M-RoPE position ids. examples/s is steady state (after the first batch, i.e.
without worker start-up, reported separately as startup_s).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

MIN_PIXELS, MAX_PIXELS = 56 * 56, 256 * 28 * 28


def bench_ours(cfg: dict, split: str, tokenizer_dir: str, workers: int) -> dict:
    """Steady state: examples/s over the last 3/4 of the batches (the first quarter absorbs worker start-up
    and buffer filling); startup_s is the time to the first batch."""
    from data_pipeline.loader import make_loader

    t0 = time.perf_counter()
    loader = make_loader(cfg, split, tokenizer_dir, worker_count=workers)
    first = int(next(loader)["example_mask"].sum())
    t1 = time.perf_counter()
    stamps, counts = [], []
    for batch in loader:
        stamps.append(time.perf_counter())
        counts.append(int(batch["example_mask"].sum()))
    loader.close()
    q = len(stamps) // 4
    n = sum(counts[q + 1:])
    return {"examples": n, "examples_per_s": round(n / (stamps[-1] - stamps[q]), 1), "startup_s": round(t1 - t0, 2),
            "examples_per_s_incl_startup": round((sum(counts) + first) / (stamps[-1] - t0), 1)}


def bench_hf(cfg: dict, split: str, tokenizer_dir: str, tokenizer, max_examples: int) -> dict:
    import numpy as np
    import tensorflow_datasets as tfds
    from PIL import Image

    from data_pipeline.chat import VLAA_SYSTEM_PROMPT
    from data_pipeline.tokenizer import load_hf_processor
    from data_pipeline.vlaa_thinking import VlaaThinking

    proc = load_hf_processor(tokenizer_dir, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tokenizer=tokenizer)
    ds = VlaaThinking(config=split, data_dir=os.path.join(cfg["dir"], "tfds")).as_data_source(
        split="train", decoders={"image": tfds.decode.SkipDecoding()})
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(ds)), cfg["num_epochs"]))[:max_examples]
    B = cfg["batch_size"]
    t0 = time.perf_counter()
    n = 0
    for s in range(0, len(order) - B + 1, B):
        texts, images = [], []
        for i in order[s:s + B]:
            ex = ds[int(i)]
            images.append(Image.open(io.BytesIO(ex["image"])))
            msgs = [{"role": "system", "content": VLAA_SYSTEM_PROMPT},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex["question"].decode()}]}]
            if split == "sft":
                msgs.append({"role": "assistant", "content": ex["response"].decode()})
            texts.append(proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=split == "grpo"))
        proc.tokenizer.padding_side = "right" if split == "sft" else "left"
        out = proc(text=texts, images=images, padding=True, return_tensors="np")
        assert out["input_ids"].shape[0] == B
        n += B
    t1 = time.perf_counter()
    return {"examples": n, "examples_per_s": round(n / (t1 - t0), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="demo records per split")
    p.add_argument("--epochs", type=int, default=10, help="passes for our loaders (steady state needs a few)")
    p.add_argument("--hf_examples", type=int, default=480, help="examples for the HF loop (a steady rate)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data_dir", default="", help="demo data dir (default: a temp dir)")
    a = p.parse_args()

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from transformers import AutoTokenizer

    from data_pipeline.demo import make_demo_data
    from data_pipeline.tokenizer import build_qwen25vl_tokenizer

    work = tempfile.mkdtemp(prefix="bench_data_")
    data_dir = a.data_dir or os.path.join(work, "demo")
    if not os.path.isdir(data_dir):
        make_demo_data(data_dir, n=a.n)
    tok_dir = build_qwen25vl_tokenizer(os.path.join(work, "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    cfg = dict(source="demo", dir=data_dir, batch_size=a.batch_size, max_length=1024, max_prompt_length=768,
               min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, num_epochs=a.epochs, seed=0,
               process_index=0, process_count=1, drop_remainder=True)
    with contextlib.redirect_stdout(sys.stderr):  # TFDS build messages: stdout carries only the JSON
        results = run(cfg, tok_dir, tokenizer, a)
    print(json.dumps(results, indent=1))


def run(cfg: dict, tok_dir: str, tokenizer, a) -> dict:
    results = {"device": f"{os.cpu_count()} CPU cores", "batch_size": a.batch_size, "records_per_split": a.n,
               "epochs": a.epochs, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    for split in ("sft", "grpo"):
        ours = bench_ours(cfg, split, tok_dir, a.workers)
        ours_inproc = bench_ours(cfg, split, tok_dir, 0)
        hf = bench_hf(cfg, split, tok_dir, tokenizer, a.hf_examples)
        results[split] = {f"ours_{a.workers}_workers": ours, "ours_in_process": ours_inproc, "hf_processor_loop": hf,
                          "speedup_vs_hf": round(ours["examples_per_s"] / hf["examples_per_s"], 2),
                          "speedup_in_process_vs_hf": round(ours_inproc["examples_per_s"] / hf["examples_per_s"], 2)}
    return results


if __name__ == "__main__":
    main()
