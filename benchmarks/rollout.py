"""Pair "rollout" (issue 17): the continuous-batching engine vs the static sampler on requests with a
realistic long tail of response lengths, same model, same requests, one process, float32 on CPU.

    python benchmarks/rollout.py [--quick] [--repeats N] [--prompts 24] [--samples 4] [--slots 16]
                                 [--median 350] [--cap 1024] [--cap_fraction 0.10] [--scale 0.125]

Requests: `--prompts` prompts x `--samples` samples (GRPO groups), each prompt ~40 text tokens and one
56x56 image (4 image tokens). Response lengths: a lognormal with median `--median` whose upper tail puts
`--cap_fraction` of the rows at `--cap` (the issue's fit of R1-style responses: median ~350, mean ~437,
10% at the 1,024 cap), then multiplied by `--scale` (default 1/8: the same shape at a length a 2-core CPU
runs in minutes; the utilisations depend on the shape, not the scale). Every row gets its own
`max_new_tokens` = its drawn length and no stop id, so both sides produce exactly the same tokens.

Static (theirs): `rollout.generate` in calls of `--slots` rows (slots / samples prompts), the row
layout of a GRPO rollout with `grpo.rollout_engine="static"`: each call decodes until its longest row
ends, which is what stop tokens at those lengths would make it do. Continuous (ours): `rollout.Engine`
with `--slots` slots (the same KV cache rows). Both sample at temperature 0.8 with the same seed; the
tokens are compared row by row. The 3B-shaped shallow model (`tests.fixtures.hf_models`: Qwen2.5-VL-3B
widths, 2 decoder layers) with random weights.

Per side: wall_s (whole call, median over repeats, after a warm-up run that compiles), useful tokens/s
(the drawn lengths' sum / wall_s), slot utilisation (real tokens / slot-steps: decode steps x rows
decoded), decode steps; the engine's prefill / decode split. Headline: useful tokens/s ours / theirs,
target >= 1.8, and the engine's utilisation, target >= 0.85.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAIR = "rollout"
TARGET_SPEEDUP = 1.8
TARGET_UTILISATION = 0.85


def response_lengths(rows: int, *, median: float, cap: int, cap_fraction: float, scale: float, seed: int):
    """Lognormal lengths with the given median and P(length >= cap) = cap_fraction, capped, scaled."""
    import numpy as np
    from scipy import stats
    sigma = np.log(cap / median) / stats.norm.ppf(1.0 - cap_fraction)
    x = np.exp(np.log(median) + sigma * np.random.default_rng(seed).standard_normal(rows))
    return np.maximum(1, np.round(np.minimum(x, cap) * scale)).astype(np.int32)


def make_prompts(config, num: int, seed: int):
    """`num` prompts: ~40 random text tokens around one 56x56 image (4x4 patches -> 4 image tokens)."""
    import numpy as np
    rs = np.random.default_rng(seed)
    v = config.vision
    out = []
    for _ in range(num):
        text = lambda n: list(rs.integers(1000, 100000, n))  # noqa: E731
        ids = text(int(rs.integers(20, 40))) + [config.vision_start_token_id] + [config.image_token_id] * 4 + \
            [config.vision_end_token_id] + text(int(rs.integers(5, 15)))
        pv = rs.standard_normal((16, v.patch_dim)).astype(np.float32)
        out.append((np.asarray(ids, np.int32), pv, np.array([[1, 4, 4]])))
    return out


def run_pair(quick: bool = False, repeats: int | None = None, *, prompts: int | None = None, samples: int = 4,
             slots: int = 16, median: float = 350, cap: int = 1024, cap_fraction: float = 0.10,
             scale: float | None = None, seed: int = 0) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from tests.fixtures import hf_models
    from vlaa_jax import rollout
    from vlaa_jax.models import qwen2_5_vl as q

    t_start = time.perf_counter()
    repeats = repeats or (1 if quick else 2)
    prompts = prompts or (12 if quick else 24)
    scale = scale if scale is not None else (1 / 16 if quick else 1 / 8)
    config = q.from_hf_dict(hf_models.qwen3b_shaped_hf_config_dict())
    model = q.Qwen25VL(config, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    pad = 151643
    plist = make_prompts(config, prompts, seed)
    rows = prompts * samples
    limits = response_lengths(rows, median=median, cap=cap, cap_fraction=cap_fraction, scale=scale, seed=seed)
    sampling = rollout.SamplingConfig(temperature=0.8)
    source = rollout.PromptSource.from_prompts(config, plist, pad_id=pad)
    engine = rollout.Engine(graphdef, config, slots=slots, stop_ids=(), pad_id=pad, sampling=sampling)
    per_call = slots // samples
    calls = [np.arange(i, min(i + per_call, prompts)) for i in range(0, prompts, per_call)]
    batches = [source.layout(idx, 1) for idx in calls]
    key = jax.random.key(seed)

    def ours():
        t = time.perf_counter()
        gen, stats = engine.generate(state, source, num_samples=samples, max_new_tokens=limits, rng=key)
        return gen, stats, time.perf_counter() - t

    def theirs():
        t, parts, row = time.perf_counter(), [], 0
        for idx, batch in zip(calls, batches):
            lim = limits[row:row + len(idx) * samples]
            parts.append(rollout.generate(graphdef, state, batch, max_new_tokens=int(lim.max()), num_samples=samples,
                                          sampling=sampling, rng=key, stop_ids=(), pad_id=pad, row_offset=row))
            row += len(idx) * samples
        wall = time.perf_counter() - t
        gen = rollout.concat_generations(parts, pad)
        return gen, rollout.static_stats(limits, [len(p.lengths) for p in parts], wall), wall

    t = time.perf_counter()
    ours()
    theirs()
    compile_s = time.perf_counter() - t
    runs = {"ours": [], "theirs": []}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):              # alternating: both sides see the same machine load
        for name, fn in (("ours", ours), ("theirs", theirs)):
            runs[name].append(fn())
        load.append(os.getloadavg()[0])
    useful = int(limits.sum())
    (g_ours, s_ours, _), (g_theirs, s_theirs, _) = runs["ours"][-1], runs["theirs"][-1]
    match = all(np.array_equal(g_ours.tokens[r, :limits[r]], g_theirs.tokens[r, :limits[r]]) for r in range(rows))

    def side(name, stats):
        walls = [w for _, _, w in runs[name]]
        wall = statistics.median(walls)
        out = dict(wall_s=round(wall, 3), walls=[round(w, 3) for w in walls], useful_tok_s=round(useful / wall, 2),
                   utilisation=round(stats.utilisation, 4), decode_steps=stats.decode_steps,
                   slot_steps=stats.slot_steps)
        if name == "ours":
            out.update(prefill_s=round(stats.prefill_s, 3), decode_s=round(stats.decode_s, 3),
                       prefill_calls=stats.prefill_calls, queue_wait_s=round(stats.queue_wait_s, 3))
        return out

    o, th = side("ours", s_ours), side("theirs", s_theirs)
    speedup = round(o["useful_tok_s"] / th["useful_tok_s"], 3)
    return {
        "pair": PAIR,
        "metric": f"useful tokens/s of a rollout, {rows} requests ({prompts} prompts x {samples}) with lognormal "
                  f"lengths (median {median:g}, {cap_fraction:.0%} at cap {cap}, x{scale:g}), {slots} decode slots, "
                  "qwen3b_shaped, float32 CPU",
        "lower_is_better": False,
        "ours": o["useful_tok_s"], "theirs": th["useful_tok_s"], "ratio": speedup,
        "target": f">= {TARGET_SPEEDUP} and utilisation >= {TARGET_UTILISATION}",
        "met": bool(speedup >= TARGET_SPEEDUP and o["utilisation"] >= TARGET_UTILISATION),
        "peer": "vlaa-jax static sampler (rollout.generate in calls of the same rows; grpo.rollout_engine='static')",
        "details": {
            "ours": o, "theirs": th, "tokens_match": bool(match), "useful_tokens": useful,
            "lengths": {"mean": round(float(limits.mean()), 1), "median": float(np.median(limits)),
                        "max": int(limits.max()), "at_cap": float(np.mean(limits >= round(cap * scale)))},
            "expected_static_utilisation": round(float(limits.mean() / max(limits.max(), 1)), 4),
            "compile_s": round(compile_s, 1), "repeats": repeats, "loadavg_1min": [round(x, 2) for x in load],
            "wall_s": round(time.perf_counter() - t_start, 1), "quick": quick,
        },
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repeat, 12 prompts, lengths x 1/16")
    p.add_argument("--repeats", type=int, default=None, help="default 2 (1 with --quick)")
    p.add_argument("--prompts", type=int, default=None, help="default 24 (12 with --quick)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--median", type=float, default=350)
    p.add_argument("--cap", type=int, default=1024)
    p.add_argument("--cap_fraction", type=float, default=0.10)
    p.add_argument("--scale", type=float, default=None, help="length multiplier (default 1/8; 1/16 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = run_pair(a.quick, a.repeats, prompts=a.prompts, samples=a.samples, slots=a.slots, median=a.median,
                   cap=a.cap, cap_fraction=a.cap_fraction, scale=a.scale, seed=a.seed)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
