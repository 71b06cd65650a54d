"""Batched generation with a preallocated KV cache: one prefill, then a `lax.while_loop` of decode steps.

    prompts = prompt_batch(config, input_ids, attention_mask, pixel_values=..., image_grid_thw=..., pad_id=...)
    out = generate(graphdef, state, prompts, max_new_tokens=800, num_samples=4,
                   sampling=SamplingConfig(temperature=0.8), rng=0, stop_ids=(151645, 151643), pad_id=151643)
    out.tokens [B*n, T], out.logprobs [B*n, T], out.lengths [B*n], out.stopped [B*n]

How it works (one jitted program per (batch, prompt-length, patch, new-token) bucket):
  * prefill: the left-padded prompts and their images go through the model once, writing the prompt's
    keys/values into a cache of `L + T` slots (images are encoded here and only here);
  * `n` samples per prompt: the prefilled cache, the last logits and the positions are repeated to
    B*n rows (row `i*n + j` is sample j of prompt i), so the prompt is never recomputed;
  * decode: a `lax.while_loop` samples a token for every row, writes it, and runs the model on it (T = 1)
    until every row has emitted a stop id or `max_new_tokens` is reached. Rows that stopped keep running
    (static shapes) but emit `pad_id` and are masked out of the outputs.
  * on CPU the decode steps run on `model.decode_view()`: transposed copies of the decoder weights that
    XLA:CPU streams ~2x faster for a few rows (text.py, "Decoding layout"). They are made once per set
    of weights and kept until other weights come (`decode_weights`): repeated calls on the same weights
    (evaluation, generation) skip the copy; a trainer's new weights after each update make a new one.
  * M-RoPE positions during decoding follow HF's `generate`: the k-th real token of a row (counting the
    prompt's unpadded tokens from 0) sits at k + rope_delta on all three axes, rope_delta coming from
    `layout.mrope_positions` of the prompt.

Sharded use: pass the mesh and rules the state is sharded with; the batch rows are split over the
data-parallel axes (`sharding.batch_shardings`), and so are the image groups (`prompt_batch(groups=...)`)
and their layout; the stacked cache is constrained to (layers, batch, -, kv_heads, -).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl import layout as layout_lib
from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from vlaa_jax.models.qwen2_5_vl.text import KVCache
from vlaa_jax.rollout.sampling import SamplingConfig, choose, row_keys

VISION_KEYS: tuple[str, ...] = layout_lib.VisionLayout._fields
# Compiled new-token lengths: a request is rounded up to the next bucket (then stopped at its own count).
NEW_TOKEN_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 800, 1024, 2048, 4096)
CACHE_AXES = ("layers", "batch", None, "kv_heads", None)   # stacked keys / values [L, B, S, K, H]


class Generation(NamedTuple):
    """Host results; rows are prompt-major (row i*n + j = sample j of prompt i)."""
    tokens: np.ndarray        # int32 [R, T] generated ids (the stop token included), pad_id after the end
    logprobs: np.ndarray      # float32 [R, T] log-prob of the token under the sampling policy (after
                              # temperature / top-k / top-p); 0 after the end
    lengths: np.ndarray       # int32 [R] number of generated tokens (stop token included)
    stopped: np.ndarray       # bool [R] True: ended with a stop id; False: truncated at max_new_tokens
    logits: np.ndarray | None = None  # float32 [R, T, V] raw logits each token was drawn from (return_logits)

    @property
    def mask(self) -> np.ndarray:
        """int32 [R, T] 1 on generated tokens (up to and including the stop token)."""
        return (np.arange(self.tokens.shape[1])[None] < self.lengths[:, None]).astype(np.int32)

    @property
    def truncated(self) -> np.ndarray:
        return ~self.stopped


# ---------------------------------------------------------------------------------------- host layout

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def new_token_bucket(max_new_tokens: int, buckets: Sequence[int] = NEW_TOKEN_BUCKETS) -> int:
    """The compiled decode length for a request of `max_new_tokens`."""
    return next((b for b in sorted(buckets) if b >= max_new_tokens), max_new_tokens)


def prompt_batch(config: Qwen25VLConfig, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
                 pixel_values: np.ndarray | None = None, image_grid_thw: np.ndarray | None = None,
                 pad_id: int, length_multiple: int = 64, patch_multiple: int = 256, groups: int = 1
                 ) -> dict[str, np.ndarray]:
    """Host arrays of a prompt batch in the loader's field names, ready for `generate`.

    The unpadded tokens of every row (attention_mask 1; the input may be left- or right-padded) are
    left-padded to a multiple of `length_multiple`; pixel patches are padded to a multiple of
    `patch_multiple` (compiled buckets). Fields: input_ids, attention_mask [B, L], position_ids [3, B, L],
    rope_deltas [B, 1] and, with images, pixel_values [G, P, patch_dim] and vision_<VisionLayout field>
    [G, ...]: the images as `groups` image groups of B // groups rows (`layout.grouped_vision`; pass the
    data-parallel size of the mesh so that every device encodes only its own rows' images)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"prompt input_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    B = ids.shape[0]
    lens = mask.sum(1)
    if (lens == 0).any():
        raise ValueError(f"prompt rows {np.flatnonzero(lens == 0).tolist()} have no tokens")
    L = _round_up(int(lens.max()), length_multiple)
    out_ids = np.full((B, L), pad_id, np.int32)
    out_mask = np.zeros((B, L), np.int32)
    for b in range(B):
        out_ids[b, L - lens[b]:] = ids[b][mask[b]]
        out_mask[b, L - lens[b]:] = 1
    pos, deltas = layout_lib.mrope_positions(
        out_ids, image_grid_thw, out_mask, spatial_merge_size=config.vision.spatial_merge_size,
        image_token_id=config.image_token_id, vision_start_token_id=config.vision_start_token_id)
    batch = dict(input_ids=out_ids, attention_mask=out_mask, position_ids=pos.astype(np.int32),
                 rope_deltas=deltas.astype(np.int32))
    if pixel_values is not None:
        v = config.vision
        pv = np.asarray(pixel_values, np.float32)
        grids = layout_lib.valid_grids(image_grid_thw)
        if int(np.prod(grids, axis=1).sum()) != pv.shape[0]:
            raise ValueError(f"pixel_values has {pv.shape[0]} patches; image_grid_thw implies "
                             f"{int(np.prod(grids, axis=1).sum())}")
        if B % groups:
            raise ValueError(f"{groups} image groups do not divide the prompt batch of {B} rows")
        member = layout_lib.image_rows(out_ids, grids, image_token_id=config.image_token_id,
                                       spatial_merge_size=v.spatial_merge_size) // (B // groups)
        largest = max(int(np.prod(grids[member == g], axis=1).sum()) for g in range(groups))
        P = _round_up(max(largest, 1), int(np.lcm(patch_multiple, v.spatial_merge_size ** 2)))
        pv, lay = layout_lib.grouped_vision(pv, grids, member, groups, patch_size=v.patch_size,
                                            spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                                            num_patches_padded=P, full_rows=True)
        batch["pixel_values"] = pv
        batch.update({f"vision_{k}": np.asarray(x, np.int32) for k, x in lay._asdict().items() if x is not None})
    return batch


# ------------------------------------------------------------------------------------------- device

def _merge(graphdef: nnx.GraphDef, state: Any):
    return nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(graphdef, state)


def _constrain_cache(cache: KVCache) -> KVCache:
    return cache._replace(k=shd.constrain(cache.k, CACHE_AXES), v=shd.constrain(cache.v, CACHE_AXES),
                          segments=shd.constrain(cache.segments, ("batch", None)))


def prefill(model: Any, prompts: Mapping[str, jax.Array], cache_len: int, head: Any = None
            ) -> tuple[KVCache, jax.Array]:
    """Runs the prompts (and encodes their images) into a fresh cache of `cache_len` slots; the top layer
    computes its queries, attention output and MLP for the last prompt token only (`last_only`).
    Returns (cache, float32 logits of the last prompt token [B, V] from `head`, default `model`)."""
    ids = prompts["input_ids"]
    cache = _constrain_cache(model.init_cache(ids.shape[0], cache_len))
    vision = None
    if prompts.get("pixel_values") is not None:
        vision = layout_lib.layout_from_fields(prompts)
    hidden, cache = model.forward(ids, prompts["position_ids"], prompts["attention_mask"],
                                  pixel_values=prompts.get("pixel_values"), vision=vision, cache=cache,
                                  return_hidden=True, last_only=True)
    return _constrain_cache(cache), (head or model).logits(hidden[:, -1])


def _generate(state, prompts, rng, temperature, top_p, limit, decode_weights, row_offset=0, *, graphdef, num_samples: int,
              new_tokens: int, greedy: bool, top_k: int, use_top_p: bool, stop_ids: tuple[int, ...], pad_id: int,
              return_logits: bool = False, weight_major: bool = False):
    model = _merge(graphdef, state)
    B, L = prompts["input_ids"].shape
    R = B * num_samples
    step_model = model.decode_view(decode_weights) if weight_major else model
    cache, logits = prefill(model, prompts, L + new_tokens, head=step_model)

    rep = lambda x, axis=0: jnp.repeat(x, num_samples, axis=axis)  # noqa: E731
    if num_samples > 1:      # the stacked keys / values have their rows on axis 1
        cache = _constrain_cache(KVCache(k=rep(cache.k, 1), v=rep(cache.v, 1),
                                         segments=rep(cache.segments), index=cache.index))
        logits = rep(logits)
    start = rep(layout_lib.response_start(prompts["attention_mask"], prompts["rope_deltas"]))
    keys = row_keys(rng, R, row_offset)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    ones = jnp.ones((R, 1), jnp.int32)

    def more(t, done):
        """Is token t still to be drawn?"""
        return (t < limit) & ~jnp.all(done)

    def body(c):
        t, cache, logits, tokens, lp, done, lengths, *seen = c
        if return_logits:
            seen = [jax.lax.dynamic_update_slice(seen[0], logits[:, None], (0, t, 0))]
        tok, tok_lp = choose(logits, keys, t, greedy=greedy, temperature=temperature, top_k=top_k,
                                      top_p=top_p if use_top_p else None)
        active = ~done
        tok = jnp.where(active, tok, pad_id)
        write = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, t))  # noqa
        tokens = write(tokens, tok)
        lp = write(lp, jnp.where(active, tok_lp, 0.0))
        lengths = lengths + active.astype(jnp.int32)
        done = done | (active & jnp.isin(tok, stops))

        def step(cache):
            pos = jnp.broadcast_to((start + t)[None, :, None], (3, R, 1))
            hidden, cache = step_model.forward(tok[:, None], pos, ones, cache=cache, return_hidden=True)
            return _constrain_cache(cache), shd.constrain(step_model.logits(hidden[:, 0]), ("batch", "vocab"))

        # The model runs on the new token only if another token will be drawn (the last step is free).
        cache, logits = jax.lax.cond(more(t + 1, done), step, lambda c: (c, logits), cache)
        return (t + 1, cache, logits, tokens, lp, done, lengths, *seen)

    init = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((R, new_tokens), pad_id, jnp.int32),
            jnp.zeros((R, new_tokens), jnp.float32), jnp.zeros((R,), bool), jnp.zeros((R,), jnp.int32))
    if return_logits:
        init += (jnp.zeros((R, new_tokens, logits.shape[-1]), jnp.float32),)
    _, _, _, tokens, lp, done, lengths, *seen = jax.lax.while_loop(lambda c: more(c[0], c[5]), body, init)
    return (tokens, lp, lengths, done, *seen)


_DECODE_WEIGHTS: dict[str, Any] = {}    # at most one entry: (key, weak refs to the state's arrays, weights)


def decode_weights(graphdef: nnx.GraphDef, state: Any) -> Any:
    """`Qwen25VL.decode_weights()` of this state, kept while the state's arrays are the same objects (weak
    references: a trainer's new parameters are new arrays, so they get new copies and the old copy is
    dropped first). The one copy held costs the decoder's weights in memory between calls; call
    `release_decode_weights()` to free it."""
    leaves = jax.tree.leaves(state)
    key = (graphdef, tuple(map(id, leaves)))
    hit = _DECODE_WEIGHTS.get("entry")
    if hit is not None and hit[0] == key and all(r() is x for r, x in zip(hit[1], leaves)):
        return hit[2]
    release_decode_weights()
    weights = _decode_weights_fn(graphdef)(state)
    try:
        refs = [weakref.ref(x) for x in leaves]
    except TypeError:          # a leaf that cannot be weakly referenced: do not keep the copy
        return weights
    _DECODE_WEIGHTS["entry"] = (key, refs, weights)
    return weights


def release_decode_weights() -> None:
    """Frees the decode-layout copy `decode_weights` keeps."""
    _DECODE_WEIGHTS.clear()


@functools.lru_cache(maxsize=8)
def _decode_weights_fn(graphdef):
    return jax.jit(lambda state: _merge(graphdef, state).decode_weights())


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, **static):
    return jax.jit(functools.partial(_generate, graphdef=graphdef, **static))


def generate(graphdef: nnx.GraphDef, state: Any, prompts: Mapping[str, Any], *, max_new_tokens: int,
             num_samples: int = 1, sampling: SamplingConfig | Mapping[str, Any] | None = None,
             rng: int | jax.Array = 0, stop_ids: Sequence[int], pad_id: int,
             mesh: jax.sharding.Mesh | None = None, rules: Any = None,
             new_token_buckets: Sequence[int] = NEW_TOKEN_BUCKETS, return_logits: bool = False,
             weight_major: bool | None = None, row_offset: int = 0) -> Generation:
    """Samples `num_samples` continuations of every prompt.

    graphdef, state: `nnx.split(model)` (state may also be a tuple of states, e.g. (params, rest)).
    prompts: `prompt_batch(...)` output or a loader GRPO batch with the same fields (left-padded
        input_ids / attention_mask [B, L], position_ids [3, B, L], rope_deltas [B, 1], optional
        pixel_values + vision_* layout); extra fields are ignored.
    sampling: `SamplingConfig` (temperature 0 = greedy). rng: int seed or PRNG key; row r uses
        fold_in(rng, row_offset + r), so results do not depend on the mesh or on the other rows (a caller
        that splits a batch into several calls passes each call's first row as `row_offset`: the same
        tokens as one call).
    stop_ids, pad_id: the chat format's (`data_pipeline.tokenizer.stop_ids` / `pad_id` of the tokenizer);
        a row ends at its first stop id, later slots hold pad_id.
    mesh, rules: the mesh / rules the state is sharded with (B and B*n must divide the data-parallel size).
    return_logits: also return the raw logits of every step ([R, T, vocab] float32: for tests and
        debugging, not for rollouts at the real vocabulary).
    weight_major: decode on `model.decode_view()` (transposed weight copies: ~2x faster decode steps on
        CPU, one extra copy of the decoder weights in memory, kept for the next call on the same
        weights, see `decode_weights`). None: on CPU only.
    """
    sampling = SamplingConfig.from_any(sampling)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    missing = [k for k in ("input_ids", "attention_mask", "position_ids", "rope_deltas") if k not in prompts]
    if missing:
        raise KeyError(f"prompt batch lacks fields {missing} (build it with rollout.prompt_batch)")
    stop_ids = tuple(int(s) for s in stop_ids)
    fields = {k: np.asarray(v) for k, v in prompts.items()
              if k in ("input_ids", "attention_mask", "position_ids", "rope_deltas", "pixel_values")
              or (k.startswith("vision_") and k[len("vision_"):] in VISION_KEYS)}
    fields = {k: v.astype(np.float32 if k == "pixel_values" else np.int32) for k, v in fields.items()}
    new_tokens = new_token_bucket(int(max_new_tokens), new_token_buckets)
    weight_major = jax.default_backend() == "cpu" if weight_major is None else bool(weight_major)
    fn = _compiled(graphdef, num_samples=int(num_samples), new_tokens=new_tokens, greedy=sampling.greedy,
                   top_k=int(sampling.top_k), use_top_p=sampling.top_p < 1.0, stop_ids=stop_ids, pad_id=int(pad_id),
                   return_logits=bool(return_logits), weight_major=weight_major)
    key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
    args = (key, jnp.float32(sampling.temperature or 1.0), jnp.float32(sampling.top_p), jnp.int32(max_new_tokens),
            decode_weights(graphdef, state) if weight_major else None, jnp.int32(row_offset))
    if mesh is not None:
        B = fields["input_ids"].shape[0]
        shd.check_batch_divisible(B, mesh, rules, what="prompt batch size")
        fields = shd.shard_batch(fields, shd.batch_shardings(fields, mesh, rules, batch_size=B))
        with shd.activate(mesh, rules):
            out = fn(state, fields, *args)
    else:
        out = fn(state, fields, *args)
    tokens, lp, lengths, done, *seen = jax.device_get(out)
    T = int(max_new_tokens)
    return Generation(np.asarray(tokens[:, :T], np.int32), np.asarray(lp[:, :T], np.float32),
                      np.asarray(lengths, np.int32), np.asarray(done, bool),
                      np.asarray(seen[0][:, :T], np.float32) if seen else None)


def concat_generations(parts: Sequence[Generation], pad_id: int) -> Generation:
    """The rows of several `generate` calls (micro-batches of prompts) as one Generation, in order; a
    narrower part is padded on the right with pad_id tokens and log-prob 0 (past its end)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.tokens.shape[1] for p in parts)

    def pad(x: np.ndarray, value) -> np.ndarray:
        return np.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    logits = None if any(p.logits is None for p in parts) else np.concatenate([pad(p.logits, 0.0) for p in parts])
    return Generation(np.concatenate([pad(p.tokens, pad_id) for p in parts]),
                      np.concatenate([pad(p.logprobs, 0.0) for p in parts]),
                      np.concatenate([p.lengths for p in parts]), np.concatenate([p.stopped for p in parts]), logits)

