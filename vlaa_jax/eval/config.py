"""The `eval` config block (mode="eval", tools/evaluate.py). Defaults are the paper's evaluation settings
(arXiv 2504.11468 sec. 5: greedy decoding, max pixels 256*32*32, 800 new tokens, the VLAA-Thinker
system prompt). Imports only ml_collections, so configs/*.py can build it cheaply."""
from __future__ import annotations

import ml_collections

PAPER_MAX_PIXELS = 256 * 32 * 32  # paper sec. 5
PAPER_MAX_NEW_TOKENS = 800        # paper sec. 5


def eval_config() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.data = ""              # benchmark: VLMEvalKit TSV, JSON / JSONL, or a VLAA-Thinking dataset dir (held-out)
    e.images_root = ""       # folder the image paths of JSON benchmarks are relative to ("" = the file's folder)
    e.ids_file = ""          # evaluate only the ids listed in this file ("" = all; a dataset dir: heldout_ids.txt)
    e.limit = 0              # first N items only (0 = all)
    e.batch_size = 8         # prompts per generate call (must divide over the data-parallel devices)
    e.max_new_tokens = PAPER_MAX_NEW_TOKENS  # response length limit in tokens (paper sec. 5: 800)
    e.min_pixels = 4 * 28 * 28               # image resize lower bound in pixels (Qwen2.5-VL processor default)
    e.max_pixels = PAPER_MAX_PIXELS          # image resize upper bound in pixels (paper sec. 5: 256*32*32)
    e.system_prompt = "vlaa"  # "vlaa": the VLAA-Thinker prompt (paper); "default": the chat template's own
    e.output_dir = ""        # predictions.jsonl, report.json, table.txt ("" = workdir/eval/<benchmark name>)
    e.length_bins = 4        # quantile bins of the accuracy-vs-length table
    return e
