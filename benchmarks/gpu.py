"""Qwen2.5-VL-3B at full depth on one accelerator: SFT MFU, decode vs the HBM bound, GRPO tokens/s.

    python benchmarks/gpu.py [--only sft,decode,grpo] [--attention xla|cudnn|splash] [--repeats N]
                             [--out FILE.json] [--results benchmarks/RESULTS.md] [--smoke]

Runs on `jax.devices()[0]` (a one-device mesh). The model is the architecture of the released
Qwen2.5-VL-3B-Instruct (`QWEN25_VL_3B_INSTRUCT`, its config.json: 36 decoder layers, 32 vision blocks,
tied 151,936-entry vocabulary) with random weights created directly on the device
(`vlaa_jax.sharding.create_sharded`; no checkpoint needed). Dtypes, remat and the optimiser come from
the trainer presets configs/sft.py:vlaa_thinker_3b and configs/grpo.py:vlaa_thinker_3b: compute
bfloat16, parameters (and AdamW moments) float32, remat "full".

1. sft: one real SFT step (`vlaa_jax.train.step.make_train_step` + `vlaa_jax.train.sft.sft_loss`, the
   host batch of `sft.host_batch`, the preset's AdamW and frozen vision tower) on `--sft_batch` rows,
   each: one image of `--sft_image` patches (default 32x32 = 448x448 px = 256 merged tokens), a prompt,
   a response of `--sft_response` tokens; 2,048 tokens per row by default, no padding. Reports the
   median step time, tokens/s, model FLOPs (benchmarks/flops.py `sft_step_flops`: only the work the
   loss needs: decoder forward + backward on every token with causal attention, logits only at the
   response positions, vision tower forward only, merger weights' gradients) and MFU = model FLOPs /
   step time / peak dense bf16 FLOP/s of the device; XLA's count (`cost_analysis()["flops"]` of the
   compiled step, which includes rematerialised work and counts a loop body once) beside it.
2. decode: `vlaa_jax.rollout.generate` of `--decode_prompts` prompts (image + text, 512 tokens) x
   `--decode_samples` samples, `--decode_new_tokens` tokens, no stop token (every row decodes them
   all). Decode tokens/s = rows * (N - 1) / (t(N tokens) - t(1 token)), both calls running the same
   compiled function (same cache size), so prefill cancels. Bound: rows / (bytes one step must read /
   HBM bandwidth) with the bytes of benchmarks/flops.py `decode_bytes_per_step` (all decoder weights
   + lm_head in the dtype they are stored in for decoding + the KV cache of the filled positions,
   averaged over the decode); the bound for reading the whole preallocated cache every step (what a
   dense masked attention over the cache does) is reported too.
3. grpo: one GRPO iteration built from the trainer's pieces, NOT the full trainer (no data loader,
   no reward functions: rewards are random 0/1 on the host): rollout of `--grpo_samples` responses of
   `--grpo_new_tokens` tokens for each of `--grpo_prompts` prompts (`rollout.generate`, no stop token),
   then the trainer's own `GRPOStep.train_batch` (group advantages, old-policy and reference log-probs,
   micro-batches of `--grpo_micro` rows) and `GRPOStep.update` (optimiser updates over minibatches of
   `--grpo_minibatch` rows, in micro-batches of `--grpo_micro` rows, `make_grpo_step`: the preset's
   loss, AdamW, vision trainable) on the preset config at these sizes (`grpo_config`). Reports
   response tokens generated per second per device over the whole iteration (EasyR1: 1,800 on 8xH100
   for Qwen2.5-VL-3B; target 3,600). Memory-driven departures from the 3B preset (one device holds
   everything): the reference policy is kept in the compute dtype (`--grpo_ref compute`; the forward
   casts weights to it anyway, so its log-probs are the same) and each update is one minibatch of
   `--grpo_minibatch` rows (the preset: 256 rows in 16 micro-batches).

The sampler runs the model's graph with remat "none" and its own attention back end (`decode_graphdef`,
`--decode_attention`); decoding has no backward pass, so the weights and the math are the same.
Rollout weights (`--rollout_weights`): "train" passes the training parameters as they are (float32),
as `GRPOStep.rollout` does today; "compute" decodes from a copy cast to the compute dtype (cast
once per iteration, timed), what serving engines do; the decode bound uses the dtype actually read.

Each measurement: a warm-up (compile; its time reported separately), `--repeats` timed repeats,
medians, peak device memory so far (`memory_stats()["peak_bytes_in_use"]`, cumulative over the
process: run one `--only` part per process for per-part peaks). A failing part records its error and
the others still run (exit status 1).
Peak FLOP/s and HBM bandwidth: tables of dense bf16 peaks / HBM bandwidth by `device_kind`, or
`--peak_tflops` / `--hbm_gbps`; on CPU (and unknown devices) they are measured in the same run (best
jitted square matmul in the compute dtype; best jitted reduction over a 256 MiB array).

`--smoke`: the same code paths on a tiny config (the widths of tests/fixtures/hf_models.py's tiny
model: 2 decoder layers x 64, 3 vision blocks x 32, vocabulary 512), float32, a few tokens: checks
the script end to end on CPU in well under 2 minutes. The full 3B run needs a GPU (~70 GB for grpo);
at ~10 minutes per part on an H100, run the parts separately (`--only sft`, ...).
Prints one JSON object as its last stdout line; `--out` also writes it, `--results` appends a dated
markdown section to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")   # JAX preallocates 75% by default
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import flops as flops_lib  # noqa: E402
from configs import grpo as grpo_configs  # noqa: E402
from configs import sft as sft_configs  # noqa: E402
from data_pipeline.model_inputs import PromptBatch, round_up  # noqa: E402
from vlaa_jax import rollout  # noqa: E402
from vlaa_jax import sharding as shd  # noqa: E402
from vlaa_jax.models.qwen2_5_vl import Qwen25VL, abstract_model, from_hf_dict, mrope_positions  # noqa: E402
from vlaa_jax.train import common, grpo_step, sft  # noqa: E402
from vlaa_jax.train import step as step_lib  # noqa: E402

# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) by device_kind substring, first match wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12))
HBM_BYTES_PER_S: tuple[tuple[str, float], ...] = (
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("A100-SXM4-40GB", 1.555e12),
    ("A100-PCIE-40GB", 1.555e12), ("A100", 2.039e12),
    ("TPU v6", 1.64e12), ("TPU v5p", 2.765e12), ("TPU v5", 0.819e12), ("TPU v4", 1.2e12))
TARGET_SFT_MFU = 0.50
TARGET_GRPO_TOKENS_PER_S = 3600.0
EASYR1_GRPO_TOKENS_PER_S = 1800.0     # EasyR1, Qwen2.5-VL-3B on 8xH100, per GPU (issue 10)

# config.json of Qwen/Qwen2.5-VL-3B-Instruct (released, flat transformers-4.4x layout).
QWEN25_VL_3B_INSTRUCT: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2},
}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Workload sizes (tokens per row are text tokens besides the image's merged tokens)."""
    sft_batch: int = 4
    sft_image: tuple[int, int] = (32, 32)     # patches (h, w): 448x448 px, 256 merged tokens
    sft_prompt: int = 254                     # + <|vision_start|>, <|vision_end|>, 256 image tokens
    sft_response: int = 1536                  # row = 256 + 2 + 254 + 1536 = 2048 tokens
    decode_prompts: int = 32
    decode_samples: int = 4                   # 128 rows
    decode_image: tuple[int, int] = (32, 32)
    decode_prompt: int = 254                  # prompt = 512 tokens
    decode_new_tokens: int = 512
    grpo_prompts: int = 32
    grpo_samples: int = 4                     # the preset's group size
    grpo_image: tuple[int, int] = (32, 32)
    grpo_prompt: int = 254
    grpo_new_tokens: int = 1024               # the preset's max_new_tokens
    grpo_micro: int = 8                       # rows per log-prob forward / update micro-batch (preset: 256 / 16)
    grpo_minibatch: int = 8                   # rows per optimiser update (16 would need ~76 GiB on one device)


SMOKE_SHAPES = Shapes(sft_batch=2, sft_image=(8, 8), sft_prompt=14, sft_response=32,
                      decode_prompts=2, decode_samples=2, decode_image=(8, 8), decode_prompt=14,
                      decode_new_tokens=32, grpo_prompts=2, grpo_samples=2, grpo_image=(8, 8), grpo_prompt=14,
                      grpo_new_tokens=32, grpo_micro=2, grpo_minibatch=2)


# ------------------------------------------------------------------------------------------ set-up
def model_config(smoke: bool, **run: Any):
    """The Qwen2.5-VL-3B-Instruct architecture (or, smoke, the tiny widths of tests/fixtures) + run options."""
    cfg = from_hf_dict(QWEN25_VL_3B_INSTRUCT, source="Qwen2.5-VL-3B-Instruct config.json", **run)
    if not smoke:
        return cfg
    text = dataclasses.replace(cfg.text, vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                               rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dataclasses.replace(cfg.vision, depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                                 out_hidden_size=64, fullatt_block_indexes=(1,))
    return cfg.replace(text=text, vision=vision, image_token_id=500, video_token_id=501,
                       vision_start_token_id=498, vision_end_token_id=499)


def presets():
    return sft_configs.get_config("vlaa_thinker_3b"), grpo_configs.get_config("vlaa_thinker_3b")


def one_device_mesh():
    return shd.make_mesh((1, 1, 1), devices=[jax.devices()[0]]), shd.resolve_rules("fsdp_tp")


def build_model(mcfg, mesh, rules, seed: int = 0):
    """(graphdef, params, rest) with random weights initialised directly on the device."""
    graphdef, state = shd.create_sharded(lambda: Qwen25VL(mcfg, rngs=nnx.Rngs(seed)), mesh, rules)
    params, rest = step_lib.split_state(state)
    return graphdef, params, rest


def take_model(ctx: dict):
    """(graphdef, params, rest): the run's one randomly initialised model (its jitted init compiles
    once), handed from part to part (SFT hands on its updated weights: random weights all the same);
    built again when a failed part left its arrays donated."""
    model = ctx["shared"].pop("model", None)
    if model is None or any(x.is_deleted() for x in jax.tree.leaves(model[1])):
        model = None
        gc.collect()
        model = build_model(ctx["mcfg"], ctx["mesh"], ctx["rules"])
    return model


def hand_on(ctx: dict, graphdef, params, rest) -> None:
    ctx["shared"]["model"] = (graphdef, params, rest)


@functools.lru_cache(maxsize=4)
def decode_graphdef(mcfg, attention_impl: str | None = None):
    """Graph definition the sampler runs: the same model with remat_policy "none" (decoding has no
    backward pass; the text model skips remat with a KV cache anyway) and `attention_impl` (default: the
    model's), so decode can use another attention back end than training."""
    return abstract_model(mcfg.replace(remat_policy="none", attention_impl=attention_impl or mcfg.attention_impl))[0]


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def cast_floating(tree, dtype):
    """A copy of `tree` with floating leaves in `dtype` (jitted: placement and sharding are kept)."""
    return jax.jit(lambda t: jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, t))(tree)


# ------------------------------------------------------------------------------------ host batches
def _text_id_range(mcfg) -> tuple[int, int]:
    """Ordinary token ids: below every special id of the config."""
    t = mcfg.text
    eos = t.eos_token_id if isinstance(t.eos_token_id, tuple) else (t.eos_token_id,)
    special = [mcfg.image_token_id, mcfg.video_token_id, mcfg.vision_start_token_id, mcfg.vision_end_token_id,
               t.bos_token_id, *eos, t.pad_token_id]
    high = min([t.vocab_size] + [s for s in special if s is not None and s > 16])
    return 3, high


def image_row(mcfg, rng, grid_hw: tuple[int, int], text_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], patches [h*w, patch_dim]): <|vision_start|> <|image_pad|>*k <|vision_end|> + random text."""
    h, w = grid_hw
    k = h * w // mcfg.vision.spatial_merge_size ** 2
    low, high = _text_id_range(mcfg)
    ids = np.concatenate([[mcfg.vision_start_token_id], np.full(k, mcfg.image_token_id),
                          [mcfg.vision_end_token_id], rng.integers(low, high, text_tokens)]).astype(np.int32)
    patches = rng.standard_normal((h * w, mcfg.vision.patch_dim)).astype(np.float32)
    return ids, patches


def sft_host_batch(mcfg, shapes: Shapes, rng) -> tuple[dict, int]:
    """A loader-shaped SFT batch (right-aligned rows of equal length, loss on the response) through
    `sft.host_batch`, the trainer's host path. Returns (arrays, response tokens)."""
    B, (h, w) = shapes.sft_batch, shapes.sft_image
    low, high = _text_id_range(mcfg)
    rows, patches = [], []
    for _ in range(B):
        ids, pv = image_row(mcfg, rng, (h, w), shapes.sft_prompt)
        rows.append(np.concatenate([ids, rng.integers(low, high, shapes.sft_response).astype(np.int32)]))
        patches.append(pv)
    ids = np.stack(rows)
    L = ids.shape[1]
    mask = np.ones_like(ids)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, L - shapes.sft_response:] = 1
    grid = np.tile(np.array([[1, h, w]], np.int64), (B, 1))
    pos, _ = mrope_positions(ids, grid, mask, spatial_merge_size=mcfg.vision.spatial_merge_size,
                             image_token_id=mcfg.image_token_id, vision_start_token_id=mcfg.vision_start_token_id)
    pv = np.concatenate(patches)
    P = round_up(len(pv), 64)
    pv = np.pad(pv, [(0, P - len(pv)), (0, 0)])
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=pos, loss_mask=loss_mask, pixel_values=pv,
                 image_grid_thw=grid)
    return sft.host_batch([batch], mcfg, groups=1)   # one device: the trainer's data-parallel size


def synthetic_prompts(mcfg, rng, num: int, grid_hw: tuple[int, int], text_tokens: int) -> PromptBatch:
    """The `PromptBatch` (the trainer's host prompts) of `num` image prompts of equal length; its pixel
    budget is their image's size, so the pixel buckets fit them exactly."""
    rows = [image_row(mcfg, rng, grid_hw, text_tokens) for _ in range(num)]
    ids = np.stack([r[0] for r in rows])
    mask = np.ones_like(ids)
    grids = np.tile(np.array([[1, *grid_hw]], np.int64), (num, 1))
    pos, deltas = mrope_positions(ids, grids, mask, spatial_merge_size=mcfg.vision.spatial_merge_size,
                                  image_token_id=mcfg.image_token_id,
                                  vision_start_token_id=mcfg.vision_start_token_id)
    px = (grid_hw[0] * mcfg.vision.patch_size, grid_hw[1] * mcfg.vision.patch_size)
    return PromptBatch(input_ids=ids, attention_mask=mask, position_ids=pos, rope_deltas=deltas,
                       patches=tuple(r[1] for r in rows), grids=grids,
                       records=tuple({"id": str(i)} for i in range(num)), image_hw=((px, px),) * num,
                       max_pixels=px[0] * px[1])


# ----------------------------------------------------------------------------------------- device
def device_info() -> dict[str, Any]:
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "python": platform.python_version(),
            "environment": jax.print_environment_info(return_string=True)}


def _lookup(table, kind: str) -> tuple[str, float] | None:
    return next(((k, v) for k, v in table if k.lower() in kind.lower()), None)


def measure_matmul_flops(dtype, n: int = 2048, repeats: int = 3) -> float:
    """Best FLOP/s of a jitted square matmul in `dtype` (the machine's practical peak)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    best = min(_time(lambda: jax.block_until_ready(f(a, a))) for _ in range(repeats))
    return 2 * n ** 3 / best


def measure_bandwidth(nbytes: int = 256 * 2 ** 20, repeats: int = 5) -> float:
    """Best bytes/s of a jitted reduction over an array of `nbytes` (reads it once)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    jax.block_until_ready(f(x))
    return nbytes / min(_time(lambda: jax.block_until_ready(f(x))) for _ in range(repeats))


def hardware_peaks(args, compute_dtype) -> dict[str, Any]:
    kind = jax.devices()[0].device_kind
    out: dict[str, Any] = {}
    row = _lookup(PEAK_BF16_FLOPS, kind) if jax.default_backend() != "cpu" else None
    if args.peak_tflops:
        out["peak_flops"], out["peak_flops_source"] = args.peak_tflops * 1e12, "--peak_tflops"
    elif row and jnp.dtype(compute_dtype) == jnp.bfloat16:
        out["peak_flops"], out["peak_flops_source"] = row[1], f"dense bf16 table: {row[0]}"
    else:
        out["peak_flops"] = measure_matmul_flops(compute_dtype, 2048 if jax.default_backend() == "cpu" else 8192)
        out["peak_flops_source"] = f"measured: best jitted {jnp.dtype(compute_dtype).name} square matmul"
    row = _lookup(HBM_BYTES_PER_S, kind) if jax.default_backend() != "cpu" else None
    if args.hbm_gbps:
        out["hbm_bytes_per_s"], out["hbm_source"] = args.hbm_gbps * 1e9, "--hbm_gbps"
    elif row:
        out["hbm_bytes_per_s"], out["hbm_source"] = row[1], f"table: {row[0]}"
    else:
        out["hbm_bytes_per_s"] = measure_bandwidth()
        out["hbm_source"] = "measured: best jitted reduction over 256 MiB"
    return out


def peak_memory() -> dict[str, Any]:
    stats = jax.devices()[0].memory_stats() or {}
    return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def _time(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- not every back end implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    return None if value is None else float(value)


def _memory_analysis(compiled) -> dict[str, int]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if m is not None and hasattr(m, k)}


def _summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "times_s": [round(t, 6) for t in times]}


# ----------------------------------------------------------------------------------- measurements
def measure_sft(ctx: dict) -> dict[str, Any]:
    """One SFT train step: step time, tokens/s, model FLOPs, MFU."""
    mcfg, shapes, mesh, rules, repeats = ctx["mcfg"], ctx["shapes"], ctx["mesh"], ctx["rules"], ctx["repeats"]
    sft_cfg = ctx["sft_preset"]
    graphdef, params, rest = take_model(ctx)
    tx, _ = common.run_optimizer(sft_cfg, params, total_updates=1000)
    opt_state = step_lib.init_optimizer(tx, params, mesh, rules)
    chunk = sft_cfg.sft.logits_chunk
    train_step = sft.make_sft_step(sft_cfg, graphdef, tx, params, rest, mesh, rules, micro_batches=1)
    host, response_tokens = sft_host_batch(mcfg, shapes, np.random.default_rng(0))
    B, L = host["input_ids"].shape
    batch = common.put_batch(host, mesh, rules, batch_size=B)
    t = time.perf_counter()
    compiled = train_step.lower(params, opt_state, rest, batch).compile()
    compile_s = time.perf_counter() - t

    def run():
        nonlocal params, opt_state
        params, opt_state, metrics = compiled(params, opt_state, rest, batch)
        jax.block_until_ready((params, opt_state, metrics))
        return metrics

    first_s = _time(run)
    times, losses = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        metrics = run()
        times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
    step_s = statistics.median(times)
    h, w = shapes.sft_image
    f = flops_lib.sft_step_flops(mcfg, batch=B, image_patches=h * w, image_grid=(h, w), text_tokens=L,
                                 response_tokens=shapes.sft_response, frozen_vision=bool(sft_cfg.model.freeze_vision))
    hand_on(ctx, graphdef, params, rest)
    xla = _cost_flops(compiled)
    peak = ctx["peaks"]["peak_flops"]
    return {
        "what": "SFT train step: forward + backward + AdamW (configs/sft.py:vlaa_thinker_3b optimiser, frozen "
                "vision tower), make_train_step + sft_loss",
        "shapes": {"rows": B, "tokens_per_row": L, "image_patches": h * w, "image_tokens": h * w // 4,
                   "prompt_text_tokens": shapes.sft_prompt, "response_tokens": shapes.sft_response,
                   "response_targets": int(response_tokens), "logits_chunk": chunk},
        "compile_s": compile_s, "first_step_s": first_s, **_summary(times),
        "step_time_s": step_s,
        "tokens_per_s": B * L / step_s,
        "response_tokens_per_s": B * shapes.sft_response / step_s,
        "model_flops": f["model_flops"], "model_flops_parts": {k: v for k, v in f.items() if k.endswith("_flops")},
        "xla_cost_analysis_flops": xla,
        "mfu": f["model_flops"] / step_s / peak,
        "xla_flops_utilization": None if xla is None else xla / step_s / peak,
        "target_mfu": TARGET_SFT_MFU, "met": f["model_flops"] / step_s / peak >= TARGET_SFT_MFU,
        "losses": losses, "compiled_memory": _memory_analysis(compiled), "device_memory": peak_memory(),
    }


def measure_decode(ctx: dict) -> dict[str, Any]:
    """Decode tokens/s of rollout.generate vs the HBM-bandwidth bound."""
    mcfg, shapes, mesh, rules, repeats = ctx["mcfg"], ctx["shapes"], ctx["mesh"], ctx["rules"], ctx["repeats"]
    graphdef, train_params, rest = take_model(ctx)
    hand_on(ctx, graphdef, train_params, rest)
    params = cast_floating(train_params, mcfg.jnp_dtype) if ctx["rollout_weights"] == "compute" else train_params
    prompts = synthetic_prompts(mcfg, np.random.default_rng(1), shapes.decode_prompts, shapes.decode_image,
                                shapes.decode_prompt)
    idx = np.arange(len(prompts))
    fields = prompts.rows(idx, mcfg, prompts.group_shape(idx, 1, mcfg))   # one device: one image group
    n, N = shapes.decode_samples, shapes.decode_new_tokens
    R = len(prompts) * n
    temperature = float(ctx["grpo_preset"].grpo.temperature)

    sampler_graphdef = decode_graphdef(mcfg, ctx["decode_attention"])

    def gen(max_new):
        return rollout.generate(sampler_graphdef, (params, rest), fields, max_new_tokens=max_new, num_samples=n,
                                sampling=rollout.SamplingConfig(temperature=temperature), rng=0, stop_ids=(),
                                pad_id=ctx["pad_id"], mesh=mesh, rules=rules, new_token_buckets=(N,))

    first_s = _time(lambda: gen(N))          # compiles (the 1-token call below reuses the executable)
    t_full, t_one = [], []
    out = None
    for _ in range(max(repeats, 3)):          # cheap next to the compile; a difference of medians needs a few
        t = time.perf_counter()
        out = gen(N)
        t_full.append(time.perf_counter() - t)
        t_one.append(_time(lambda: gen(1)))
    decode_s = statistics.median(t_full) - statistics.median(t_one)
    if decode_s <= 0:
        raise ValueError(f"decode time not measurable: t({N} tokens) {statistics.median(t_full):.4g} s <= t(1 token) "
                         f"{statistics.median(t_one):.4g} s; raise --decode_new_tokens or --repeats")
    tokens_per_s = R * (N - 1) / max(decode_s, 1e-9)
    prompt_len, cache_len = fields["input_ids"].shape[1], fields["input_ids"].shape[1] + N
    wbytes = max(x.dtype.itemsize for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))
    kvbytes = mcfg.jnp_dtype.itemsize
    hbm = ctx["peaks"]["hbm_bytes_per_s"]
    avg_context = prompt_len + N / 2
    ideal = flops_lib.decode_bytes_per_step(mcfg, batch=R, context_len=avg_context, weight_bytes=wbytes,
                                            kv_bytes=kvbytes)
    bound = flops_lib.decode_bound_tokens_per_s(mcfg, batch=R, context_len=avg_context, hbm_bytes_per_s=hbm,
                                                weight_bytes=wbytes, kv_bytes=kvbytes)
    bound_full = flops_lib.decode_bound_tokens_per_s(mcfg, batch=R, context_len=cache_len, hbm_bytes_per_s=hbm,
                                                     weight_bytes=wbytes, kv_bytes=kvbytes)
    return {
        "what": "rollout.generate decode steps (prefill cancelled: t(N tokens) - t(1 token), same executable)",
        "shapes": {"prompts": len(prompts), "samples_per_prompt": n, "rows": R, "prompt_tokens": int(prompt_len),
                   "new_tokens": N, "cache_slots": int(cache_len), "sampling_temperature": temperature},
        "rollout_weights": ctx["rollout_weights"], "attention": ctx["decode_attention"] or mcfg.attention_impl,
        "weight_bytes_per_param": wbytes, "kv_bytes_per_value": kvbytes,
        "compile_and_first_call_s": first_s,
        "generate_n_s": _summary(t_full), "generate_1_s": _summary(t_one),
        "decode_s": decode_s, "step_ms": 1e3 * decode_s / max(N - 1, 1),
        "tokens_per_s": tokens_per_s,
        "bytes_per_step": ideal,
        "bound_tokens_per_s": bound, "fraction_of_bound": tokens_per_s / bound,
        "bound_full_cache_tokens_per_s": bound_full, "fraction_of_full_cache_bound": tokens_per_s / bound_full,
        "all_rows_full_length": bool((out.lengths == N).all()),
        "device_memory": peak_memory(),
    }


def grpo_config(preset: Any, shapes: Shapes, *, use_ref: bool) -> Any:
    """The GRPO preset at the benchmark's sizes: one rollout batch of `grpo_prompts` x `grpo_samples`
    responses of `grpo_new_tokens` tokens, one generate call; optimiser updates of `grpo_minibatch` rows
    in micro-batches of `grpo_micro` rows (the log-prob forwards' rows too); beta 0 without reference."""
    if shapes.grpo_minibatch % shapes.grpo_micro or (shapes.grpo_prompts * shapes.grpo_samples) % shapes.grpo_minibatch:
        raise ValueError(f"--grpo_micro {shapes.grpo_micro} must divide --grpo_minibatch {shapes.grpo_minibatch}, "
                         f"which must divide the {shapes.grpo_prompts} x {shapes.grpo_samples} rollout rows")
    c = preset.copy_and_resolve_references()
    with c.unlocked():
        g = c.grpo
        g.rollout_batch_prompts, g.num_samples = shapes.grpo_prompts, shapes.grpo_samples
        g.max_new_tokens, g.rollout_micro_batch = shapes.grpo_new_tokens, 0
        c.train.batch_size, c.train.grad_accum_steps = shapes.grpo_minibatch, shapes.grpo_minibatch // shapes.grpo_micro
        if not use_ref:
            g.init_kl_coef = 0.0
    return c


def measure_grpo(ctx: dict) -> dict[str, Any]:
    """One GRPO iteration from the trainer's pieces: rollout, log-probs, updates."""
    mcfg, shapes, mesh, rules, repeats = ctx["mcfg"], ctx["shapes"], ctx["mesh"], ctx["rules"], ctx["repeats"]
    cfg = grpo_config(ctx["grpo_preset"], shapes, use_ref=ctx["grpo_ref"] != "none")
    settings = grpo_step.GRPOSettings.from_config(cfg)
    graphdef, params, rest = take_model(ctx)
    tx, _ = common.run_optimizer(cfg, params, total_updates=1000)
    opt_state = step_lib.init_optimizer(tx, params, mesh, rules)
    # The rollout (its own generate call) and the rewards (random) are the benchmark's: no tokenizer, no reward.
    step = grpo_step.GRPOStep(settings, graphdef, rest, mcfg, mesh, rules, stop_ids=(), pad_id=ctx["pad_id"],
                              train_step=grpo_step.make_grpo_step(cfg, graphdef, tx, params, rest, mesh, rules))
    ref_params = None
    if settings.use_ref:
        ref_dtype = jnp.dtype(mcfg.jnp_dtype).name if ctx["grpo_ref"] == "compute" else "param"
        ref_params = grpo_step.reference_params(params, ref_dtype)
    prompts = synthetic_prompts(mcfg, np.random.default_rng(2), shapes.grpo_prompts, shapes.grpo_image,
                                shapes.grpo_prompt)
    n, N = settings.num_samples, settings.max_new_tokens
    prompt_fields = step.rollout_batches(prompts)[0]     # grpo.rollout_micro_batch 0: one generate call
    host_rng = np.random.default_rng(3)
    sampler_graphdef = decode_graphdef(mcfg, ctx["decode_attention"])

    def iteration(seed: int) -> dict[str, float]:
        nonlocal params, opt_state
        t0 = time.perf_counter()
        weights = cast_floating(params, mcfg.jnp_dtype) if ctx["rollout_weights"] == "compute" else params
        gen = rollout.generate(sampler_graphdef, (weights, rest), prompt_fields, max_new_tokens=N, num_samples=n,
                               sampling=rollout.SamplingConfig(temperature=settings.temperature, top_p=settings.top_p),
                               rng=seed, stop_ids=(), pad_id=ctx["pad_id"], mesh=mesh, rules=rules,
                               new_token_buckets=(N,))
        del weights
        t1 = time.perf_counter()
        rows = len(prompts) * n
        sampled = grpo_step.Rollout(prompts, np.repeat(np.arange(len(prompts)), n), gen.tokens, gen.mask,
                                    gen.logprobs, ("",) * rows,   # texts: not decoded, the rewards are random
                                    rollout.static_stats(gen.lengths, [rows], t1 - t0))
        rewards = host_rng.integers(0, 2, rows).astype(np.float32)    # stand-in for the reward functions
        batch = step.train_batch(grpo_step.ScoredRollout(sampled, rewards, {}), params, ref_params,
                                 float(cfg.grpo.init_kl_coef))
        t2 = time.perf_counter()
        params, opt_state, result = step.update(params, opt_state, batch, jax.random.key(seed))
        t3 = time.perf_counter()
        return {"iteration_s": t3 - t0, "rollout_s": t1 - t0, "logprobs_s": t2 - t1, "update_s": t3 - t2,
                "response_tokens": int(sampled.mask.sum()), "updates": settings.updates_per_step,
                "loss": result.metrics["loss"]}

    first = iteration(0)                       # compiles generate, the log-prob forward and the step
    runs = [iteration(1 + i) for i in range(repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("iteration_s", "rollout_s", "logprobs_s", "update_s")}
    resp = statistics.median(r["response_tokens"] for r in runs)
    per_device = resp / med["iteration_s"] / len(mesh.devices.flat)
    return {
        "what": "one GRPO iteration built from the trainer's pieces (rollout.generate, GRPOStep.train_batch and "
                "GRPOStep.update; random 0/1 rewards), not the full GRPOTrainer",
        "shapes": {"prompts": len(prompts), "samples_per_prompt": n, "rows": len(prompts) * n,
                   "prompt_tokens": int(prompt_fields["input_ids"].shape[1]), "new_tokens": N,
                   "logprob_micro_rows": settings.micro, "update_minibatch_rows": settings.batch_size,
                   "updates_per_iteration": runs[0]["updates"] if runs else first["updates"]},
        "rollout_weights": ctx["rollout_weights"], "rollout_attention": ctx["decode_attention"] or mcfg.attention_impl,
        "reference": ctx["grpo_ref"] if settings.use_ref else "none",
        "first_iteration_s": first["iteration_s"], "first_iteration": first,
        "iterations": runs, **{f"median_{k}": v for k, v in med.items()},
        "response_tokens_per_iteration": resp,
        "response_tokens_per_s_per_device": per_device,
        "rollout_response_tokens_per_s": resp / med["rollout_s"],
        "target_response_tokens_per_s_per_device": TARGET_GRPO_TOKENS_PER_S,
        "easyr1_response_tokens_per_s_per_gpu": EASYR1_GRPO_TOKENS_PER_S,
        "met": per_device >= TARGET_GRPO_TOKENS_PER_S,
        "device_memory": peak_memory(),
    }


MEASUREMENTS: dict[str, Callable[[dict], dict]] = {"sft": measure_sft, "decode": measure_decode,
                                                   "grpo": measure_grpo}


# ------------------------------------------------------------------------------------------ results
def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def markdown_section(result: dict) -> str:
    d, m = result["device"], result["model"]
    lines = [f"## {result['date']} · {d['device_kind']} ({d['platform']}) · jax {d['jax']}"
             + (" · SMOKE (tiny config)" if result["smoke"] else ""), "",
             f"Command: `{result['command']}`  ",
             f"Model: {m['name']}: {m['text_layers']} decoder layers, {m['vision_blocks']} vision blocks, "
             f"{m['params'] / 1e9:.3f} B parameters, random weights; compute {m['dtype']}, parameters "
             f"{m['param_dtype']}, remat {m['remat_policy']}, attention {m['attention_impl']}.  ",
             f"Peak: {result['peaks']['peak_flops'] / 1e12:.1f} TFLOP/s ({result['peaks']['peak_flops_source']}); "
             f"HBM {result['peaks']['hbm_bytes_per_s'] / 1e9:,.0f} GB/s ({result['peaks']['hbm_source']}).", "",
             "| measurement | figure | target | met |", "|---|---|---|---|"]
    s = result.get("sft")
    if s and "error" not in s:
        sh = s["shapes"]
        lines += [
            f"| SFT step ({sh['rows']} rows x {sh['tokens_per_row']} tokens: {sh['image_tokens']}-token image, "
            f"{sh['response_tokens']} response) | {_fmt(s['step_time_s'])} s, {_fmt(s['tokens_per_s'])} tokens/s "
            f"(compile {_fmt(s['compile_s'])} s) | | |",
            f"| SFT MFU (model FLOPs {s['model_flops']:.3g} / step / peak) | {_fmt(s['mfu'])} | >= {TARGET_SFT_MFU} | "
            f"{'yes' if s['met'] else 'no'} |",
            f"| SFT XLA cost-analysis FLOPs / step / peak | {_fmt(s['xla_flops_utilization'])} | | |"]
    c = result.get("decode")
    if c and "error" not in c:
        sh = c["shapes"]
        lines += [
            f"| Decode ({sh['rows']} rows, {sh['prompt_tokens']}-token prompts, {sh['new_tokens']} new tokens, "
            f"{c['rollout_weights']} weights) | {_fmt(c['tokens_per_s'])} tokens/s ({_fmt(c['step_ms'])} ms/step) "
            "| | |",
            f"| Decode / HBM bound ({_fmt(c['bound_tokens_per_s'])} tokens/s) | {_fmt(c['fraction_of_bound'])} | | |"]
    r = result.get("grpo")
    if r and "error" not in r:
        sh = r["shapes"]
        lines += [
            f"| GRPO iteration ({sh['prompts']} prompts x {sh['samples_per_prompt']}, {sh['new_tokens']} new "
            f"tokens; rollout {_fmt(r['median_rollout_s'])} s, log-probs {_fmt(r['median_logprobs_s'])} s, "
            f"update {_fmt(r['median_update_s'])} s) | {_fmt(r['median_iteration_s'])} s | | |",
            f"| GRPO response tokens/s/device (EasyR1: {EASYR1_GRPO_TOKENS_PER_S:,.0f} on 8xH100) | "
            f"{_fmt(r['response_tokens_per_s_per_device'])} | >= {TARGET_GRPO_TOKENS_PER_S:,.0f} | "
            f"{'yes' if r['met'] else 'no'} |"]
    for name in MEASUREMENTS:
        if name in result and "error" in result[name]:
            lines.append(f"| {name} | error: {result[name]['error'].splitlines()[0][:200]} | | |")
    mem = result.get("device_memory", {})
    if "peak_bytes_in_use" in mem:
        lines += ["", f"Peak device memory: {mem['peak_bytes_in_use'] / 2 ** 30:.1f} GiB"
                  + (f" of {mem['bytes_limit'] / 2 ** 30:.1f} GiB" if "bytes_limit" in mem else "") + "."]
    return "\n".join(lines) + "\n"


def append_results(path: str, result: dict) -> None:
    with open(path, "a") as f:
        f.write("\n" + markdown_section(result))


# --------------------------------------------------------------------------------------------- main
def _grid_arg(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW in patches, e.g. 32x32, got {text!r}") from None
    if h <= 0 or w <= 0 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"image grid {text!r}: sides must be positive and even (2x2 merge)")
    return h, w


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny config, float32, few tokens (CPU check)")
    p.add_argument("--only", default="sft,decode,grpo", help="comma-separated parts: sft, decode, grpo")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; smoke 2; grpo 2)")
    p.add_argument("--attention", choices=("xla", "cudnn", "splash"), default=None,
                   help="attention implementation (default cudnn on GPU, else xla)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: preset's bfloat16; smoke float32)")
    p.add_argument("--param_dtype", default=None, help="parameter dtype (default: preset's float32)")
    p.add_argument("--remat", choices=("none", "full", "save_dots"), default=None, help="default: preset's full")
    p.add_argument("--rollout_weights", choices=("train", "compute"), default="train",
                   help="decode from the training params as they are (trainer today) or a compute-dtype copy")
    p.add_argument("--decode_attention", choices=("xla", "cudnn", "splash"), default=None,
                   help="attention implementation of the sampler (decode and GRPO rollouts, prefill included; "
                        "default --attention). xla materialises the vision tower's full-attention scores over all "
                        "patches of the prompt batch (64 GiB for 32 prompts of 1,024 patches)")
    p.add_argument("--grpo_ref", choices=("compute", "param", "none"), default="compute",
                   help="reference policy storage dtype (none: no KL term)")
    p.add_argument("--peak_tflops", type=float, default=None, help="override the peak dense FLOP/s (TFLOP/s)")
    p.add_argument("--hbm_gbps", type=float, default=None, help="override the HBM bandwidth (GB/s)")
    for field in dataclasses.fields(Shapes):
        default = getattr(Shapes(), field.name)
        if isinstance(default, tuple):
            p.add_argument(f"--{field.name}", type=_grid_arg, default=None,
                           help=f"image patches HxW, default {default[0]}x{default[1]} (14-pixel patches, even sides)")
        else:
            p.add_argument(f"--{field.name}", type=int, default=None, help=f"default {default}")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--results", default=None, help="append a markdown section to this file")
    return p.parse_args(argv)


def run(argv=None) -> dict[str, Any]:
    """Runs the benchmark (argv as on the command line); returns the result dict."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(MEASUREMENTS))
    if unknown:
        raise SystemExit(f"--only: unknown parts {unknown}; choose from {sorted(MEASUREMENTS)}")
    sft_preset, grpo_preset = presets()
    on_gpu = jax.default_backend() == "gpu"
    run_options = dict(
        dtype=args.dtype or ("float32" if args.smoke else sft_preset.model.compute_dtype),
        param_dtype=args.param_dtype or sft_preset.model.param_dtype,
        remat_policy=args.remat or ("full" if sft_preset.model.remat else "none"),
        attention_impl=args.attention or ("cudnn" if on_gpu else "xla"))
    mcfg = model_config(args.smoke, **run_options)
    base = SMOKE_SHAPES if args.smoke else Shapes()
    shapes = dataclasses.replace(base, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Shapes)
                                          if getattr(args, f.name, None) is not None})
    mesh, rules = one_device_mesh()
    peaks = hardware_peaks(args, mcfg.jnp_dtype)
    abstract_params = _abstract_params(mcfg)
    result: dict[str, Any] = {
        "benchmark": "gpu", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "smoke": bool(args.smoke), "device": device_info(), "peaks": peaks,
        "model": {"name": "Qwen2.5-VL-3B-Instruct architecture" + (" (smoke: tiny widths)" if args.smoke else ""),
                  "text_layers": mcfg.text.num_hidden_layers, "vision_blocks": mcfg.vision.depth,
                  "params": param_count(abstract_params), "vision_params": param_count(abstract_params["visual"]),
                  **run_options},
        "shapes": dataclasses.asdict(shapes), "loadavg": list(os.getloadavg()),
    }
    text_pad = mcfg.text.pad_token_id
    ctx = dict(shared={}, mcfg=mcfg, shapes=shapes, mesh=mesh, rules=rules, peaks=peaks, sft_preset=sft_preset,
               grpo_preset=grpo_preset, rollout_weights=args.rollout_weights, grpo_ref=args.grpo_ref,
               decode_attention=args.decode_attention,
               pad_id=151643 if text_pad is None else int(text_pad))
    failed = False
    for name in parts:
        repeats = args.repeats or (2 if args.smoke or name == "grpo" else 5)
        t = time.perf_counter()
        try:
            result[name] = MEASUREMENTS[name](dict(ctx, repeats=repeats))
        except Exception as e:  # noqa: BLE001 -- record the failure, run the other parts
            failed = True
            result[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
        result[name]["wall_s"] = time.perf_counter() - t
        print(json.dumps({name: _short(result[name])}, default=str), flush=True)
        gc.collect()
    ctx["shared"].clear()
    result["device_memory"] = peak_memory()
    result["wall_s"] = time.perf_counter() - t_start
    result["failed"] = failed
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if args.results:
        append_results(args.results, result)
    return result


def _abstract_params(mcfg):
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Qwen25VL(mcfg, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def _short(part: dict) -> dict:
    keys = ("error", "step_time_s", "tokens_per_s", "mfu", "fraction_of_bound", "bound_tokens_per_s",
            "median_iteration_s", "response_tokens_per_s_per_device", "met", "wall_s")
    return {k: part[k] for k in keys if k in part}


def main(argv=None) -> int:
    result = run(argv)
    print(json.dumps(result, default=str))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
