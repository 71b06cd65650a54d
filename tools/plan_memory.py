"""Per-device memory and FLOPs of a training step, before paying for a pod.

    python tools/plan_memory.py --config configs/grpo.py:vlaa_thinker_3b --mesh 1,8,1
    python tools/plan_memory.py --model 3b --mesh 1,8,1 --rows 8 --seq_len 4096
    python tools/plan_memory.py --hf_config /path/to/config.json --mesh 2,8,2 --rules fsdp_tp --json

Nothing is allocated: parameter and optimizer-state shapes come from `nnx.eval_shape` /
`jax.eval_shape`, and every array's per-device size from the sharding rules (vlaa_jax/sharding.py) on
an abstract mesh. The activation estimate is the set of residuals that `jax.vjp` keeps for the
backward pass of one micro-batch (again via `jax.eval_shape`, for the chosen remat policy), minus the
parameter-shaped ones, divided by the data-parallel size; XLA's fusion and buffer reuse usually make
the real peak lower, and temporary buffers (e.g. attention scores of the block being recomputed) come
on top. FLOPs are counted analytically from the shapes (matmuls and dense attention as executed).

Shapes per training micro-batch: `rows` sequences of `seq_len` tokens with `images` images of
`patches` patches each (defaults from the config: SFT `data.max_length`, GRPO `max_prompt_length +
max_new_tokens`; `data.max_pixels / 14^2` patches).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlaa_jax import sharding as shd  # noqa: E402

GiB = 1024 ** 3
LAYOUT_KEYS = ("window_index", "reverse_index", "window_segments", "full_segments", "rotary_hw",
               "num_patches")


# --------------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------------

def builtin_config(size: str, **run_options: Any):
  """Qwen2.5-VL-3B / 7B-Instruct architectures (their released config.json values)."""
  from vlaa_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig
  size = size.lower().rstrip("b")
  if size == "3":
    return Qwen25VLConfig(text=TextConfig(), vision=VisionConfig(), tie_word_embeddings=True,
                          **run_options)
  if size == "7":
    text = TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
    return Qwen25VLConfig(text=text, vision=VisionConfig(out_hidden_size=3584),
                          tie_word_embeddings=False, **run_options)
  raise ValueError(f"--model {size!r}: built-in shapes are '3b' and '7b'")


def _tiny_config(tiny: Any, **run_options: Any):
  """Qwen25VLConfig from the trainer config's `model.tiny` dict (configs/base.py TINY_MODEL)."""
  import dataclasses
  from vlaa_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig
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
    from vlaa_jax.models.qwen2_5_vl import load_config
    return load_config(path, **run)
  hint = f"{path} {c.get('preset', '')}".lower()
  for size in ("7b", "3b"):
    if size in hint:
      return builtin_config(size, **run)
  raise ValueError(f"--config: model.path={path!r} has no config.json and names no known size "
                   "(3b/7b); pass --hf_config or --model")


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
  from flax import nnx
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
  from vlaa_jax.models.qwen2_5_vl import layout
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
  from vlaa_jax.models.qwen2_5_vl import layout
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
  from flax import nnx

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
  from flax import nnx
  from vlaa_jax.models.qwen2_5_vl import Qwen25VL
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
  from vlaa_jax.train import optim as optim_lib
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


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--config", help="trainer config file[:preset], e.g. configs/sft.py:vlaa_thinker_3b")
  src.add_argument("--hf_config", help="an HF Qwen2.5-VL config.json")
  src.add_argument("--model", help="built-in shapes: 3b | 7b")
  ap.add_argument("--mesh", required=True, help="devices along data,fsdp,tensor, e.g. 1,8,1")
  ap.add_argument("--rules", default=None, help="fsdp_tp | fsdp | dp (default: config's or fsdp_tp)")
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
  overrides = dict(rules=a.rules, rows=a.rows, seq_len=a.seq_len, images=a.images,
                   patches=a.patches, micro_batches=a.micro_batches,
                   freeze_vision=a.freeze_vision, reference_model=a.reference_model,
                   activations=not a.no_activations)
  if a.config:
    result = plan_from_trainer_config(load_trainer_config(a.config), mesh_shape, remat=a.remat,
                                      **overrides)
  else:
    run = dict(dtype=a.dtype or "bfloat16", param_dtype="float32", remat_policy=a.remat or "none")
    if a.model:
      config = builtin_config(a.model, **run)
    else:
      from vlaa_jax.models.qwen2_5_vl import from_hf_dict
      with open(a.hf_config) as f:
        config = from_hf_dict(json.load(f), source=a.hf_config, **run)
    result = plan(config, mesh_shape, **{k: v for k, v in overrides.items() if v is not None})
  print(json.dumps(result, indent=1) if a.json else format_plan(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
