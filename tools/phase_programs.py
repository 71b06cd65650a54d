"""The phases of a GRPO step and an SFT step as XLA programs, compiled ahead of time on abstract parameters.

    from tools import phase_programs as pp
    w = pp.Workload.from_config(trainer_config, model_config)
    phases = pp.PhasePrograms(w, mesh)
    compiled = phases.lower("rollout").compile()
    pp.memory(compiled)       # XLA's per-device bytes (arguments, outputs, temporaries, aliased, peak)

Each phase is built from the project's own functions, the way the trainers call them:
  rollout   `rollout.sampler._compiled(...)` (the jitted `_generate`: prefill, `num_samples` copies of the
            cache, decode loop) on one generate call of `grpo.rollout_micro_batch` prompts, its host batch
            from `GRPOStep.rollout_batches` (train/grpo_step.py);
  logprobs  the `GRPOStep`'s jitted `response_logprobs` (its old-policy and reference forwards), on one
            micro-batch (`train.batch_size / grad_accum_steps` rows, `GRPOStep.micro_batch`) of prompt +
            response; `ref_logprobs` is the same program on the `grpo.ref_dtype` reference copy; there is
            no `logprobs` phase unless the old-policy log-probs are recomputed (`old_logprob_source`);
  update    `grpo_step.make_grpo_step(...).lower(...)`: the optimiser update with gradient accumulation
            over `grad_accum_steps` micro-batches;
  sft       `train.sft.make_sft_step(...).lower(...)` on `sft.host_batch` micro-batches;
  prefill   `rollout.sampler.prefill` alone (the rollout's FLOPs without the decode loop).
Parameters, optimiser state and batches are `jax.ShapeDtypeStruct`s carrying the NamedShardings the
trainers give them (`sharding.abstract_state`, `sharding.tree_shardings`, `sharding.batch_shardings`):
nothing the size of the model is allocated. Host batches are built with one-column patches (pixel values
do not change a program) and given their real width abstractly.

XLA's figures are per device and per program; the state a run keeps resident between phases but does
not pass to a phase (the optimiser state during the rollout, the reference copy during the update) is
`Workload.resident_bytes` - the program's arguments, see `PhasePrograms.resident_extra`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline.model_inputs import PromptBatch
from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl import Qwen25VL, layout
from vlaa_jax.rollout import sampler, static_stats
from vlaa_jax.rollout.sampling import SamplingConfig
from vlaa_jax.train import common, grpo_step, sft
from vlaa_jax.train import step as step_lib

GRPO_PHASES = ("rollout", "logprobs", "ref_logprobs", "update")
PHASES = GRPO_PHASES + ("sft", "prefill")
PATCH = 14          # pixels per patch side
TEXT_ID = 3         # any ordinary token id
# The Qwen chat format's stop and pad ids, what data_pipeline.tokenizer.stop_ids / pad_id give for its
# tokenizer (a workload has none): the rollout program depends only on how many stop ids there are.
STOP_IDS, PAD_ID = (151643, 151645), 151643


@dataclasses.dataclass(frozen=True)
class Workload:
    """The shapes of every phase, read from a trainer config (worst case: full-length prompts and
    responses, every image at `data.max_pixels`), and the model they run."""
    config: Any                      # the trainer ConfigDict (mode "grpo" or "sft")
    model: Any                       # Qwen25VLConfig
    image_grid: tuple[int, int]      # patches (h, w) of every image
    micro_rows: int                  # rows per update / log-prob / SFT micro-batch
    micro_batches: int               # gradient-accumulation steps
    seq_len: int                     # tokens per update row (GRPO: prompt + response; SFT: max_length)
    rollout_prompts: int = 0         # prompts per generate call
    num_samples: int = 1
    prompt_len: int = 0
    new_tokens: int = 0              # max_new_tokens (the update's response width)
    cache_new_tokens: int = 0        # the sampler's compiled bucket for it (cache = prompt + this)
    use_ref: bool = False
    ref_dtype: str = "bfloat16"
    old_logprobs: str = "recompute"  # `grpo_step.old_logprob_source`: "recompute" runs a log-prob forward
    weight_major: bool = False       # decode on transposed weight copies (the sampler's CPU default)

    @property
    def mode(self) -> str:
        return self.config.get("mode", "sft")

    @property
    def image_patches(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def phases(self) -> tuple[str, ...]:
        if self.mode == "sft":
            return ("sft",)
        out = ["rollout"]
        if self.old_logprobs == "recompute":
            out.append("logprobs")
        if self.use_ref:
            out.append("ref_logprobs")
        return tuple(out) + ("update",)

    @classmethod
    def from_config(cls, config: Any, model: Any, *, weight_major: bool = False, **overrides: Any) -> "Workload":
        """`model`: the architecture and run options (e.g. `plan_memory.model_from_trainer_config(config)`)."""
        d, t = config.data, config.train
        side = max(2, int(math.isqrt(int(d.max_pixels))) // (PATCH * 2) * 2)
        kw: dict[str, Any] = dict(config=config, model=model, image_grid=(side, side),
                                  micro_batches=int(t.grad_accum_steps),
                                  micro_rows=int(t.batch_size) // int(t.grad_accum_steps),
                                  weight_major=weight_major)
        if config.get("mode", "sft") == "grpo":
            g, s = config.grpo, grpo_step.GRPOSettings.from_config(config)
            kw.update(rollout_prompts=int(s.rollout_micro_batch or g.rollout_batch_prompts),
                      num_samples=int(s.num_samples), prompt_len=int(d.max_prompt_length),
                      new_tokens=int(s.max_new_tokens),
                      cache_new_tokens=sampler.new_token_bucket(int(s.max_new_tokens)),
                      seq_len=int(d.max_prompt_length) + int(s.max_new_tokens),
                      use_ref=s.use_ref, ref_dtype=str(g.ref_dtype), old_logprobs=grpo_step.old_logprob_source(s))
        else:
            kw.update(seq_len=int(d.max_length))
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **kw: Any) -> "Workload":
        return dataclasses.replace(self, **kw)

    def trainer_config(self) -> Any:
        """The trainer config with this workload's batch sizes (`replace` may have changed them)."""
        c = self.config.copy_and_resolve_references()
        with c.unlocked():
            c.train.batch_size, c.train.grad_accum_steps = self.micro_rows * self.micro_batches, self.micro_batches
            if self.mode == "grpo":
                c.grpo.rollout_micro_batch, c.grpo.num_samples = self.rollout_prompts, self.num_samples
                c.grpo.max_new_tokens = self.new_tokens
        return c


# --------------------------------------------------------------------------------------- host batches
def _image_ids(model, grid: tuple[int, int], text: int) -> np.ndarray:
    """<|vision_start|> <|image_pad|>*k <|vision_end|> then `text` ordinary tokens."""
    k = grid[0] * grid[1] // model.vision.spatial_merge_size ** 2
    return np.concatenate([[model.vision_start_token_id], np.full(k, model.image_token_id),
                           [model.vision_end_token_id], np.full(text, TEXT_ID)]).astype(np.int32)


def synthetic_prompts(w: Workload, num: int) -> PromptBatch:
    """The `PromptBatch` of `num` full-length image prompts (one-column patches)."""
    m = w.model
    image_tokens = w.image_patches // m.vision.spatial_merge_size ** 2
    text = w.prompt_len - image_tokens - 2
    if text < 1:
        raise ValueError(f"data.max_prompt_length={w.prompt_len} does not hold an image of {image_tokens} tokens")
    ids = np.tile(_image_ids(m, w.image_grid, text), (num, 1))
    mask = np.ones_like(ids)
    grids = np.tile(np.array([[1, *w.image_grid]], np.int64), (num, 1))
    pos, deltas = layout.mrope_positions(ids, grids, mask, spatial_merge_size=m.vision.spatial_merge_size,
                                         image_token_id=m.image_token_id,
                                         vision_start_token_id=m.vision_start_token_id)
    px = tuple(s * PATCH for s in w.image_grid)
    return PromptBatch(input_ids=ids, attention_mask=mask, position_ids=pos, rope_deltas=deltas,
                       patches=(np.zeros((w.image_patches, 1), np.float32),) * num, grids=grids,
                       records=tuple({"id": str(i)} for i in range(num)), image_hw=((px, px),) * num,
                       max_pixels=int(w.config.data.max_pixels))


def layout_step(w: Workload, mesh, rules, graphdef: Any = None, rest: Any = None) -> grpo_step.GRPOStep:
    """The trainer's `GRPOStep` for a workload's sizes, for its host layout (`rollout_batches`,
    `update_shape`, `micro_batch`: they read neither the model, nor a tokenizer, nor the reward, so a
    workload without them passes none) and, given the graph, its jitted log-prob forward."""
    return grpo_step.GRPOStep(grpo_step.GRPOSettings.from_config(w.trainer_config()), graphdef, rest, w.model,
                              mesh, rules, stop_ids=STOP_IDS, pad_id=PAD_ID)


def rollout_host_batch(w: Workload, mesh, rules) -> dict[str, np.ndarray]:
    """One generate call's prompt batch (`w.rollout_prompts` prompts), as `GRPOStep.rollout_batches`
    lays it out."""
    return layout_step(w, mesh, rules).rollout_batches(synthetic_prompts(w, w.rollout_prompts))[0]


def grpo_host_batch(w: Workload, mesh, rules, *, forward: bool = False) -> dict[str, np.ndarray]:
    """One update micro-batch (or, `forward`, one log-prob forward micro-batch) as `GRPOStep.update`
    (`train_batch`) builds it: prompts + full-length responses, image groups per data-parallel device."""
    rows, T = w.micro_rows, w.new_tokens
    f32 = np.float32
    step = layout_step(w, mesh, rules)
    prompts = synthetic_prompts(w, rows)
    mask = np.ones((rows, T), np.int32)
    rollout = grpo_step.Rollout(prompts, np.arange(rows), np.full((rows, T), TEXT_ID, np.int32), mask,
                                np.zeros((rows, T), f32), ("",) * rows, static_stats(mask.sum(axis=1), [rows], 0.0))
    zeros = np.zeros((rows, T), f32)
    batch = grpo_step.TrainBatch(grpo_step.ScoredRollout(rollout, np.zeros(rows, f32), {}), np.zeros(rows, f32),
                                 mask, None if w.old_logprobs == "update" else zeros, zeros if w.use_ref else None,
                                 kl_coef=1e-3)
    return step.micro_batch(batch, np.arange(rows), step.update_shape(prompts),
                            loss_normalizer=None if forward else T)


def sft_host_batch(w: Workload, mesh, rules) -> dict[str, np.ndarray]:
    """One SFT micro-batch through `sft.host_batch` (the trainer's host path, one image group and one
    target list per data-parallel device): image, 256 prompt tokens, the response up to `data.max_length`."""
    m, rows = w.model, w.micro_rows
    image_tokens = w.image_patches // m.vision.spatial_merge_size ** 2
    text = w.seq_len - image_tokens - 2
    prompt = min(256, text // 2)
    ids = np.tile(_image_ids(m, w.image_grid, text), (rows, 1))
    mask = np.ones_like(ids)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, image_tokens + 2 + prompt:] = 1
    grid = np.tile(np.array([[1, *w.image_grid]], np.int64), (rows, 1))
    pos, _ = layout.mrope_positions(ids, grid, mask, spatial_merge_size=m.vision.spatial_merge_size,
                                    image_token_id=m.image_token_id, vision_start_token_id=m.vision_start_token_id)
    raw = dict(input_ids=ids, attention_mask=mask, position_ids=pos.astype(np.int32), loss_mask=loss_mask,
               pixel_values=np.zeros((rows * w.image_patches, 1), np.float32), image_grid_thw=grid)
    batch, _ = sft.host_batch([raw], m, groups=shd.data_parallel_size(mesh, rules))
    return batch


# ------------------------------------------------------------------------------------- abstract arrays
def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_batch(host: dict[str, np.ndarray], mesh, rules, *, model, micro_batches: int = 1,
                   dtypes: dict[str, Any] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Host fields -> sharded ShapeDtypeStructs (placed by `sharding.batch_shardings`, as `put_batch`
    does), with a leading micro-batch axis when `micro_batches` > 1 and pixel_values at the model's
    patch width."""
    shapes = {}
    for k, v in host.items():
        shape = tuple(np.shape(v))
        if k == "pixel_values":
            shape = shape[:-1] + (model.vision.patch_dim,)
        dtype = (dtypes or {}).get(k, np.asarray(v).dtype)
        shapes[k] = jax.ShapeDtypeStruct(((micro_batches,) if micro_batches > 1 else ()) + shape, dtype)
    rows = np.shape(host["input_ids"])[0]
    sh = shd.batch_shardings(shapes, mesh, rules, batch_size=rows, micro_batched=micro_batches > 1)
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh[k]) for k, s in shapes.items()}


def tree_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard per device)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "shape"):
            continue
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


# --------------------------------------------------------------------------------------------- phases
class PhasePrograms:
    """Abstract state and the lowered phase programs of a workload on `mesh`."""

    def __init__(self, w: Workload, mesh, rules: Any = None):
        self.w, self.mesh = w, mesh
        self.rules = shd.resolve_rules(rules if rules is not None else w.config.get("sharding", {}).get("rules"))
        self.graphdef, state, _ = shd.abstract_state(lambda: Qwen25VL(w.model, rngs=nnx.Rngs(0)), mesh, self.rules)
        self.params, self.rest = step_lib.split_state(state)
        self.tx, _ = common.run_optimizer(w.config, self.params, total_updates=1000)
        opt = jax.eval_shape(self.tx.init, self.params)
        self.opt_state = _abstract(opt, shd.tree_shardings(opt, mesh, self.rules))
        ref = jnp.dtype(w.model.param_dtype if w.ref_dtype == "param" else w.ref_dtype)
        self.ref_params = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, ref if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
                                           sharding=a.sharding), self.params)

    # -- resident state ---------------------------------------------------------------------------
    def resident(self) -> dict[str, int]:
        """Per-device bytes of what a run keeps between phases."""
        out = {"params": tree_device_bytes(self.params), "rest": tree_device_bytes(self.rest),
               "optimizer": tree_device_bytes(self.opt_state)}
        out["reference"] = tree_device_bytes(self.ref_params) if self.w.use_ref else 0
        return out

    def resident_extra(self, phase: str) -> int:
        """Resident bytes that are not arguments of `phase`'s program (they sit beside it)."""
        r = self.resident()
        passed = {"rollout": ("params", "rest"), "prefill": ("params", "rest"), "logprobs": ("params", "rest"),
                  "ref_logprobs": ("reference", "rest"), "update": ("params", "rest", "optimizer"),
                  "sft": ("params", "rest", "optimizer")}[phase]
        return sum(v for k, v in r.items() if k not in passed)

    # -- programs ---------------------------------------------------------------------------------
    def lower(self, phase: str, *, images: bool = True):
        """The lowered program of `phase` (`images=False`: the same program on text-only rows of the
        same length, for splitting cost between the towers)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; phases are {PHASES}")
        fn, args = getattr(self, f"_{phase}")(images)
        with shd.activate(self.mesh, self.rules):
            return fn(*args)

    def _without_images(self, host: dict, images: bool) -> dict:
        if images:
            return host
        return {k: v for k, v in host.items() if k != "pixel_values" and not k.startswith("vision_")}

    def _rollout_fields(self, images: bool) -> dict:
        host = self._without_images(rollout_host_batch(self.w, self.mesh, self.rules), images)
        keep = ("input_ids", "attention_mask", "position_ids", "rope_deltas", "pixel_values")
        host = {k: v for k, v in host.items()
                if k in keep or (k.startswith("vision_") and k[len("vision_"):] in sampler.VISION_KEYS)}
        dtypes = {k: np.float32 if k == "pixel_values" else np.int32 for k in host}
        return abstract_batch(host, self.mesh, self.rules, model=self.w.model, dtypes=dtypes)

    def _rollout(self, images: bool) -> tuple[Callable, tuple]:
        w, g = self.w, self.w.config.grpo
        sampling = SamplingConfig(temperature=float(g.temperature), top_p=float(g.top_p))
        fn = sampler._compiled(  # pylint: disable=protected-access -- the sampler's own jitted program
            self.graphdef, num_samples=w.num_samples, new_tokens=w.cache_new_tokens, greedy=sampling.greedy,
            top_k=int(sampling.top_k), use_top_p=sampling.top_p < 1.0,
            stop_ids=STOP_IDS, pad_id=PAD_ID, return_logits=False, weight_major=w.weight_major)
        state = (self.params, self.rest)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)  # noqa: E731
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
        decode = self._decode_weights(state) if w.weight_major else None
        args = (state, self._rollout_fields(images), key, scalar(jnp.float32), scalar(jnp.float32),
                scalar(jnp.int32), decode, scalar(jnp.int32))   # as `rollout.generate` passes them
        return fn.lower, args

    def _decode_weights(self, state):
        """Abstract `sampler.decode_weights(graphdef, state)`, placed as its jitted maker places them."""
        maker = sampler._decode_weights_fn(self.graphdef)  # pylint: disable=protected-access
        with shd.activate(self.mesh, self.rules):
            out = maker.lower(state).compile().output_shardings
        shapes = jax.eval_shape(maker, state)
        return _abstract(shapes, out)

    def _prefill(self, images: bool) -> tuple[Callable, tuple]:
        w, graphdef = self.w, self.graphdef
        fn = jax.jit(lambda p, r, b: sampler.prefill(nnx.merge(graphdef, p, r), b,
                                                     w.prompt_len + w.cache_new_tokens))
        return fn.lower, (self.params, self.rest, self._rollout_fields(images))

    def _forward_batch(self, images: bool) -> dict:
        host = self._without_images(grpo_host_batch(self.w, self.mesh, self.rules, forward=True), images)
        return abstract_batch(host, self.mesh, self.rules, model=self.w.model)

    def _logprob_fn(self) -> Callable:
        """The jitted log-prob forward of the trainer's `GRPOStep` (old-policy and reference log-probs)."""
        step = layout_step(self.w, self.mesh, self.rules, self.graphdef, self.rest)
        return step.logprob_fn

    def _logprobs(self, images: bool) -> tuple[Callable, tuple]:
        return self._logprob_fn().lower, (self.params, self.rest, self._forward_batch(images))

    def _ref_logprobs(self, images: bool) -> tuple[Callable, tuple]:
        return self._logprob_fn().lower, (self.ref_params, self.rest, self._forward_batch(images))

    def _update(self, images: bool) -> tuple[Callable, tuple]:
        w = self.w
        host = self._without_images(grpo_host_batch(w, self.mesh, self.rules), images)
        batch = abstract_batch(host, self.mesh, self.rules, model=w.model, micro_batches=w.micro_batches)
        step = grpo_step.make_grpo_step(w.trainer_config(), self.graphdef, self.tx, self.params, self.rest,
                                        self.mesh, self.rules)
        return step.lower, (self.params, self.opt_state, self.rest, batch)

    def _sft(self, images: bool) -> tuple[Callable, tuple]:
        w = self.w
        host = self._without_images(sft_host_batch(w, self.mesh, self.rules), images)
        batch = abstract_batch(host, self.mesh, self.rules, model=w.model, micro_batches=w.micro_batches)
        step = sft.make_sft_step(w.config, self.graphdef, self.tx, self.params, self.rest, self.mesh, self.rules,
                                 micro_batches=w.micro_batches)
        return step.lower, (self.params, self.opt_state, self.rest, batch)


# ------------------------------------------------------------------------------------ XLA's figures
def memory(compiled) -> dict[str, int]:
    """XLA's per-device memory analysis; peak = arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def flops(compiled) -> float:
    """Per-device FLOPs of XLA's cost analysis (a loop body counts once)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
    """{collective: {"count", "bytes"}} from a compiled module's text: the result shapes of every
    all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute instruction (async
    pairs counted at their start; an instruction inside a loop body counts once)."""
    out = {c: {"count": 0, "bytes": 0} for c in COLLECTIVES}
    for line in hlo_text.splitlines():
        if "=" not in line:
            continue
        lhs, rhs = line.split("=", 1)
        op = re.match(r"\s*(?:\([^)]*\)|[\w\[\]{},:. ]*?)\s*([a-z-]+)\(", rhs)
        if not op:
            continue
        name = op.group(1)
        base = name[:-len("-start")] if name.endswith("-start") else name
        if base not in out:
            continue
        result = rhs[:op.start(1)]
        if name.endswith("-start"):   # (operands..., outputs...) tuple: count the second half
            shapes = _SHAPE.findall(result)
            shapes = shapes[len(shapes) // 2:] if len(shapes) > 1 else shapes
        else:
            shapes = _SHAPE.findall(result)
        out[base]["count"] += 1
        out[base]["bytes"] += sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in shapes)
    return out


def run_on_devices(n: int, argv: list[str], *, timeout: float | None = None, capture_stderr: bool = True) -> str:
    """Runs `python argv...` in a child process with `n` simulated CPU devices (XLA reads the device
    count once per process); returns its stdout, raises with its stderr's tail if it fails
    (`capture_stderr=False`: the child's stderr goes to ours as it runs)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = subprocess.run([sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE if capture_stderr else None, text=True, timeout=timeout)
    if out.returncode:
        tail = out.stderr[-3000:] if capture_stderr else "(its stderr is above)"
        raise RuntimeError(f"{' '.join(argv[:3])} ... on {n} devices failed ({out.returncode}):\n{tail}")
    return out.stdout
