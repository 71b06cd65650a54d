"""Data pipeline throughput: our Grain SFT / GRPO loaders vs the same work with HF Qwen2_5_VLProcessor.

    python benchmarks/data_pipeline.py [--quick] [--repeats 3] [--n 200] [--batch_size 8] [--workers 2]

Prints one JSON object (the pair format of benchmarks/run.py; ratio = SFT split, GRPO split in details). Both sides read the same TFDS data source (raw image bytes) of the demo data.
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

from data_pipeline.loader import make_loader  # noqa: E402 (after the path set-up)
from data_pipeline.model_inputs import PromptBatch  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 56 * 56, 256 * 28 * 28


def bench_ours(cfg: dict, split: str, tokenizer_dir: str, workers: int) -> dict:
    """Steady state: examples/s over the last 3/4 of the batches (the first quarter absorbs worker start-up
    and buffer filling); startup_s is the time to the first batch."""
    def examples(batch) -> int:  # SFT: a dict of fields; GRPO: a PromptBatch of the real examples
        return len(batch) if isinstance(batch, PromptBatch) else int(batch["example_mask"].sum())

    t0 = time.perf_counter()
    loader = make_loader(cfg, split, tokenizer_dir, worker_count=workers)
    first = examples(next(loader))
    t1 = time.perf_counter()
    stamps, counts = [], []
    for batch in loader:
        stamps.append(time.perf_counter())
        counts.append(examples(batch))
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


def _setup(n: int, data_dir: str = ""):
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from transformers import AutoTokenizer

    from data_pipeline.demo import make_demo_data
    from data_pipeline.tokenizer import build_qwen25vl_tokenizer

    work = tempfile.mkdtemp(prefix="bench_data_")
    data_dir = data_dir or os.path.join(work, "demo")
    if not os.path.isdir(data_dir):
        with contextlib.redirect_stdout(sys.stderr):
            make_demo_data(data_dir, n=n)
    tok_dir = build_qwen25vl_tokenizer(os.path.join(work, "tokenizer"))
    return data_dir, tok_dir, AutoTokenizer.from_pretrained(tok_dir)


def _cfg(data_dir: str, batch_size: int, epochs: int) -> dict:
    return dict(source="demo", dir=data_dir, batch_size=batch_size, max_length=1024, max_prompt_length=768,
                min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, num_epochs=epochs, seed=0,
                process_index=0, process_count=1, drop_remainder=True)


def run_pair(quick: bool = False, repeats: int | None = None, *, n: int = 200, batch_size: int = 8,
             workers: int = 2, data_dir: str = "") -> dict:
    """Pair 4 of benchmarks/run.py: SFT loader examples/s, ours (Grain, `workers` processes) / HF processor
    loop, alternating over `repeats` rounds (medians); the GRPO split's ratio is in details."""
    import statistics
    repeats = repeats or (1 if quick else 3)
    epochs, hf_examples = (4, 160) if quick else (10, 480)
    data_dir, tok_dir, tokenizer = _setup(n, data_dir)
    cfg = _cfg(data_dir, batch_size, epochs)
    runs: dict[str, dict[str, list]] = {s: {"ours": [], "hf": []} for s in ("sft", "grpo")}
    with contextlib.redirect_stdout(sys.stderr):  # TFDS build messages
        for _ in range(repeats):
            for split in ("sft", "grpo"):
                runs[split]["ours"].append(bench_ours(cfg, split, tok_dir, workers))
                runs[split]["hf"].append(bench_hf(cfg, split, tok_dir, tokenizer, hf_examples))
    med = {s: {k: statistics.median(r["examples_per_s"] for r in v) for k, v in d.items()} for s, d in runs.items()}
    ours, theirs = med["sft"]["ours"], med["sft"]["hf"]
    ratio = ours / theirs
    return {"pair": "data_pipeline", "metric": "SFT examples/s (steady state, batch %d)" % batch_size,
            "lower_is_better": False, "ours": round(ours, 1), "theirs": round(theirs, 1), "ratio": round(ratio, 2),
            "target": ">= 2.0", "met": bool(ratio >= 2.0),
            "peer": "Qwen2_5_VLProcessor (transformers) loop: PIL decode + apply_chat_template + batched processor call",
            "details": {"workers": workers, "batch_size": batch_size, "records_per_split": n, "epochs": epochs,
                        "repeats": repeats, "grpo_examples_per_s": med["grpo"],
                        "grpo_ratio": round(med["grpo"]["ours"] / med["grpo"]["hf"], 2),
                        "ours_startup_s": [r["startup_s"] for r in runs["sft"]["ours"]],
                        "runs": runs, "loadavg": os.getloadavg()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer epochs / examples, one round")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 3, quick 1)")
    p.add_argument("--n", type=int, default=200, help="demo records per split")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data_dir", default="", help="demo data dir (default: a temp dir)")
    a = p.parse_args()
    print(json.dumps(run_pair(a.quick, a.repeats, n=a.n, batch_size=a.batch_size, workers=a.workers,
                              data_dir=a.data_dir)))


if __name__ == "__main__":
    main()
