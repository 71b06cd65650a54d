"""Pair "generation" (issue 10): greedy generation of 64 tokens at batch 8, our rollout sampler vs HF
`generate`, same model, same prompts, one process, float32 on CPU.

    python benchmarks/generation.py [--quick] [--repeats N] [--configs qwen3b_shaped,tiny] [--batch 8]
                                    [--new_tokens 64]

Headline (the pair JSON, last stdout line): generated tokens/s = batch * new_tokens / (one whole
`generate` call), ours / HF, target >= 3, on the Qwen2.5-VL-3B widths with 2 decoder layers (the test
fixtures' `qwen3b_shaped`, tied 151936 x 2048 embedding). The tiny config is an extra in the details
(full run only). For each config an HF model with random weights is saved and loaded into vlaa-jax;
the prompts are the fixtures' two rows (images of different sizes, left padding) tiled to `--batch`
rows. Both generate greedily with no stop token (every row produces exactly N tokens), after a warm-up
(ours: compilation; HF: a first call), alternating ours / HF within every repeat. Per config:
  generate_s      one whole `generate` call of N tokens (median over repeats)
  generate_1_s    the same with N = 1 (prefill + one token)
  prefill_s       one prefill (ours: jitted `rollout.prefill`; HF: forward with use_cache, last-token
                  logits); full run only
  tok_s           batch * N / generate_s (the headline metric)
  decode_tok_s    batch * (N - 1) / (generate_s - generate_1_s): decode steps only
  tokens_match    greedy tokens identical to HF, token for token
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

PAIR = "generation"
TARGET = 3.0


def bench_config(name: str, batch: int, new_tokens: int, repeats: int, *, prefill: bool = True) -> dict:
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from tests.fixtures import hf_models
    from vlaa_jax import rollout
    from vlaa_jax.models import qwen2_5_vl as q

    cfg = {"tiny": lambda: hf_models.tiny_hf_config_dict(False),
           "qwen3b_shaped": hf_models.qwen3b_shaped_hf_config_dict}[name]()
    pad = cfg["text_config"]["pad_token_id"]
    hf = hf_models.build_hf_model(cfg, seed=0)
    b = hf_models.make_batch(cfg, padding="left", seed=0)
    if batch % b.input_ids.shape[0]:
        raise ValueError(f"--batch {batch} must be a multiple of the fixture batch ({b.input_ids.shape[0]} rows)")
    reps = batch // b.input_ids.shape[0]
    ids, mask = np.tile(b.input_ids, (reps, 1)), np.tile(b.attention_mask, (reps, 1))
    pv, grid = np.tile(b.pixel_values, (reps, 1)), np.tile(b.image_grid_thw, (reps, 1))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = q.from_pretrained(d)
    graphdef, state = nnx.split(model)
    # ------------------------------------------------------------------------------------ ours
    prompts = rollout.prompt_batch(model.config, ids, mask, pixel_values=pv, image_grid_thw=grid, pad_id=pad,
                                   length_multiple=16, patch_multiple=64)
    L = prompts["input_ids"].shape[1]

    @jax.jit
    def ours_prefill_fn(state, prompts):
        return rollout.prefill(nnx.merge(graphdef, state), prompts, L + new_tokens)[1]

    dev_prompts = {k: jax.numpy.asarray(v) for k, v in prompts.items()}
    kw = dict(sampling=rollout.SamplingConfig(temperature=0), stop_ids=(), pad_id=pad)
    ours_generate = lambda n: rollout.generate(graphdef, state, prompts, max_new_tokens=n, **kw)  # noqa: E731
    t = time.perf_counter()
    ours_generate(new_tokens)
    ours_generate(1)
    if prefill:
        jax.block_until_ready(ours_prefill_fn(state, dev_prompts))
    ours_compile = time.perf_counter() - t
    # -------------------------------------------------------------------------------------- HF
    hf_in = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 mm_token_type_ids=torch.from_numpy((ids == cfg["image_token_id"]).astype(np.int64)),
                 pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid))

    def hf_generate(n):
        with torch.no_grad():
            return hf.generate(**hf_in, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=pad)

    def hf_prefill():
        with torch.no_grad():
            hf.model.rope_deltas = None
            return hf(**hf_in, use_cache=True, logits_to_keep=1).logits

    t = time.perf_counter()
    hf_generate(1)   # warm-up
    hf_warmup = time.perf_counter() - t
    # Interleaved repeats: the machine may be shared, both sides see the same load.
    runs = {"ours_gen": lambda: ours_generate(new_tokens), "hf_gen": lambda: hf_generate(new_tokens),
            "ours_gen1": lambda: ours_generate(1), "hf_gen1": lambda: hf_generate(1)}
    if prefill:
        runs.update(ours_prefill=lambda: jax.block_until_ready(ours_prefill_fn(state, dev_prompts)),
                    hf_prefill=hf_prefill)
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs = {}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        for key, fn in runs.items():
            t = time.perf_counter()
            outs[key] = fn()
            times[key].append(round(time.perf_counter() - t, 4))
        load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    hf_tokens = outs["hf_gen"][:, ids.shape[1]:].numpy()
    n_dec = batch * (new_tokens - 1)

    def side(p):
        out = dict(generate_s=round(med[f"{p}_gen"], 4), generate_1_s=round(med[f"{p}_gen1"], 4),
                   tok_s=round(batch * new_tokens / med[f"{p}_gen"], 2),
                   # None when the difference drowns in noise (tiny config: the whole call is ~0.2 s)
                   decode_tok_s=(round(n_dec / (med[f"{p}_gen"] - med[f"{p}_gen1"]), 2)
                                 if med[f"{p}_gen"] > 1.2 * med[f"{p}_gen1"] else None),
                   times={k[len(p) + 1:]: v for k, v in times.items() if k.startswith(p + "_")})
        if prefill:
            out["prefill_s"] = round(med[f"{p}_prefill"], 4)
        return out

    result = dict(
        config=name, batch=batch, new_tokens=new_tokens, prompt_len=int(ids.shape[1]), padded_prompt_len=int(L),
        image_patches=int(pv.shape[0]), padded_patches=int(np.prod(prompts["pixel_values"].shape[:-1])),
        device=str(jax.devices()[0].platform), torch_threads=torch.get_num_threads(), repeats=repeats,
        ours=dict(compile_s=round(ours_compile, 2), **side("ours")), hf=dict(warmup_s=round(hf_warmup, 2), **side("hf")),
        tokens_match=bool(np.array_equal(outs["ours_gen"].tokens, hf_tokens)),
        loadavg_1min=[round(x, 2) for x in load],
    )
    result["speedup"] = round(result["ours"]["tok_s"] / result["hf"]["tok_s"], 3)
    dec = result["ours"]["decode_tok_s"], result["hf"]["decode_tok_s"]
    result["decode_speedup"] = round(dec[0] / dec[1], 3) if None not in dec else None
    if prefill:
        result["prefill_speedup"] = round(result["hf"]["prefill_s"] / result["ours"]["prefill_s"], 3)
    return result


def run_pair(quick: bool = False, repeats: int | None = None, *, configs: tuple[str, ...] | None = None,
             batch: int = 8, new_tokens: int = 64) -> dict:
    """The issue's pair on the first config (default qwen3b_shaped); further configs go into details.
    quick: 1 repeat, no separate prefill timing, no extra configs (same shapes)."""
    import torch
    import transformers

    configs = tuple(configs or (("qwen3b_shaped",) if quick else ("qwen3b_shaped", "tiny")))
    repeats = repeats or (1 if quick else 3)
    t0 = time.perf_counter()
    results = []
    for name in configs:
        r = bench_config(name, batch, new_tokens, repeats, prefill=not quick)
        print(json.dumps(r), flush=True)
        results.append(r)
    head = results[0]
    return {
        "pair": PAIR,
        "metric": f"generated tokens/s, greedy, batch {batch} x {new_tokens} new tokens, whole generate call "
                  f"(prefill with images + decode), {head['config']} config, float32 CPU",
        "lower_is_better": False,
        "ours": head["ours"]["tok_s"], "theirs": head["hf"]["tok_s"], "ratio": head["speedup"],
        "target": f">= {TARGET}", "met": bool(head["speedup"] >= TARGET),
        "peer": f"HF transformers {transformers.__version__} Qwen2_5_VLForConditionalGeneration.generate "
                f"(torch {torch.__version__}, eager attention, {torch.get_num_threads()} threads)",
        "details": {
            "decode_only_ratio": head["decode_speedup"], "tokens_match": head["tokens_match"],
            "configs": {r["config"]: r for r in results}, "wall_s": round(time.perf_counter() - t0, 1),
            "quick": quick,
        },
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repeat, 3B-shaped config only, no prefill timing")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--configs", default=None, help="comma separated, first = headline (default qwen3b_shaped,tiny)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    a = p.parse_args(argv)
    out = run_pair(a.quick, a.repeats, configs=tuple(a.configs.split(",")) if a.configs else None,
                   batch=a.batch, new_tokens=a.new_tokens)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
