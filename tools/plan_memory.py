"""Per-device memory of every phase of a training step, before paying for a pod.

    python tools/plan_memory.py --config configs/grpo.py:vlaa_thinker_3b --mesh 1,8,1 --device_memory 80GiB,32GiB
    python tools/plan_memory.py --config configs/grpo.py:vlaa_thinker_7b --mesh 1,16,1 --xla
    python tools/plan_memory.py --config configs/sft.py:vlaa_thinker_3b --mesh 1,8,1 --set train.grad_accum_steps=16
    python tools/plan_memory.py --model 3b --mesh 1,8,1 --rows 8 --seq_len 4096 --json

With a trainer config (`--config`, `--set key=value` overrides): every phase of its step as the
trainer runs it (tools/phase_programs.py builds the same programs): a GRPO step's rollout (one generate
call of `grpo.rollout_micro_batch` prompts: prefill with the images, KV cache, decode loop), old-policy
and reference log-prob forwards and update (`grad_accum_steps` micro-batches), or an SFT step. Per
phase and device: the program's arguments, its temporaries and the resident state beside it
(parameters, Adam moments, the `grpo.ref_dtype` reference copy); the peak phase; with
`--device_memory`, the `train.grad_accum_steps` / `grpo.rollout_micro_batch` that fit; with `--xla`,
XLA's own figures of the compiled phases on simulated CPU devices beside the estimate. The estimate's
buffers are those of XLA's buffer assignment of these programs (see "Phases" below and docs/scaling.md).

With `--model` / `--hf_config`: one update micro-batch by component (parameters, gradients, optimizer
state, reference, activations: the residuals `jax.vjp` keeps, from `jax.eval_shape`, largest
attention scores) and analytic FLOPs, for shapes given on the command line (`--rows`, `--seq_len`, ...).

Nothing is allocated: shapes come from `nnx.eval_shape` / `jax.eval_shape`, per-device sizes from the
sharding rules (vlaa_jax/sharding/) on an abstract mesh.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402

from tools import phase_programs as pp  # noqa: E402
from vlaa_jax import sharding as shd  # noqa: E402
from vlaa_jax.models.qwen2_5_vl import (  # noqa: E402
    Qwen25VL, Qwen25VLConfig, TextConfig, VisionConfig, from_hf_dict, layout, load_config)
from vlaa_jax.rewards.mixed import RewardConfig  # noqa: E402
from vlaa_jax.rl.logprobs import head_vocab_blocks  # noqa: E402
from vlaa_jax.train import common  # noqa: E402
from vlaa_jax.train import optim as optim_lib  # noqa: E402

GiB = 1024 ** 3
LAYOUT_KEYS = ("window_index", "reverse_index", "window_segments", "full_segments", "rotary_hw",
               "num_patches")


# --------------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------------

def _qwen2_vl(hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, tied: bool,
              **run_options: Any):
    """A Qwen2-VL-2B / 7B-Instruct architecture (released config.json values; the family from its
    model_type, config.FAMILIES)."""
    return from_hf_dict({
        "model_type": "qwen2_vl", "tie_word_embeddings": tied,
        "text_config": {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
                        "num_hidden_layers": 28, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                        "max_position_embeddings": 32768, "rope_parameters": {
                            "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": hidden, "mlp_ratio": 4, "num_heads": 16},
    }, source=f"built-in Qwen2-VL ({hidden} wide)", **run_options)


# name -> (hidden, intermediate, heads, KV heads, vocab, tied embeddings)
BUILTIN_QWEN2_VL = {"qwen2_vl_2b": (1536, 8960, 12, 2, 151936, True),
                    "qwen2_vl_7b": (3584, 18944, 28, 4, 152064, False)}


def builtin_config(size: str, **run_options: Any):
    """Qwen2.5-VL-3B / 7B-Instruct (`3b`, `7b`) or Qwen2-VL-2B / 7B-Instruct (`qwen2_vl_2b`, `qwen2_vl_7b`)
    architectures (their released config.json values)."""
    if size.lower() in BUILTIN_QWEN2_VL:
        return _qwen2_vl(*BUILTIN_QWEN2_VL[size.lower()], **run_options)
    size = size.lower().rstrip("b")
    if size == "3":
        return Qwen25VLConfig(text=TextConfig(), vision=VisionConfig(), tie_word_embeddings=True,
                              **run_options)
    if size == "7":
        text = TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                          num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
        return Qwen25VLConfig(text=text, vision=VisionConfig(out_hidden_size=3584),
                              tie_word_embeddings=False, **run_options)
    raise ValueError(f"--model {size!r}: built-in shapes are '3b' and '7b' (Qwen2.5-VL), "
                     f"{' and '.join(repr(k) for k in BUILTIN_QWEN2_VL)}")


def _tiny_config(tiny: Any, **run_options: Any):
    """Qwen25VLConfig from the trainer config's `model.tiny` dict (configs/base.py TINY_MODEL)."""
    t = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(tiny).items()}
    text_fields = {f.name for f in dataclasses.fields(TextConfig)}
    vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
    text = TextConfig(**{k: v for k, v in t.items() if k in text_fields})   # init-only keys ignored
    vis = {k[len("vision_"):]: v for k, v in t.items()
           if k.startswith("vision_") and k[len("vision_"):] in vision_fields}
    vision = VisionConfig(out_hidden_size=text.hidden_size, **vis)
    return Qwen25VLConfig(text=text, vision=vision,
                          tie_word_embeddings=bool(t.get("tie_word_embeddings", True)), **run_options)


def load_trainer_config(spec: str):
    """`path/to/config.py[:preset]` -> the ml_collections ConfigDict of its get_config(preset)."""
    path, _, preset = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: {path} does not exist")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location("_plan_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset or None)


def model_from_trainer_config(c: Any, remat: str | None = None):
    m = c.model
    policy = remat or ("full" if m.get("remat", False) is True else
                       m.get("remat", False) or "none")
    run = dict(dtype=m.get("compute_dtype", "float32"), param_dtype=m.get("param_dtype", "float32"),
               remat_policy=policy)
    if m.get("init") == "tiny":
        return _tiny_config(m.tiny, **run)
    path = m.get("path", "")
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return load_config(path, **run)
    hint = f"{path} {c.get('preset', '')}".lower()
    for size in (*BUILTIN_QWEN2_VL, "7b", "3b"):
        if size in hint:
            return builtin_config(size, **run)
    raise ValueError(f"--config: model.path={path!r} has no config.json and names no known size "
                     "(3b/7b, qwen2_vl_2b/7b); pass --hf_config or --model")


# --------------------------------------------------------------------------------------------------
# Shapes -> bytes
# --------------------------------------------------------------------------------------------------

def _per_device_bytes(shape, dtype, names, mesh, rules) -> int:
    spec = shd.logical_to_spec(names, rules, shape=shape, mesh=mesh)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    n = 1
    for d, dim in enumerate(shape):
        axes = spec[d] if d < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n *= dim // math.prod(sizes[a] for a in axes)
    return n * jnp.dtype(dtype).itemsize


def tree_bytes(tree: Any, mesh, rules) -> tuple[int, int, int]:
    """(total elements, global bytes, per-device bytes) of an abstract tree of (nnx.Variable) arrays."""
    count = total = per_device = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(leaf, nnx.Variable):
            value, names = leaf.get_value(), leaf.get_metadata().get("out_sharding")
        else:
            value, names = leaf, None
        if not hasattr(value, "shape"):
            continue
        size = math.prod(value.shape)
        count += size
        total += size * jnp.dtype(value.dtype).itemsize
        per_device += _per_device_bytes(value.shape, value.dtype, names, mesh, rules)
    return count, total, per_device


def _vision_rows(config, rows: int, images: int, patches: int) -> tuple[int, int] | None:
    """(R, Lr) of the per-image full-attention rows of a micro-batch (None: dense over all patches)."""
    unit = config.vision.spatial_merge_size ** 2
    per_image = max(unit, patches // unit * unit)
    return layout.full_attention_rows([per_image] * rows * images, rows * images * per_image) if images else None


def micro_batch_spec(config, rows: int, seq_len: int, images: int, patches: int) -> dict:
    """Abstract host batch (`jax.ShapeDtypeStruct`s) of one micro-batch, as the model's forward takes."""
    unit = config.vision.spatial_merge_size ** 2
    per_image = max(unit, patches // unit * unit)
    p = rows * images * per_image
    i32 = jnp.int32
    spec = {"input_ids": ((rows, seq_len), i32), "attention_mask": ((rows, seq_len), i32),
            "loss_mask": ((rows, seq_len), i32), "position_ids": ((3, rows, seq_len), i32),
            "pixel_values": ((p, config.vision.patch_dim), jnp.float32),
            "window_index": ((p // unit,), i32), "reverse_index": ((p // unit,), i32),
            "window_segments": ((p,), i32), "full_segments": ((p,), i32),
            "rotary_hw": ((p, 2), i32), "num_patches": ((), i32)}
    rows_shape = _vision_rows(config, rows, images, patches)
    if rows_shape:   # per-image full attention, as the SFT trainer lays it out (common.pad_to)
        spec.update(full_index=(rows_shape, i32), full_slot=((p,), i32))
    if images == 0:
        spec = {k: v for k, v in spec.items() if k not in LAYOUT_KEYS and k != "pixel_values"}
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in spec.items()}


def next_token_loss(model, batch):
    """Token-mean next-token cross-entropy over `loss_mask` (the SFT loss) from full logits."""
    vision = None
    if "pixel_values" in batch:
        vision = layout.layout_from_fields(batch, prefix="")
    logits, _ = model.forward(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                              pixel_values=batch.get("pixel_values"), vision=vision)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    w = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0), {"tokens": jnp.sum(w)}


def activation_bytes(graphdef, params, rest, batch, trainable=None) -> tuple[int, int]:
    """(residual bytes kept for the backward pass, of which parameter-shaped) for one micro-batch."""

    def loss(p, b):
        if trainable is not None:
            p = jax.tree.map(lambda t, x: x if t else jax.lax.stop_gradient(x), trainable, p)
        return next_token_loss(nnx.merge(graphdef, p, rest), b)[0]

    vjp = jax.eval_shape(lambda p, b: jax.vjp(lambda q: loss(q, b), p)[1], params, batch)
    param_shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}
    param_shapes |= {s[::-1] for s in param_shapes}
    total = shaped = 0
    for r in jax.tree.leaves(vjp):
        b = math.prod(r.shape) * jnp.dtype(r.dtype).itemsize
        total += b
        if tuple(r.shape) in param_shapes:
            shaped += b
    return total, shaped


def attention_scores_bytes(config, mesh, rules, rows: int, seq_len: int, images: int,
                           patches: int) -> int:
    """Per-device float32 attention scores of the largest single attention (a temporary that the
    residual count misses): text [rows, heads, L, L] split over data-parallel and `heads` devices;
    vision per image, [R, heads, Lr, Lr] (`layout.full_attention_rows`), or [1, heads, P, P] over all
    patches of the micro-batch where that is no dearer, split over `heads` only."""
    t, v = config.text, config.vision
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    table = dict(rules)
    tp_t = math.prod(sizes[a] for a in table["heads"]) if t.num_attention_heads % max(
        1, math.prod(sizes[a] for a in table["heads"])) == 0 else 1
    tp_v = math.prod(sizes[a] for a in table["heads"]) if v.num_heads % max(
        1, math.prod(sizes[a] for a in table["heads"])) == 0 else 1
    dp = shd.data_parallel_size(mesh, rules)
    text = 4 * rows * t.num_attention_heads * seq_len * seq_len // (dp * tp_t)
    unit = v.spatial_merge_size ** 2
    p = rows * images * max(unit, patches // unit * unit)
    r_lr = _vision_rows(config, rows, images, patches)
    vision = 4 * v.num_heads * (r_lr[0] * r_lr[1] ** 2 if r_lr else p * p) // tp_v
    return max(text, vision)


def step_flops(config, rows: int, seq_len: int, images: int, patches: int,
               freeze_vision: bool) -> dict[str, float]:
    """Analytic FLOPs of one training micro-batch (matmuls + dense attention, as executed)."""
    t, v = config.text, config.vision
    tokens = rows * seq_len
    d, hd = t.hidden_size, t.head_dim
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    per_layer = 2 * tokens * (d * q + 2 * d * kv + q * d + 3 * d * t.intermediate_size)
    attn = 4 * rows * seq_len * seq_len * q                    # QK^T and AV, full (masked) square
    text_fwd = t.num_hidden_layers * (per_layer + attn) + 2 * tokens * d * t.vocab_size
    unit = v.spatial_merge_size ** 2
    p = rows * images * max(unit, patches // unit * unit)
    D = v.hidden_size
    vis_block = 2 * p * (3 * D * D + D * D + 3 * D * v.intermediate_size) + 4 * p * p * D
    wide = D * unit
    vis_fwd = 2 * p * v.patch_dim * D + v.depth * vis_block + 2 * (p // unit) * (
        wide * wide + wide * v.out_hidden_size) if p else 0
    vision_bwd = 0 if freeze_vision else 2 * vis_fwd
    model = 3 * text_fwd + vis_fwd + vision_bwd
    remat = {"none": 0, "save_dots": 0, "full": 1}[config.remat_policy]
    executed = model + remat * (text_fwd + (0 if freeze_vision else vis_fwd))
    return {"model_flops": float(model), "executed_flops": float(executed),
            "text_forward_flops": float(text_fwd), "vision_forward_flops": float(vis_fwd)}


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def abstract_model(config) -> tuple[Any, Any, Any]:
    """(graphdef, abstract params, abstract rest) of the model: shapes and logical names only."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param, ...)


def plan(config, mesh_shape, *, rules="fsdp_tp", rows: int = 8, seq_len: int = 2048,
         images: int = 1, patches: int = 1024, micro_batches: int = 1, freeze_vision: bool = False,
         reference_model: bool = False, optim: dict | None = None,
         activations: bool = True) -> dict[str, Any]:
    """Per-device bytes (params, grads, optimizer state, reference model, activations) and FLOPs.

    `rows` is the global micro-batch (rows per optimizer update / micro_batches).
    """
    if -1 in tuple(mesh_shape):
        raise ValueError(f"--mesh {mesh_shape}: give every axis size (no -1) when planning")
    mesh = jax.sharding.AbstractMesh(tuple(int(s) for s in mesh_shape), shd.MESH_AXES)
    rules = shd.resolve_rules(rules)
    n_devices = math.prod(mesh_shape)
    dp = shd.data_parallel_size(mesh, rules)
    if rows % dp:
        raise ValueError(f"micro-batch rows {rows} are not divisible by the data-parallel size {dp}")
    graphdef, params, rest = abstract_model(config)
    frozen = ("^visual/",) if freeze_vision else ()
    tx = optim_lib.make_optimizer(params, learning_rate=1e-5, total_steps=10, frozen=frozen,
                                  **(optim or {}))
    opt_state = jax.eval_shape(tx.init, params)
    n_params, params_total, params_dev = tree_bytes(params, mesh, rules)
    vision_params = tree_bytes(params["visual"], mesh, rules)[0]
    _, grads_total, grads_dev = tree_bytes(params, mesh, rules)
    if micro_batches > 1:   # float32 accumulator next to the gradients of one micro-batch
        f32 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), params)
        grads_dev += tree_bytes(f32, mesh, rules)[2]
        grads_total += tree_bytes(f32, mesh, rules)[1]
    _, opt_total, opt_dev = tree_bytes(opt_state, mesh, rules)
    ref_total = ref_dev = 0
    if reference_model:      # frozen copy in the compute dtype
        ref = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, config.jnp_dtype), params)
        _, ref_total, ref_dev = tree_bytes(ref, mesh, rules)
    result: dict[str, Any] = {
        "mesh": dict(zip(shd.MESH_AXES, mesh_shape)), "devices": n_devices, "rules": dict(rules),
        "data_parallel": dp, "params": n_params, "vision_params": vision_params,
        "micro_batch": {"rows": rows, "seq_len": seq_len, "images_per_row": images,
                        "patches_per_image": patches, "micro_batches": micro_batches},
        "remat_policy": config.remat_policy, "dtype": config.dtype, "param_dtype": config.param_dtype,
        "bytes_per_device": {"params": params_dev, "grads": grads_dev, "optimizer": opt_dev,
                             "reference_model": ref_dev},
        "bytes_total": {"params": params_total, "grads": grads_total, "optimizer": opt_total,
                        "reference_model": ref_total},
    }
    if activations:
        batch = micro_batch_spec(config, rows, seq_len, images, patches)
        trainable = optim_lib.trainable_mask(params, frozen) if frozen else None
        act, param_shaped = activation_bytes(graphdef, params, rest, batch, trainable)
        result["bytes_total"]["activations"] = act - param_shaped
        result["bytes_per_device"]["activations"] = (act - param_shaped) // dp
    result["bytes_per_device"]["attention_scores"] = attention_scores_bytes(
        config, mesh, rules, rows, seq_len, images, patches)
    flops = step_flops(config, rows, seq_len, images, patches, freeze_vision)
    result["flops_per_step"] = {k: v * micro_batches for k, v in flops.items()}
    result["flops_per_step_per_device"] = flops["model_flops"] * micro_batches / n_devices
    result["bytes_per_device"]["total"] = sum(result["bytes_per_device"].values())
    return result


def plan_from_trainer_config(c, mesh_shape, **overrides) -> dict[str, Any]:
    """Micro-batch shapes, remat, freezing and the reference model read from a trainer config."""
    model = model_from_trainer_config(c, overrides.pop("remat", None))
    mode = c.get("mode", "sft")
    micro = int(c.train.get("grad_accum_steps", 1))
    rows = int(c.train.batch_size) // micro
    if mode == "grpo":
        seq = int(c.data.max_prompt_length) + int(c.grpo.max_new_tokens)
        ref = float(c.grpo.get("init_kl_coef", 0.0)) > 0
    else:
        seq, ref = int(c.data.max_length), False
    patches = int(c.data.get("max_pixels", 256 * 28 * 28)) // (model.vision.patch_size ** 2)
    kw = dict(rules=c.get("sharding", {}).get("rules", "fsdp_tp"), rows=rows, seq_len=seq, images=1,
              patches=patches, micro_batches=micro,
              freeze_vision=bool(c.model.get("freeze_vision", False)), reference_model=ref,
              optim={k: c.optim[k] for k in ("b1", "b2", "eps", "weight_decay", "max_grad_norm")
                     if k in c.optim})
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return plan(model, mesh_shape, **kw)


# --------------------------------------------------------------------------------------------------
# Phases of a training step (what XLA allocates per device)
# --------------------------------------------------------------------------------------------------
#
# Every phase program's peak per device is its arguments plus the live peak of its temporaries
# (outputs are donated or small). The temporaries below are the buffers found at the peak of XLA's
# buffer assignment (`--xla_dump_to`, *-live-range.txt) of the project's own programs (tools/
# phase_programs.py), as XLA:CPU compiles them: bf16 matmuls run in float32 there, so gathered weights,
# matmul outputs and remat residuals are float32; on an accelerator they stay in the compute dtype and
# the figures are an upper bound. FSDP gathers a weight whole along its model width ("embed") before
# the matmul that uses it; a layer's gathered weights count per layer (the layer scans), the output
# projection's for the whole program (XLA hoists its gather out of the decode loop).

# XLA's heap packing leaves part of the temporaries' allocation unused: measured 1.00-1.25 x their live
# peak. In the rollout about half of the vision tower's buffers keep their room through the prefill
# (the prompt cache, allocated before the tower runs, sits above them).
FRAGMENTATION = 1.08
VISION_UNPACKED = 0.5
F32 = 4


class DeviceSizes:
    """Per-device sizes of a workload's parameters, optimiser state and activations on a mesh."""

    def __init__(self, w: Any, mesh_shape: tuple[int, ...], rules: Any = None):
        if -1 in tuple(mesh_shape):
            raise ValueError(f"--mesh {mesh_shape}: give every axis size (no -1) when planning")
        self.w, self.m = w, w.model
        self.mesh = jax.sharding.AbstractMesh(tuple(int(s) for s in mesh_shape), shd.MESH_AXES)
        self.rules = shd.resolve_rules(rules if rules is not None else w.config.get("sharding", {}).get("rules"))
        self.gathered_rules = tuple((k, () if k == "embed" else v) for k, v in self.rules)
        self.dp = shd.data_parallel_size(self.mesh, self.rules)
        _, params, rest = abstract_model(self.m)
        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        mask = common.run_trainable_mask(w.config, params)
        train = jax.tree.leaves(mask) if mask is not None else None
        self.params = self.params_f32_trainable = self.ref = 0
        self.layer = self.vision_block = self.head = self.decode_weights = self.stack_f32 = 0
        self.head_gathered = False
        tied = self.m.tie_word_embeddings
        ref = jnp.dtype(self.m.param_dtype if w.ref_dtype == "param" else w.ref_dtype)
        layers, depth = self.m.text.num_hidden_layers, self.m.vision.depth
        for i, (path, var) in enumerate(jax.tree_util.tree_leaves_with_path(params, is_leaf=is_var)):
            key = jax.tree_util.keystr(path, simple=True, separator="/")
            a, names = var.get_value(), var.get_metadata().get("out_sharding")
            self.params += self.bytes(a.shape, names, a.dtype)
            if train is None or train[i]:
                self.params_f32_trainable += self.bytes(a.shape, names, jnp.float32)
            floating = jnp.issubdtype(a.dtype, jnp.floating)
            self.ref += self.bytes(a.shape, names, ref if floating else a.dtype)
            gathered = self.bytes(a.shape, names, jnp.float32, self.gathered_rules)
            if key.startswith("language_model/layers/"):
                self.layer += gathered // layers
                self.stack_f32 += self.bytes(a.shape, names, jnp.float32)
                if key.endswith("/kernel"):
                    self.decode_weights += self.bytes(a.shape, names, self.m.dtype)
            elif key.startswith("visual/blocks/"):
                self.vision_block += gathered // depth
            elif key == ("language_model/embed_tokens" if tied else "lm_head"):
                self.head = gathered
                self.head_gathered = gathered > self.bytes(a.shape, names, jnp.float32)   # FSDP splits its width
                if not tied:
                    self.decode_weights += self.bytes(a.shape, names, self.m.dtype)
        self.rest = tree_bytes(rest, self.mesh, self.rules)[2]
        self.reward_model = reward_model_bytes(w.config, self.mesh, self.rules)
        tx, _ = common.run_optimizer(w.config, params, total_updates=1000)
        self.optimizer = tree_bytes(jax.eval_shape(tx.init, params), self.mesh, self.rules)[2]
        t, v = self.m.text, self.m.vision
        self.heads = self.local(t.num_attention_heads, "heads")
        self.kv_heads = self.local(t.num_key_value_heads, "kv_heads")     # the KV cache's heads axis
        self.mlp = self.local(t.intermediate_size, "mlp")
        self.vocab = self.local(t.vocab_size, "vocab")
        self.vision_heads = self.local(v.num_heads, "heads")
        self.vision_mlp = self.local(v.intermediate_size, "mlp")

    def for_workload(self, w: Any) -> "DeviceSizes":
        """The same model, optimiser and mesh with other batch shapes (`Workload.replace`)."""
        other = copy.copy(self)
        other.w = w
        return other

    def bytes(self, shape, names, dtype, rules=None) -> int:
        return _per_device_bytes(tuple(shape), dtype, names, self.mesh, rules or self.rules)

    def local(self, size: int, logical: str) -> int:
        """The per-device part of a dimension of `size` named `logical` (the whole of it where the mesh
        axes of its rule do not divide it)."""
        return self.bytes((size,), (logical,), jnp.int8)

    def rows(self, n: int) -> int:
        return -(-n // self.dp)

    def batch_bytes(self, host: dict, *, micro_batches: int = 1) -> int:
        """Per-device bytes of a host batch placed as `sharding.batch_shardings` places it."""
        rows = np.shape(host["input_ids"])[0]
        names = shd.batch_axes(host, rows)
        total = 0
        for k, v in host.items():
            shape = tuple(np.shape(v))
            if k == "pixel_values":
                shape = shape[:-1] + (self.m.vision.patch_dim,)
            total += micro_batches * self.bytes(shape, names[k], np.asarray(v).dtype)
        return total

    def resident(self) -> dict[str, int]:
        """What a run keeps on every device between phases."""
        out = {"params": self.params, "rest": self.rest, "optimizer": self.optimizer}
        out["reference"] = self.ref if self.w.use_ref else 0
        out["reward_model"] = self.reward_model
        return out


def reward_model_bytes(config: Any, mesh: Any, rules: Any) -> int:
    """Per-device bytes of the frozen reward model of reward.open_ended='jax_rm' (0 otherwise): the
    backbone of reward.reward_model_path (its config.json) in reward.reward_model_dtype, sharded like the
    policy, without an output layer. Resident through every phase; its forwards (reward_model_batch_size
    rows, no vocabulary projection) are smaller than the update's and are not a phase of their own."""
    block = config.get("reward") if hasattr(config, "get") else None
    if block is None:
        return 0
    r = RewardConfig.from_config(block)
    if r.open_ended_scorer != "jax_rm":
        return 0
    rm = load_config(r.reward_model_path, dtype=r.reward_model_dtype, param_dtype=r.reward_model_dtype)
    _, params, rest = abstract_model(rm.replace(tie_word_embeddings=True))
    return tree_bytes(params, mesh, rules)[2] + tree_bytes(rest, mesh, rules)[2]


def _vision_parts(d: DeviceSizes, host: dict, *, backward: bool) -> dict[str, int]:
    """The vision tower's largest temporaries on one device: one block's float32 attention scores (per-
    image rows [G, R, heads, Lr, Lr] or dense [G, heads, P, P]) and MLP, its gathered weights, the
    remat residuals of every block (when the tower is trained)."""
    if "pixel_values" not in host:
        return {}
    v = d.m.vision
    groups, patches = np.shape(host["pixel_values"])[:2]
    g = d.rows(groups) if groups % d.dp == 0 else groups
    rows = host.get("vision_full_index")
    pairs = np.shape(rows)[1] * np.shape(rows)[2] ** 2 if rows is not None else patches * patches
    parts = {"vision_scores": 2 * g * d.vision_heads * pairs * F32,
             "vision_mlp": (5 if backward else 2) * g * patches * d.vision_mlp * F32,
             "vision_weights": 2 * d.vision_block}
    if backward:
        parts["vision_residuals"] = v.depth * g * patches * v.hidden_size * F32
    return parts


def _layer_parts(d: DeviceSizes, rows: int, queries: int, keys: int, *, backward: bool) -> dict[str, int]:
    """One decoder layer's float32 attention scores and probabilities [rows, heads, queries, keys] and
    boolean mask; with `backward` (its recomputation and backward in the update) also its MLP
    activations [rows, queries, mlp] (five) and hidden states [rows, queries, width] (eight) in float32
    and its gathered weights' gradients."""
    parts = {"scores": 2 * rows * d.heads * queries * keys * F32, "mask": rows * queries * keys,
             # FSDP: the gathered weights (and in the backward their gradients before the reduce-scatter)
             "layer_weights": (2 if backward else 1) * d.layer if backward or d.head_gathered else 0}
    if backward:
        parts.update(mlp=5 * rows * queries * d.mlp * F32, hidden=8 * rows * queries * d.m.text.hidden_size * F32)
    return parts


def _peak(args: int, persistent: dict[str, int], stages: dict[str, dict[str, int]], *,
          unpacked: dict[str, int] | None = None) -> dict[str, Any]:
    """Arguments + FRAGMENTATION x (temporaries live throughout + the largest stage's) + `unpacked`
    (buffers of an earlier stage whose room XLA's heap does not reuse)."""
    sums = {k: sum(v.values()) for k, v in stages.items()}
    stage = max(sums, key=sums.get)
    extra = dict(unpacked or {})
    temp = int(FRAGMENTATION * (sum(persistent.values()) + sums[stage])) + sum(extra.values())
    return {"arguments": args, "temporaries": temp, "peak": args + temp, "peak_stage": stage,
            "parts": {**persistent, **{f"{stage}/{k}": v for k, v in stages[stage].items()}, **extra}}


def estimate_rollout(d: DeviceSizes, host: dict) -> dict[str, Any]:
    """One generate call: the prompts' KV cache (k and v [layers, rows, prompt + new, kv_heads,
    head_dim] in the compute dtype) while images are encoded and the prompt prefilled (float32 attention
    scores over every cache slot; two layers' gathered weights, the scan body's and the top layer's),
    then `num_samples` copies of it for the decode loop (float32 logits [rows * samples, vocab]); the
    gathered output projection throughout. Where the query heads are split over `tensor` but the kv heads
    are not (tensor > kv heads), XLA reshards the whole cache each decode step, in float32 on CPU."""
    w, t = d.w, d.m.text
    rows = d.rows(np.shape(host["input_ids"])[0])
    prompt = np.shape(host["input_ids"])[1]
    slots = prompt + w.cache_new_tokens
    kv = 2 * t.num_hidden_layers * rows * slots * d.kv_heads * t.head_dim * jnp.dtype(d.m.dtype).itemsize
    head = {"head": d.head}
    prefill = _layer_parts(d, rows, prompt, slots, backward=False)
    prefill["layer_weights"] *= 2           # the scan body's and the top layer's (`last_only`)
    decode = {"cache": w.num_samples * kv, **head, "layer_weights": 2 * d.layer,
              "logits": 3 * w.num_samples * rows * d.vocab * F32}
    if d.kv_heads == t.num_key_value_heads and d.heads < t.num_attention_heads:
        decode["cache_resharded"] = decode["cache"] * F32 // jnp.dtype(d.m.dtype).itemsize
    stages = {"vision": {"prompt_cache": kv, **head, **_vision_parts(d, host, backward=False)},
              "prefill": {"prompt_cache": kv, **head, **prefill}, "decode": decode}
    args = d.params + d.rest + d.batch_bytes(host) + (d.decode_weights if w.weight_major else 0)
    vision = sum(v for k, v in stages["vision"].items() if k.startswith("vision_"))
    return _peak(args, {}, stages, unpacked={"vision_unpacked": int(VISION_UNPACKED * vision)})


def estimate_logprobs(d: DeviceSizes, host: dict, *, reference: bool) -> dict[str, Any]:
    """The log-prob forward of one micro-batch (no backward): per layer its attention scores over the
    whole row, then the fused head (vlaa_jax.rl.logprobs): the projection and one vocabulary block's
    logits at a time."""
    w = d.w
    rows, length = d.rows(np.shape(host["input_ids"])[0]), np.shape(host["input_ids"])[1]
    stored = jnp.dtype(w.model.param_dtype if not reference or w.ref_dtype == "param" else w.ref_dtype).itemsize
    # Weights stored narrower than float32 (a bf16 reference): XLA:CPU converts the decoder's stacked
    # weights to float32 once, before the layer scan; the output projection is used as stored.
    narrow = {"decoder_weights_f32": d.stack_f32} if stored < F32 else {}
    # the gathered projection (and its float32 copy where it is stored narrower); the fused head gathers
    # it after the layers, so the layer stage does not hold it
    logits = {"head": d.head + (d.head * stored // F32 if d.head_gathered else 0)}
    stages = {
        "vision": {**narrow, **_vision_parts(d, host, backward=False)},
        "layer": {**narrow, **_layer_parts(d, rows, length, length, backward=False)},
        "logits": {**narrow, **logits, "logits": _head_block_logits(d, host, rows)},
    }
    args = (d.ref if reference else d.params) + d.rest + d.batch_bytes(host)
    return _peak(args, {}, stages)


def _head_block_logits(d: DeviceSizes, host: dict, rows: int) -> int:
    """Bytes of the fused head's live logits: one vocabulary block's float32 logits and their
    exponentials (or gradient) over one chunk of positions."""
    positions = _logits_positions(d, host)
    _, block = head_vocab_blocks(rows, positions, d.m.text.vocab_size)
    return 2 * rows * positions * min(block, d.vocab) * F32


def _logits_positions(d: DeviceSizes, host: dict) -> int:
    """Positions per row of one logits chunk: GRPO's response chunk, SFT's per group of rows."""
    if "target_pos" in host:     # SFT: target positions compacted per image group of B / G rows
        groups, k = np.shape(host["target_pos"])
        per_group = np.shape(host["input_ids"])[0] // groups
        return max(1, min(k, int(d.w.config.sft.logits_chunk) * per_group) // per_group)
    return min(int(d.w.config.grpo.logprob_chunk), np.shape(host["response_mask"])[1])


def estimate_train_step(d: DeviceSizes, host: dict) -> dict[str, Any]:
    """An optimiser update over `micro_batches` micro-batches (GRPO update or SFT step): parameters and
    Adam moments (arguments, donated), a float32 gradient accumulator and the remat residuals of every
    layer and block (each layer's input, float32 on CPU) throughout, then the largest of: the output
    projection's backward (its gathered weight, its gradient and the embedding's, float32), one layer's
    recomputed forward and backward, the vision tower's."""
    w, t = d.w, d.m.text
    rows, length = d.rows(np.shape(host["input_ids"])[0]), np.shape(host["input_ids"])[1]
    vision_trained = not w.config.model.get("freeze_vision", False)
    layer = _layer_parts(d, rows, length, length, backward=True)
    vision = _vision_parts(d, host, backward=vision_trained)
    persistent = {"gradients": d.params_f32_trainable,
                  "residuals": t.num_hidden_layers * _residual_per_layer(d, layer, rows * length * t.hidden_size)}
    if "vision_residuals" in vision:
        block_input = vision.pop("vision_residuals") // d.m.vision.depth // F32
        persistent["vision_residuals"] = d.m.vision.depth * _residual_per_layer(d, vision, block_input)
    stages = {
        "head": {"head": 3 * d.head, "logits": _head_block_logits(d, host, rows)},
        "layer": {"head": 2 * d.head, **layer},
        "vision": {"head": d.head, **vision},
        # the AdamW update: gradients, their clipped / masked copies and the updates, float32 (the
        # residuals are gone by then; counted as negative here so that the stage sums stay comparable)
        "optimizer": {"updates": 2 * d.params_f32_trainable,
                      "residuals_freed": -sum(v for k, v in persistent.items() if k != "gradients")},
    }
    args = d.params + d.rest + d.optimizer + d.batch_bytes(host, micro_batches=w.micro_batches)
    return _peak(args, persistent, stages)


def _residual_per_layer(d: DeviceSizes, parts: dict[str, int], block_input: int) -> int:
    """What the backward keeps of one layer / block: its input (remat "full", float32 on CPU), all its
    activations (remat "none": `parts` without the weights), or its matmul outputs ("save_dots": about
    half of them; not measured against XLA)."""
    activations = sum(v for k, v in parts.items() if not k.endswith("weights"))
    return {"full": block_input * F32, "none": activations, "save_dots": activations // 2}[d.m.remat_policy]


def estimate_phase(d: DeviceSizes, phase: str, host: dict) -> dict[str, Any]:
    """The estimate of one phase's program on the host batch it runs on (tools/phase_programs.py)."""
    if phase == "rollout":
        return estimate_rollout(d, host)
    if phase in ("logprobs", "ref_logprobs"):
        return estimate_logprobs(d, host, reference=phase == "ref_logprobs")
    if phase in ("update", "sft"):
        return estimate_train_step(d, host)
    raise ValueError(f"no estimate for phase {phase!r}")


def phase_host_batch(w: Any, d: DeviceSizes, phase: str) -> dict:
    """The host batch a phase runs on (built with one-column patches: shapes only)."""
    if phase == "rollout":
        return pp.rollout_host_batch(w, d.mesh, d.rules)
    if phase in ("logprobs", "ref_logprobs"):
        return pp.grpo_host_batch(w, d.mesh, d.rules, forward=True)
    if phase == "update":
        return pp.grpo_host_batch(w, d.mesh, d.rules)
    return pp.sft_host_batch(w, d.mesh, d.rules)


def plan_phases(w: Any, mesh_shape: tuple[int, ...], rules: Any = None, *,
                sizes: DeviceSizes | None = None) -> dict[str, Any]:
    """Per-device bytes of every phase of a GRPO step (rollout, old-policy and reference log-probs,
    update) or an SFT step: the phase program's arguments and temporaries plus the resident state it
    does not take (optimiser state during the rollout, ...), the peak phase. `sizes`: a DeviceSizes of
    the same model and mesh to reuse."""
    d = sizes.for_workload(w) if sizes is not None else DeviceSizes(w, mesh_shape, rules)
    resident = d.resident()
    for what, rows in (("prompts per rollout generate call", w.rollout_prompts),
                       ("micro-batch rows", w.micro_rows)):
        if rows and rows % d.dp:
            raise ValueError(f"{what} {rows} are not divisible by the data-parallel size {d.dp}")
    phases = {}
    for phase in w.phases:
        est = estimate_phase(d, phase, phase_host_batch(w, d, phase))
        passed = {"rollout": ("params", "rest"), "logprobs": ("params", "rest"),
                  "ref_logprobs": ("reference", "rest")}.get(phase, ("params", "rest", "optimizer"))
        est["resident_beside"] = sum(v for k, v in resident.items() if k not in passed)
        est["total"] = est["peak"] + est["resident_beside"]
        phases[phase] = est
    peak = max(phases, key=lambda k: phases[k]["total"])
    return {"mesh": dict(zip(shd.MESH_AXES, mesh_shape)), "devices": math.prod(mesh_shape),
            "data_parallel": d.dp, "rules": dict(d.rules), "resident": resident, "phases": phases,
            "peak_phase": peak, "peak_bytes": phases[peak]["total"], "workload": workload_summary(w)}


def workload_summary(w: Any) -> dict[str, Any]:
    keys = ("mode", "micro_rows", "micro_batches", "seq_len", "image_grid", "rollout_prompts", "num_samples",
            "prompt_len", "new_tokens", "cache_new_tokens", "use_ref", "ref_dtype", "old_logprobs", "weight_major")
    return {k: getattr(w, k) for k in keys} | {"remat_policy": w.model.remat_policy, "dtype": w.model.dtype,
                                               "param_dtype": w.model.param_dtype}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def suggest(w: Any, mesh_shape: tuple[int, ...], device_memory: int, rules: Any = None) -> dict[str, Any]:
    """The smallest `train.grad_accum_steps` (the largest micro-batch: a divisor of the batch and a
    multiple of the data-parallel size) whose update and log-prob phases fit `device_memory` per device,
    then the largest `grpo.rollout_micro_batch` (a divisor of the rollout batch and a multiple of the
    data-parallel size) whose rollout fits too. None where even the smallest does not fit."""
    d = DeviceSizes(w, mesh_shape, rules)
    c, dp = w.config, d.dp
    fits = lambda plan, phases: all(plan["phases"][p]["total"] <= device_memory  # noqa: E731
                                    for p in phases if p in plan["phases"])
    out: dict[str, Any] = {"device_memory": device_memory, "train.grad_accum_steps": None}
    batch = int(c.train.batch_size)
    smallest_rollout = {"rollout_prompts": dp} if w.mode == "grpo" else {}
    for steps in (s for s in _divisors(batch) if (batch // s) % dp == 0):
        trial = w.replace(micro_batches=steps, micro_rows=batch // steps, **smallest_rollout)
        if fits(plan_phases(trial, mesh_shape, sizes=d), ("logprobs", "ref_logprobs", "update", "sft")):
            out["train.grad_accum_steps"] = steps
            w = trial
            break
    plan = None
    if w.mode == "grpo":
        out["grpo.rollout_micro_batch"] = None
        prompts = int(c.grpo.rollout_batch_prompts)
        for size in sorted((k for k in _divisors(prompts) if k % dp == 0), reverse=True):
            trial = plan_phases(w.replace(rollout_prompts=size), mesh_shape, sizes=d)
            if out["train.grad_accum_steps"] is not None and fits(trial, ("rollout",)):
                out["grpo.rollout_micro_batch"] = size
                plan = trial
                break
    elif out["train.grad_accum_steps"] is not None:
        plan = plan_phases(w, mesh_shape, sizes=d)
    out["plan"] = plan
    return out


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"mesh {p['mesh']} ({p['devices']} devices, data-parallel {p['data_parallel']}), "
             f"remat {p['remat_policy']}, params {p['params'] / 1e9:.3f} B "
             f"(vision {p['vision_params'] / 1e6:.0f} M), dtype {p['dtype']} / {p['param_dtype']}",
             f"micro-batch {p['micro_batch']}",
             f"{'per device':<18}{'GiB':>10}{'total GiB':>12}"]
    for k, v in p["bytes_per_device"].items():
        total = p["bytes_total"].get(k)
        lines.append(f"  {k:<16}{v / GiB:>10.2f}{'' if total is None else f'{total / GiB:>12.2f}'}")
    f = p["flops_per_step"]
    lines.append(f"FLOPs per step: model {f['model_flops']:.3e} (executed {f['executed_flops']:.3e}), "
                 f"per device {p['flops_per_step_per_device']:.3e}")
    return "\n".join(lines)


def format_phases(p: dict[str, Any]) -> str:
    """The phase plan as a table (GiB per device), with XLA's figures where `--xla` added them."""
    w = p["workload"]
    lines = [f"{w['mode'].upper()} step on mesh {p['mesh']} ({p['devices']} devices, data-parallel "
             f"{p['data_parallel']}); remat {w['remat_policy']}, compute {w['dtype']}, parameters {w['param_dtype']}"]
    if w["mode"] == "grpo":
        lines.append(f"  rollout: {w['rollout_prompts']} prompts x {w['num_samples']} samples per generate call, "
                     f"{w['prompt_len']} prompt + {w['new_tokens']} new tokens; updates: {w['micro_rows']} rows x "
                     f"{w['seq_len']} tokens x {w['micro_batches']} micro-batches; reference "
                     f"{w['ref_dtype'] if w['use_ref'] else 'none'}")
    else:
        lines.append(f"  {w['micro_rows']} rows x {w['seq_len']} tokens x {w['micro_batches']} micro-batches")
    lines.append("  resident: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in p["resident"].items() if v) + " GiB")
    xla = p.get("xla", {})
    head = f"  {'phase':<13}{'arguments':>10}{'temps':>8}{'beside':>8}{'total':>8}"
    lines.append(head + ("   XLA: program  total  est/XLA" if xla else "") + "   largest parts (GiB)")
    for name, e in p["phases"].items():
        row = (f"  {name:<13}{e['arguments'] / GiB:>10.2f}{e['temporaries'] / GiB:>8.2f}"
               f"{e['resident_beside'] / GiB:>8.2f}{e['total'] / GiB:>8.2f}")
        if name in xla:
            x = xla[name]
            row += f"   {x['peak'] / GiB:>12.2f} {x['total'] / GiB:>6.2f} {e['peak'] / x['peak']:>8.2f}"
        parts = sorted(e["parts"].items(), key=lambda kv: -kv[1])[:4]
        row += "   " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts)
        lines.append(row)
    lines.append(f"  peak: {p['peak_phase']}, {p['peak_bytes'] / GiB:.2f} GiB per device")
    for sug in p.get("suggestions", []):
        knobs = {k: v for k, v in sug.items() if k not in ("device_memory", "plan")}
        fit = ", ".join(f"{k}={v}" for k, v in knobs.items())
        if sug["plan"] is None:
            lines.append(f"  {sug['device_memory'] / GiB:g} GiB per device: does not fit ({fit}; use more devices)")
        else:
            lines.append(f"  {sug['device_memory'] / GiB:g} GiB per device: {fit} (peak {sug['plan']['peak_phase']}, "
                         f"{sug['plan']['peak_bytes'] / GiB:.2f} GiB)")
    return "\n".join(lines)


def parse_bytes(text: str) -> int:
    """'80GiB', '32 GB', '512MiB' or a plain number of bytes."""
    units = {"tib": 2 ** 40, "gib": 2 ** 30, "mib": 2 ** 20, "kib": 2 ** 10, "tb": 1e12, "gb": 1e9, "mb": 1e6,
             "kb": 1e3, "b": 1}
    t = text.strip().lower().replace(" ", "")
    for unit, scale in units.items():
        if t.endswith(unit):
            return int(float(t[:-len(unit)]) * scale)
    return int(float(t))


def apply_overrides(config: Any, assignments: list[str]) -> None:
    """`key.path=value` overrides of a trainer config, typed like the value they replace."""
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. grpo.rollout_micro_batch=16")
        *path, last = key.split(".")
        node = config
        for k in path:
            node = node[k]
        if last not in node:
            raise KeyError(f"--set {item!r}: the config has no key {key!r}")
        old = node[last]
        with config.unlocked():
            if isinstance(old, bool):
                node[last] = value.lower() in ("1", "true", "yes")
            elif isinstance(old, (tuple, list)):
                node[last] = type(old)(type(old[0])(x) if old else x for x in value.split(","))
            else:
                node[last] = type(old)(value)


def xla_phase_figures(w: Any, mesh_shape: tuple[int, ...], rules: Any = None) -> dict[str, dict[str, int]]:
    """XLA's memory analysis of every phase program of `w` compiled on `mesh_shape` (needs that many
    devices in this process), with the resident bytes beside each and their total."""
    n = math.prod(mesh_shape)
    if jax.device_count() < n:
        raise RuntimeError(f"--xla on mesh {mesh_shape} needs {n} devices; this process has {jax.device_count()}")
    programs = pp.PhasePrograms(w, shd.make_mesh(mesh_shape, devices=jax.devices()[:n]), rules)
    out = {}
    for phase in w.phases:
        t0 = time.perf_counter()
        figures = pp.memory(programs.lower(phase).compile())
        figures["compile_s"] = round(time.perf_counter() - t0, 1)
        figures["resident_beside"] = programs.resident_extra(phase)
        figures["total"] = figures["peak"] + figures["resident_beside"]
        out[phase] = figures
    return out


def _config_workload(a: argparse.Namespace, config: Any | None = None) -> Any:
    c = config if config is not None else load_trainer_config(a.config)
    apply_overrides(c, a.set or [])
    return pp.Workload.from_config(c, model_from_trainer_config(c, a.remat), weight_major=a.weight_major)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="trainer config file[:preset], e.g. configs/grpo.py:vlaa_thinker_3b: "
                                      "every phase of its step")
    src.add_argument("--hf_config", help="an HF Qwen2.5-VL config.json (one update micro-batch, by component)")
    src.add_argument("--model", help="built-in shapes: 3b | 7b (Qwen2.5-VL) | qwen2_vl_2b | qwen2_vl_7b "
                     "(one update micro-batch, by component)")
    ap.add_argument("--mesh", required=True, help="devices along data,fsdp,tensor, e.g. 1,8,1")
    ap.add_argument("--rules", default=None, help="fsdp_tp | fsdp | dp (default: config's or fsdp_tp)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="--config: override a config key, e.g. --set grpo.rollout_micro_batch=16 (repeatable)")
    ap.add_argument("--device_memory", default=None,
                    help="--config: per-device memory to fit, e.g. 80GiB or 80GiB,32GiB: suggests "
                         "train.grad_accum_steps and grpo.rollout_micro_batch")
    ap.add_argument("--weight_major", action="store_true",
                    help="--config: the rollout decodes on transposed weight copies (the sampler's CPU default)")
    ap.add_argument("--xla", action="store_true",
                    help="--config: also compile every phase on simulated CPU devices and print XLA's figures")
    ap.add_argument("--xla_only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=None, help="global rows per micro-batch")
    ap.add_argument("--seq_len", type=int, default=None, help="tokens per row")
    ap.add_argument("--images", type=int, default=None, help="images per row")
    ap.add_argument("--patches", type=int, default=None, help="patches (14x14) per image")
    ap.add_argument("--micro_batches", type=int, default=None, help="gradient-accumulation steps")
    ap.add_argument("--remat", default=None, choices=("none", "full", "save_dots"))
    ap.add_argument("--dtype", default=None, help="compute dtype (--hf_config/--model; default bfloat16)")
    ap.add_argument("--freeze_vision", action="store_true", default=None)
    ap.add_argument("--reference_model", action="store_true", default=None)
    ap.add_argument("--no_activations", action="store_true", help="skip the (slower) activation trace")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(argv)
    mesh_shape = tuple(int(x) for x in a.mesh.split(","))
    if a.config:
        w = _config_workload(a)
        if a.xla_only:        # the child process of --xla, with the devices the mesh needs
            print(json.dumps(xla_phase_figures(w, mesh_shape, a.rules)))
            return 0
        result = plan_phases(w, mesh_shape, a.rules)
        if a.device_memory:
            result["suggestions"] = [suggest(w, mesh_shape, parse_bytes(m), a.rules) for m in a.device_memory.split(",")]
        if a.xla:
            child = [os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--xla_only"]
            child = [x for x in child if x not in ("--xla", "--json")]
            result["xla"] = json.loads(pp.run_on_devices(math.prod(mesh_shape), child).strip().splitlines()[-1])
        print(json.dumps(result, indent=1, default=str) if a.json else format_phases(result))
        return 0
    overrides = dict(rules=a.rules, rows=a.rows, seq_len=a.seq_len, images=a.images,
                     patches=a.patches, micro_batches=a.micro_batches,
                     freeze_vision=a.freeze_vision, reference_model=a.reference_model,
                     activations=not a.no_activations)
    run = dict(dtype=a.dtype or "bfloat16", param_dtype="float32", remat_policy=a.remat or "none")
    if a.model:
        config = builtin_config(a.model, **run)
    else:
        with open(a.hf_config) as f:
            config = from_hf_dict(json.load(f), source=a.hf_config, **run)
    result = plan(config, mesh_shape, **{k: v for k, v in overrides.items() if v is not None})
    print(json.dumps(result, indent=1) if a.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
