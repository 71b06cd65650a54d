"""The JAX reward model's scoring time per GRPO step (reward.open_ended='jax_rm'), CPU, one device.

    python benchmarks/reward_model.py [--model qwen3b_shaped|tiny] [--prompts 2] [--samples 4]
                                      [--answer_words 24] [--repeats 3] [--dtype float32] [--step_s S]

A random reward model (`reward_model.random_reward_model`) of a benchmarks/grpo_step.py case's architecture
(qwen3b_shaped: Qwen2.5-VL-3B widths, 2 decoder layers, 4 vision blocks, tied 151,936-row embedding)
scores what one GRPO step of that benchmark sends when every prompt is open-ended (the worst case):
prompts x samples answers plus one reference per prompt, each with the demo's 56x56 image (4 image
tokens) and the real Qwen2.5-VL chat template, through `RewardModelScorer` (reward_model_batch_size 16:
one forward). The share is time / (time + the step's time without it), the step's time from `--step_s`
(default: our 3B-shaped GRPO step, 62.35 s, benchmarks/RESULTS.md, issue 17, same machine and sizes).
Prints one JSON object.
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

STEP_S = {"qwen3b_shaped": 62.35, "tiny": 3.84}   # ours, s/step (benchmarks/RESULTS.md, grpo_step, issue 17)


def requests(prompts: int, samples: int, answer_words: int, patch_dim: int, seed: int = 0):
    """What MixedReward sends for one step of open-ended prompts: answers first, then the references."""
    import numpy as np
    from vlaa_jax.rewards.open_ended import PromptImage, ScoreRequest
    rng = np.random.default_rng(seed)
    words = "a red square circle in the top left corner of grey picture with two blue shapes".split()
    out, refs = [], []
    for p in range(prompts):
        image = PromptImage(rng.standard_normal((16, patch_dim)).astype(np.float32), (1, 4, 4))
        question = "Describe the image in one sentence."
        for _ in range(samples):
            out.append(ScoreRequest(question, " ".join(rng.choice(words, answer_words)), None, f"p{p}", image))
        refs.append(ScoreRequest(question, " ".join(rng.choice(words, answer_words)), None, f"p{p}", image))
    return out + refs


def measure(model: str = "qwen3b_shaped", prompts: int = 2, samples: int = 4, answer_words: int = 24,
            repeats: int = 3, dtype: str = "float32", step_s: float | None = None) -> dict:
    from benchmarks import grpo_step
    from data_pipeline.tokenizer import build_qwen25vl_tokenizer
    from vlaa_jax.models import reward_model as rm_lib
    from vlaa_jax.models.qwen2_5_vl import from_hf_dict
    from vlaa_jax.rewards.jax_scorer import RewardModelScorer
    config = from_hf_dict(grpo_step.CASES[model].config(), dtype=dtype, param_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_qwen25vl_tokenizer(os.path.join(tmp, "tokenizer"))
        t = time.perf_counter()
        rm = rm_lib.random_reward_model(config, seed=0)
        init_s = time.perf_counter() - t
        scorer = RewardModelScorer(tok, model=rm, batch_size=16)
        items = requests(prompts, samples, answer_words, config.vision.patch_dim)
        times = []
        for _ in range(1 + repeats):
            t = time.perf_counter()
            scores = scorer.score(items)
            times.append(time.perf_counter() - t)
    med = statistics.median(times[1:])
    step = STEP_S.get(model) if step_s is None else step_s
    return {"bench": "reward_model", "model": model, "dtype": dtype, "params": rm.num_params(),
            "requests": len(items), "forwards_per_call": scorer.calls // (1 + repeats),
            "init_s": round(init_s, 2), "first_call_s": round(times[0], 3), "median_s": round(med, 3),
            "times_s": [round(x, 3) for x in times], "grpo_step_s_without": step,
            "share_of_step": None if step is None else round(med / (med + step), 4),
            "scores_finite": bool(all(abs(s) < float("inf") for s in scores)), "loadavg": list(os.getloadavg())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3b_shaped", choices=tuple(STEP_S))
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--answer_words", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--step_s", type=float, default=None, help="the GRPO step's seconds without the reward model")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.model, a.prompts, a.samples, a.answer_words, a.repeats, a.dtype, a.step_s)),
          flush=True)


if __name__ == "__main__":
    main()
