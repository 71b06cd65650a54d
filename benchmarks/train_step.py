"""SFT train step (forward + backward + AdamW) of the 3B-shaped shallow Qwen2.5-VL: ours vs HF transformers + torch.

    python benchmarks/train_step.py [--quick] [--repeats N] [--batch B]

--quick (a smoke run of a few minutes at most): batch 1 (one row, 320 response tokens), one round of
one timed step per side after the warm-ups. The full run: batch 2, `--repeats` (default 2) rounds of
two timed steps per side (each ~20-35 s per step on this 2-core CPU). Each side runs in its own child
process, alternating ours / theirs (see `run_pair`), so only one model with its AdamW state is
resident at a time (peak ~10 GiB).

Model: `tests.fixtures.hf_models.qwen3b_shaped_hf_config_dict()` (Qwen2.5-VL-3B widths, 2 decoder layers, 4
vision blocks, tied 151,936 x 2048 embedding), random weights, saved as an HF checkpoint and loaded by both
sides (ours with `vlaa_jax.models.qwen2_5_vl.from_pretrained`), float32 on CPU.

Batch (the paper's SFT setting): B rows (default 2), each one 448x448 image (1,024 patches -> 256 merged
tokens), a prompt of 38 text tokens around it, and a response of 320 / 256 tokens (rows alternate), right
padding to a length bucket of 64. Loss: token-mean NLL over the response tokens of the batch. The vision
tower is frozen except its patch merger (`vlaa_jax.train.common.VISION_FROZEN_PATTERNS`, as our SFT trainer);
the decoder, tied embedding and merger train. AdamW (lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight
decay) after global-norm clipping at 1.0 on both sides (the HF Trainer clips at 1.0 by default too).

Ours: what `vlaa_jax.train.sft.train` runs: `sft.host_batch` -> `common.put_batch` -> the jitted
`step.make_train_step` step with `sft.sft_loss` (chunk 512), `common.run_trainable_mask` and the optimiser
of `common.run_optimizer` (configs/sft.py:vlaa_thinker_3b, with no warm-up so the first update moves), on
one CPU device, parameters and optimiser state donated.
Theirs: `Qwen2_5_VLForConditionalGeneration.from_pretrained` (default attention implementation: sdpa), eager
(no torch.compile), train mode, `model.model.visual.requires_grad_(False)` then its merger back on, `labels` = -100 on
prompt / image / padding, `mm_token_type_ids` given (3D M-RoPE), then `loss.backward()`,
`clip_grad_norm_(1.0)`, `opt.step()`, `opt.zero_grad()` with `torch.optim.AdamW` (its default implementation).

Same model and batch: both initial losses are reported (relative difference must be ~1e-5), and the losses
after the first update too (same optimiser).

Model FLOPs of the step (`model_flops`): what the loss needs, counted on real (unpadded) tokens:
  * frozen vision tower, forward only: 2 * N_tower * P (patch embedding and blocks, P real patches) plus
    its attention 4 * d * sum(window_or_image_len^2) (QK^T and PV over each window / full image);
  * patch merger (trained, its ln_q scale included, so its input gradient is needed too; nothing below
    it): 6 * (N_fc1 + N_fc2) * M (M merged tokens);
  * decoder: 6 * N_dec * T (T real tokens, N_dec the non-embedding decoder weights) plus causal
    attention forward + backward 3 * 2 * d * n * (n + 1) per row of n tokens and per layer;
  * output projection (tied embedding) only at the K response positions: 6 * D * V * K.
  No FLOPs for the optimiser (memory bound), norms, rotary, softmax or the embedding gather.
The machine's fp32 peak is the best GFLOP/s of a jitted `jnp.dot` of square float32 matrices (2048, 4096),
measured in the same run; `mfu` = model FLOPs / our median step time / that peak. XLA's own count
(`cost_analysis()["flops"]` of the compiled step) is reported beside it.
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

PAIR = "sft_train_step"
TARGET_RATIO = 0.6
TARGET_MFU = 0.70
IMAGE_HW = (448, 448)
PROMPT = (14, 24)           # text tokens before / after the image
RESPONSES = (320, 256)      # response tokens per row (cycled over rows)
LENGTH_MULTIPLE = 64
LR = 1e-5


# ------------------------------------------------------------------------------------------- inputs
def make_sft_batch(cfg: dict, batch: int, seed: int = 0) -> dict:
    """Host arrays of B SFT rows: [prompt, <vision_start>, image pads, <vision_end>, prompt, response],
    right padded. Returns the loader-like fields plus HF's `labels` / `mm_token_type_ids`."""
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.fixtures.hf_models import TINY_IDS
    from vlaa_jax.models.qwen2_5_vl import layout

    rs = np.random.RandomState(seed)
    v, t = cfg["vision_config"], cfg["text_config"]
    m = v["spatial_merge_size"]
    proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=4096 * 28 * 28, patch_size=v["patch_size"],
                                    merge_size=m, temporal_patch_size=v["temporal_patch_size"])
    specials = [cfg[k] for k in TINY_IDS]

    def text(n):
        out = rs.randint(3, 151643, size=n)
        while np.isin(out, specials).any():
            out = np.where(np.isin(out, specials), rs.randint(3, 151643, size=n), out)
        return list(out)

    rows, masks, pixels, grids = [], [], [], []
    for b in range(batch):
        img = Image.fromarray(rs.randint(0, 256, (*IMAGE_HW, 3), dtype=np.uint8))
        out = proc(images=[img], return_tensors="np")
        pixels.append(out["pixel_values"])
        grids.append(out["image_grid_thw"])
        n_img = int(np.prod(out["image_grid_thw"])) // (m * m)
        prompt = text(PROMPT[0]) + [cfg["vision_start_token_id"]] + [cfg["image_token_id"]] * n_img + \
            [cfg["vision_end_token_id"]] + text(PROMPT[1])
        response = text(RESPONSES[b % len(RESPONSES)] - 1) + [t["eos_token_id"]]
        rows.append(prompt + response)
        masks.append([0] * len(prompt) + [1] * len(response))
    L = -(-max(map(len, rows)) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    ids = np.full((batch, L), t["pad_token_id"], np.int32)
    att = np.zeros((batch, L), np.int32)
    loss = np.zeros((batch, L), np.int32)
    for b, (r, lm) in enumerate(zip(rows, masks)):
        ids[b, :len(r)], att[b, :len(r)], loss[b, :len(r)] = r, 1, lm
    grid = np.concatenate(grids).astype(np.int32)
    pos, _ = layout.mrope_positions(ids, grid, att, spatial_merge_size=m, image_token_id=cfg["image_token_id"],
                                    vision_start_token_id=cfg["vision_start_token_id"])
    return dict(input_ids=ids, attention_mask=att, loss_mask=loss, position_ids=pos,
                pixel_values=np.concatenate(pixels).astype(np.float32), image_grid_thw=grid,
                labels=np.where(loss > 0, ids, -100).astype(np.int64),
                mm_token_type_ids=(ids == cfg["image_token_id"]).astype(np.int64))


# --------------------------------------------------------------------------------------------- FLOPs
def model_flops(cfg: dict, host: dict) -> dict:
    """Model FLOPs of one SFT step on `host` (see the module docstring), by part."""
    import numpy as np
    v, t = cfg["vision_config"], cfg["text_config"]
    D, V, F = t["hidden_size"], t["vocab_size"], t["intermediate_size"]
    hd = D // t["num_attention_heads"]
    n_dec_layer = (D * D + D                                             # q (+ bias)
                   + 2 * (D * t["num_key_value_heads"] * hd + t["num_key_value_heads"] * hd)   # k, v
                   + D * D + 3 * D * F)                                  # o, SwiGLU
    n_dec = t["num_hidden_layers"] * n_dec_layer
    lens = host["attention_mask"].sum(axis=1).astype(np.int64)
    T = int(lens.sum())
    K = int(host["loss_mask"][:, 1:].sum())
    decoder = 6 * n_dec * T
    dec_attn = t["num_hidden_layers"] * 3 * 2 * D * int(np.sum(lens * (lens + 1)))
    head = 6 * D * V * K
    # vision
    vd, vf = v["hidden_size"], v["intermediate_size"]
    patch_dim = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    n_block = vd * 3 * vd + 3 * vd + vd * vd + vd + 3 * vd * vf + 2 * vf + vd
    grid = host["image_grid_thw"]
    P = int(np.prod(grid, axis=1).sum())
    unit = v["spatial_merge_size"] ** 2
    M = P // unit
    tower = 2 * (patch_dim * vd + v["depth"] * n_block) * P
    win = v["window_size"] // v["patch_size"]
    attn_vis = 0
    for i in range(v["depth"]):
        for (tt, h, w) in grid:
            if i in v["fullatt_block_indexes"]:
                attn_vis += 4 * vd * int(tt * h * w) ** 2
            else:   # windows of win x win patches (edge windows smaller)
                hs = [min(win, h - a) for a in range(0, h, win)]
                ws = [min(win, w - a) for a in range(0, w, win)]
                attn_vis += 4 * vd * int(tt) * sum((a * b) ** 2 for a in hs for b in ws)
    wide = vd * unit
    # trained merger: forward + both gradients (fc1's input gradient feeds its trained ln_q scale)
    merger = 6 * (wide * wide + wide + wide * v["out_hidden_size"] + v["out_hidden_size"]) * M
    parts = dict(vision_tower_fwd=tower, vision_attention_fwd=attn_vis, merger=merger, decoder=decoder,
                 decoder_attention=dec_attn, lm_head=head)
    return dict(total=sum(parts.values()), parts=parts, tokens=T, response_targets=K, patches=P)


def matmul_peak(sizes=(2048, 4096), repeats: int = 5) -> dict:
    """Best fp32 GFLOP/s of a jitted square `jnp.dot` per size (the machine's practical matmul peak)."""
    import jax
    import jax.numpy as jnp
    out = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        f = jax.jit(jnp.dot)
        f(a, b).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        out[n] = 2 * n ** 3 / best / 1e9
        del a, b
    return out


# ------------------------------------------------------------------------------------------- sides
def sft_config():
    from configs import sft as sft_configs
    c = sft_configs.get_config("vlaa_thinker_3b")
    c.optim.learning_rate = LR
    c.optim.warmup_ratio = 0.0   # the preset's warm-up starts at lr 0: the first update would not move
    c.model.compute_dtype = "float32"
    c.model.remat = False
    return c


def build_ours(hf_dir: str, host: dict, batch: int) -> dict:
    import jax
    from vlaa_jax import sharding as shd
    from vlaa_jax.models import qwen2_5_vl as q
    from vlaa_jax.train import common, sft
    from vlaa_jax.train import step as step_lib

    config = sft_config()
    mesh, rules = shd.make_mesh((1, 1, 1), jax.devices()[:1]), shd.resolve_rules(config.sharding.rules)
    model = q.from_pretrained(hf_dir, dtype="float32")
    mcfg = model.config
    graphdef, params, rest = step_lib.split_model(model)
    del model
    with shd.activate(mesh, rules):
        params = jax.device_put(params, shd.tree_shardings(params, mesh, rules))
        rest = jax.device_put(rest, shd.tree_shardings(rest, mesh, rules))
    tx, _ = common.run_optimizer(config, params, total_updates=1000)
    opt_state = step_lib.init_optimizer(tx, params, mesh, rules)
    chunk = config.sft.logits_chunk
    train_step = sft.make_sft_step(config, graphdef, tx, params, rest, mesh, rules, micro_batches=1)
    raw = {k: host[k] for k in ("input_ids", "attention_mask", "loss_mask", "position_ids", "pixel_values",
                                "image_grid_thw")}
    hb, tokens = sft.host_batch([raw], mcfg, groups=shd.data_parallel_size(mesh, rules))
    device_batch = common.put_batch(hb, mesh, rules, batch_size=batch)
    return dict(step=train_step, params=params, opt_state=opt_state, rest=rest, batch=device_batch,
                tokens=tokens, chunk=chunk, target_k=int(hb["target_pos"].size))


def build_theirs(hf_dir: str, host: dict) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    model.model.visual.requires_grad_(False)
    model.model.visual.merger.requires_grad_(True)     # same trainable set as ours (VISION_FROZEN_PATTERNS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    inputs = {k: torch.from_numpy(host[k].astype("int64")) for k in
              ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "labels")}
    inputs["pixel_values"] = torch.from_numpy(host["pixel_values"])
    return dict(model=model, opt=opt, inputs=inputs, trainable=trainable,
                attn_implementation=model.config._attn_implementation,
                n_trainable=sum(p.numel() for p in trainable))


# ---------------------------------------------------------------------------------------------- run
def _log(msg: str) -> None:
    """Progress with resident memory on stderr (the JSON goes to stdout)."""
    try:
        with open("/proc/self/status") as f:
            rss = next(line.split()[1] for line in f if line.startswith("VmRSS")) + " kB"
    except (OSError, StopIteration):
        rss = "?"
    print(f"[train_step {time.strftime('%H:%M:%S')}] {msg} (rss {rss})", file=sys.stderr, flush=True)


def run_side(side: str, hf_dir: str, batch: int, steps: int) -> dict:
    """One side in this process (a child of `run_pair`): build, one warm-up step (compilation / first
    call; its loss is the initial loss), then `steps` timed steps. Returns times, losses and extras."""
    import gc

    import jax

    from tests.fixtures import hf_models
    cfg = hf_models.qwen3b_shaped_hf_config_dict()
    host = make_sft_batch(cfg, batch)
    out: dict = {"side": side, "load_1min": [round(os.getloadavg()[0], 2)]}
    if side == "ours":
        ours = build_ours(hf_dir, host, batch)
        state = {"params": ours["params"], "opt_state": ours["opt_state"]}

        def step():
            state["params"], state["opt_state"], metrics = ours["step"](state["params"], state["opt_state"],
                                                                        ours["rest"], ours["batch"])
            return float(jax.block_until_ready(metrics)["loss"])
    else:
        import torch
        theirs = build_theirs(hf_dir, host)
        model, opt = theirs["model"], theirs["opt"]
        out.update(attn_implementation=theirs["attn_implementation"], n_trainable=theirs["n_trainable"])

        def step():
            loss = model(**theirs["inputs"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs["trainable"], 1.0)
            opt.step()
            opt.zero_grad()
            model.model.rope_deltas = None
            return float(loss.detach())
    _log(f"{side} built")
    t0 = time.perf_counter()
    losses = [step()]
    out["warmup_s"] = round(time.perf_counter() - t0, 2)
    if side == "ours":   # XLA's count of the compiled step (the executable compiled above, from the cache)
        compiled = ours["step"].lower(state["params"], state["opt_state"], ours["rest"], ours["batch"]).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["xla_flops"] = float(cost.get("flops", float("nan")))
        try:
            out["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
        except Exception:  # noqa: BLE001  (not every backend reports it)
            out["temp_bytes"] = None
        del compiled
        out.update(chunk=ours["chunk"], target_k=ours["target_k"])
    times = []
    for _ in range(steps):
        gc.collect()
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        out["load_1min"].append(round(os.getloadavg()[0], 2))
        _log(f"{side} step {times[-1]:.2f} s")
    out.update(times=times, losses=losses)
    return out


def run_pair(quick: bool = False, repeats: int | None = None, batch: int | None = None) -> dict:
    """Each side runs in its own child process, one after the other and alternating (ours, theirs, ours,
    theirs, ...; `repeats` rounds, 2 timed steps per child in the full run): a side that ran in the same
    process as the other slowed down by ~20% (measured: our step 18.8 s alone, 23.1 s after one HF step
    in the same process, with both models and optimiser states resident in 24 GiB), and only one side is
    resident at a time."""
    import subprocess

    import torch
    import transformers

    from tests.fixtures import hf_models

    rounds = repeats or (1 if quick else 2)
    steps = 1 if quick else 2
    batch = batch or (1 if quick else 2)
    t_setup = time.perf_counter()
    cfg = hf_models.qwen3b_shaped_hf_config_dict()
    host = make_sft_batch(cfg, batch)
    runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
    with tempfile.TemporaryDirectory() as d:
        hf = hf_models.build_hf_model(cfg, seed=3)
        hf.save_pretrained(d, max_shard_size="800MB")
        del hf
        _log("HF checkpoint saved")
        setup_s = time.perf_counter() - t_setup
        for _ in range(rounds):
            for side in ("ours", "theirs"):
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--side", side, "--hf_dir", d,
                                       "--batch", str(batch), "--steps", str(steps)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"train_step.py --side {side} failed ({proc.returncode}):\n"
                                       f"{proc.stderr[-3000:]}")
                runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    times = {k: [t for r in v for t in r["times"]] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    first = {k: v[0] for k, v in runs.items()}
    loss0_ours, loss0_theirs = first["ours"]["losses"][0], first["theirs"]["losses"][0]
    loss1_ours, loss1_theirs = first["ours"]["losses"][1], first["theirs"]["losses"][1]

    peak = matmul_peak(repeats=3 if quick else 5)
    peak_gflops = max(peak.values())
    flops = model_flops(cfg, host)
    ours_gflops = flops["total"] / med["ours"] / 1e9
    mfu = ours_gflops / peak_gflops
    ratio = med["ours"] / med["theirs"]
    rel0 = abs(loss0_ours - loss0_theirs) / abs(loss0_theirs)
    rel1 = abs(loss1_ours - loss1_theirs) / abs(loss1_theirs)
    result = {
        "pair": PAIR,
        "metric": "SFT train step time (forward + backward + AdamW), seconds, median",
        "lower_is_better": True,
        "ours": round(med["ours"], 3),
        "theirs": round(med["theirs"], 3),
        "ratio": round(ratio, 3),
        "target": f"<= {TARGET_RATIO} and >= {TARGET_MFU:.0%} of fp32 matmul peak",
        "met": bool(ratio <= TARGET_RATIO and mfu >= TARGET_MFU),
        "peer": (f"HF transformers {transformers.__version__} Qwen2_5_VLForConditionalGeneration, torch "
                 f"{torch.__version__} eager ({first['theirs']['attn_implementation']} attention), "
                 f"torch.optim.AdamW"),
        "details": {
            "ratio_met": bool(ratio <= TARGET_RATIO), "mfu_met": bool(mfu >= TARGET_MFU),
            "mfu": round(mfu, 3), "ours_model_gflop_s": round(ours_gflops, 1),
            "matmul_peak_gflop_s": {str(k): round(v, 1) for k, v in peak.items()},
            "model_gflop": round(flops["total"] / 1e9, 1),
            "model_gflop_parts": {k: round(v / 1e9, 2) for k, v in flops["parts"].items()},
            "xla_cost_analysis_gflop": round(first["ours"]["xla_flops"] / 1e9, 1),
            "xla_temp_bytes": first["ours"]["temp_bytes"],
            "theirs_model_gflop_s": round(flops["total"] / med["theirs"] / 1e9, 1),
            "process_per_side": True, "rounds": rounds, "timed_steps_per_process": steps,
            "min_s": {k: round(min(v), 3) for k, v in times.items()},
            "mfu_at_min": round(flops["total"] / min(times["ours"]) / 1e9 / peak_gflops, 3),
            "times_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "warmup_s": {"ours_compile_and_first_step": [r["warmup_s"] for r in runs["ours"]],
                         "theirs_first_step": [r["warmup_s"] for r in runs["theirs"]]},
            "setup_s": round(setup_s, 1),
            "loss_initial": {"ours": loss0_ours, "theirs": loss0_theirs, "rel_diff": rel0},
            "loss_after_first_update": {"ours": loss1_ours, "theirs": loss1_theirs, "rel_diff": rel1},
            "losses": {k: [r["losses"] for r in v] for k, v in runs.items()},
            "same_loss": bool(rel0 < 1e-4),
            "shapes": {"batch": batch, "padded_length": int(host["input_ids"].shape[1]),
                       "tokens": flops["tokens"], "response_targets": flops["response_targets"],
                       "target_positions_padded": first["ours"]["target_k"],
                       "patches": flops["patches"], "image_hw": list(IMAGE_HW),
                       "merged_image_tokens_per_row": flops["patches"] // batch // 4,
                       "logits_chunk": first["ours"]["chunk"]},
            "trainable_params_theirs": first["theirs"]["n_trainable"],
            "threads": {"torch": torch.get_num_threads(), "cpus": os.cpu_count()},
            "loadavg_1min": {k: [r["load_1min"] for r in v] for k, v in runs.items()},
            "repeats": rounds, "quick": quick,
        },
    }
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="rows (default 2; --quick: 1)")
    p.add_argument("--side", choices=("ours", "theirs"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--hf_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:   # a child of run_pair: one side, JSON on the last stdout line
        out = run_side(a.side, a.hf_dir, a.batch or 2, a.steps)
        print(json.dumps(out), flush=True)
        return out
    t0 = time.perf_counter()
    r = run_pair(quick=a.quick, repeats=a.repeats, batch=a.batch)
    r["details"]["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(r), flush=True)
    return r


if __name__ == "__main__":
    main()
