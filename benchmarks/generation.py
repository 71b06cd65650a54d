"""Generation speed of the rollout sampler vs HF `generate`, same model, same prompts, one run (CPU, float32).

    python benchmarks/generation.py [--configs tiny,qwen3b_shaped] [--batch 8] [--new_tokens 64,32] [--repeats 3]

For each config (the test fixtures' tiny model and the Qwen2.5-VL-3B widths with 2 decoder layers) an HF
model with random weights is saved and loaded into vlaa-jax; the prompts are the fixtures' two rows (images
of different sizes, left padding) tiled to `--batch` rows. Both generate greedily with no stop token
(every row produces exactly N tokens), after a warm-up run (ours: compilation; HF: first-call set-up).
  prefill_s       one prefill of the batch (ours: jitted `rollout.prefill`; HF: forward with use_cache,
                  last-token logits)
  generate_s      one whole `generate` call of N tokens (median of --repeats, ours and HF interleaved)
  generate_1_s    the same with N = 1 (prefill + one token)
  decode_tok_s    batch * (N - 1) / (generate_s - generate_1_s): decode steps only
  tokens_match    greedy tokens identical
Prints one JSON object per config and a summary line with the decode tokens/s ratio (ours / HF).
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


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_config(name: str, batch: int, new_tokens: int, repeats: int) -> dict:
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
    def prefill(state, prompts):
        return rollout.prefill(nnx.merge(graphdef, state), prompts, L + new_tokens)[1]

    dev_prompts = {k: jax.numpy.asarray(v) for k, v in prompts.items()}
    kw = dict(sampling=rollout.SamplingConfig(temperature=0), stop_ids=(), pad_id=pad)
    ours_generate = lambda n: rollout.generate(graphdef, state, prompts, max_new_tokens=n, **kw)  # noqa: E731
    t = time.perf_counter()
    jax.block_until_ready(prefill(state, dev_prompts))
    ours_generate(new_tokens)
    ours_generate(1)
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

    hf_generate(1)   # warm-up
    # Interleaved repeats: the machine may be shared, both sides see the same load.
    runs = {"ours_prefill": lambda: jax.block_until_ready(prefill(state, dev_prompts)),
            "ours_gen": lambda: ours_generate(new_tokens), "ours_gen1": lambda: ours_generate(1),
            "hf_prefill": hf_prefill, "hf_gen": lambda: hf_generate(new_tokens), "hf_gen1": lambda: hf_generate(1)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs = {}
    for _ in range(repeats):
        for key, fn in runs.items():
            t, outs[key] = _timed(fn, 1)
            times[key].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours_prefill, ours_gen = med["ours_prefill"], med["ours_gen"]
    hf_prefill_s, hf_gen = med["hf_prefill"], med["hf_gen"]
    ours_out, hf_out = outs["ours_gen"], outs["hf_gen"]
    hf_tokens = hf_out[:, ids.shape[1]:].numpy()
    n_dec = batch * (new_tokens - 1)
    result = dict(
        config=name, batch=batch, new_tokens=new_tokens, prompt_len=int(ids.shape[1]), padded_prompt_len=int(L),
        device=str(jax.devices()[0].platform), torch_threads=torch.get_num_threads(),
        ours=dict(compile_s=round(ours_compile, 2), prefill_s=round(ours_prefill, 4), generate_s=round(ours_gen, 4),
                  generate_1_s=round(med["ours_gen1"], 4),
                  decode_tok_s=round(n_dec / max(ours_gen - med["ours_gen1"], 1e-9), 1)),
        hf=dict(prefill_s=round(hf_prefill_s, 4), generate_s=round(hf_gen, 4), generate_1_s=round(med["hf_gen1"], 4),
                decode_tok_s=round(n_dec / max(hf_gen - med["hf_gen1"], 1e-9), 1)),
        tokens_match=bool(np.array_equal(ours_out.tokens, hf_tokens)),
    )
    result["decode_speedup"] = round(result["ours"]["decode_tok_s"] / result["hf"]["decode_tok_s"], 2)
    result["end_to_end_speedup"] = round(hf_gen / ours_gen, 2)
    result["prefill_speedup"] = round(hf_prefill_s / ours_prefill, 2)
    return result


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,qwen3b_shaped")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new_tokens", default="64,32", help="per config, comma separated")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    names = a.configs.split(",")
    counts = [int(x) for x in a.new_tokens.split(",")]
    counts += counts[-1:] * (len(names) - len(counts))
    results = []
    for name, n in zip(names, counts):
        r = bench_config(name, a.batch, n, a.repeats)
        print(json.dumps(r), flush=True)
        results.append(r)
    print(json.dumps({"summary": {r["config"]: {"decode_speedup": r["decode_speedup"],
                                                "end_to_end_speedup": r["end_to_end_speedup"],
                                                "tokens_match": r["tokens_match"]} for r in results}}))
    return results


if __name__ == "__main__":
    main()
