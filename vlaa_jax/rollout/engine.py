"""Continuous batching for rollouts and evaluation: a fixed pool of decode slots; a slot whose row has
finished takes the next waiting request, so decode steps do real work instead of padding behind the
longest response of a static batch.

    engine = Engine(graphdef, mcfg, slots=256, stop_ids=stop_ids, pad_id=pad_id,
                    sampling=SamplingConfig(temperature=0.8))
    gen, stats = engine.generate(state, PromptSource.from_prompts(mcfg, prompts, pad_id=pad_id),
                                 num_samples=4, max_new_tokens=1024, rng=key)
    gen: a `Generation` in request order (row i*n + j = sample j of prompt i); stats: `EngineStats`

Why: the static sampler (sampler.py) decodes a batch until its LAST row stops. R1-style responses have
a long tail (a few rows run to the cap), so most of its slot-steps decode padding (about 43% are real
tokens at the paper's lengths; benchmarks/rollout.py measures both).

How: a host loop over a few jitted programs on one `SlotState` (static shapes: S slots of `cache_len`
cache slots and T output columns, one compiled decode program per pool shape):
  * stage + place: when free slots outnumber the samples already prefilled, a prefill program runs the
    next prompts (with their images, up to `prefill_prompts` at once) into a staged buffer; a place
    program copies a staged prompt's keys / values, last logits and M-RoPE start into each free slot, one
    slot per sample, as slots free up (the n samples of a prompt share its one prefill; a prompt leaves
    the buffer when its last sample has a slot).
  * decode: a `lax.while_loop` of decode steps over all S slots. Each slot has its own cache write
    position (`KVCache.index` [S]), valid cache slots (segments), token count, limit (its request's
    `max_new_tokens`) and PRNG stream; a row ends at a stop id or at its limit. The loop hands back to
    the host as soon as a slot is free while samples wait (or when every slot is idle); the host copies
    the finished rows out and places the next samples.
  * compact: once no prompt waits, the pool halves whenever at most half its slots still decode (the
    busy rows are gathered into a pool of S/2, S/4, ... slots), so the tail of long responses runs on
    few rows instead of beside idle ones.
Attention reads each row's own filled slots through the segment ids: a masked read over the pool's
cache length, as the static sampler does (the splash kernel takes the same mask on TPU).

Same numbers as the static sampler: row r of a call draws its t-th token with
fold_in(fold_in(rng, row_offset + r), t), and its logits do not depend on its neighbours, so the tokens
do not depend on the slot, the pool size or the order of insertion (tests/rollout/test_engine.py).

Sharded use: pass the mesh / rules of the state; the slots are split over the data-parallel axes (S
and each prefill batch a multiple of the data-parallel size), the stacked cache as in the sampler.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl import layout as layout_lib
from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from vlaa_jax.models.qwen2_5_vl.text import KVCache, init_cache
from vlaa_jax.rollout import sampler as sampler_lib
from vlaa_jax.rollout.sampling import SamplingConfig, choose

# Compiled prefill shapes of `PromptSource.from_prompts`: prompt widths and image-group patches rounded
# up to these. Refills prefill few prompts at a time, so the patch rounding is finer than the static
# sampler's 256 (one 56x56 image has 16 patches: 256 made a one-prompt prefill's vision tower 16x too big).
LENGTH_MULTIPLE = 64
PATCH_MULTIPLE = 64
PREFILL_PROMPTS = 16       # default most prompts per prefill call
PREFILL_AHEAD = 4          # fewest prompts per prefill call while that many wait: a prefill of one prompt
                           # costs nearly what one of four does (weights read once), and the staged
                           # samples then fill the next free slots with no prefill at all


# ------------------------------------------------------------------------------------------ hand-offs
@dataclasses.dataclass(frozen=True)
class PromptSource:
    """The prompts of one `Engine.generate` call: how many, the width (columns) of their widest layout,
    and the host layout of any of them (`layout(prompt indices, image groups)` -> the fields of
    `sampler.prompt_batch`: left-padded input_ids / attention_mask, position_ids, rope_deltas and the
    image groups' pixel_values + vision_* layout)."""
    num_prompts: int
    width: int
    layout: Callable[[np.ndarray, int], dict]

    def __len__(self) -> int:
        return self.num_prompts

    @classmethod
    def from_prompts(cls, config: Qwen25VLConfig, prompts: Sequence[tuple[Any, Any, Any]], *, pad_id: int,
                     length_multiple: int = LENGTH_MULTIPLE, patch_multiple: int = PATCH_MULTIPLE
                     ) -> "PromptSource":
        """Prompts as (token ids [L], pixel_values [p, patch_dim] or None, image_grid_thw [k, 3] or None)."""
        prompts = [(np.asarray(ids, np.int32).reshape(-1), pv, grid) for ids, pv, grid in prompts]
        if not prompts:
            raise ValueError("no prompts to generate from")
        empty = [i for i, (ids, _, _) in enumerate(prompts) if ids.size == 0]
        if empty:
            raise ValueError(f"prompts {empty} have no tokens")

        def layout(idx: np.ndarray, groups: int) -> dict:
            rows = [prompts[i] for i in idx]
            width = max(len(ids) for ids, _, _ in rows)
            ids = np.full((len(rows), width), pad_id, np.int32)
            mask = np.zeros((len(rows), width), np.int32)
            for r, (row, _, _) in enumerate(rows):
                ids[r, :len(row)], mask[r, :len(row)] = row, 1
            images = [(pv, g) for _, pv, g in rows if pv is not None]
            pv = np.concatenate([np.asarray(p, np.float32) for p, _ in images]) if images else None
            grid = np.concatenate([np.asarray(g).reshape(-1, 3) for _, g in images]) if images else None
            return sampler_lib.prompt_batch(config, ids, mask, pixel_values=pv, image_grid_thw=grid, pad_id=pad_id,
                                            length_multiple=length_multiple, patch_multiple=patch_multiple,
                                            groups=groups if pv is not None else 1)

        width = -(-max(len(ids) for ids, _, _ in prompts) // length_multiple) * length_multiple
        return cls(len(prompts), width, layout)


class SlotState(NamedTuple):
    """The device state of the pool: S slots (rows), each a request's row or free."""
    cache: KVCache           # stacked keys / values [layers, S, C, K, H]; index [S]: next cache slot per row
    logits: jax.Array        # float32 [S, V] logits of each row's next token
    tokens: jax.Array        # int32 [S, T] tokens the row's request has drawn so far
    logprobs: jax.Array      # float32 [S, T] their sampling log-probs
    count: jax.Array         # int32 [S] tokens drawn so far
    limit: jax.Array         # int32 [S] the request's max_new_tokens
    start: jax.Array         # int32 [S] M-RoPE position of the request's first response token
    keys: jax.Array          # [S] the request row's PRNG key
    active: jax.Array        # bool [S] still decoding
    stopped: jax.Array       # bool [S] ended with a stop id


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What one `generate` call did (GRPO logs these per rollout as rollout/<name>)."""
    slots: int
    requests: int              # rows (prompts x samples)
    tokens: int                # real tokens generated (stop tokens included)
    slot_steps: int            # sum over decode steps of the pool's slots at that step
    decode_steps: int
    prefill_calls: int
    prefill_s: float
    decode_s: float
    wall_s: float
    queue_wait_s: float        # mean time a prompt waited for free slots

    @property
    def utilisation(self) -> float:
        """Real tokens per slot-step: 1 = every decode slot produced a token at every step."""
        return self.tokens / max(self.slot_steps, 1)

    def metrics(self) -> dict[str, float]:
        return {"slot_utilisation": self.utilisation, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "tokens_per_s": self.tokens / max(self.wall_s, 1e-9), "queue_wait_s": self.queue_wait_s,
                "decode_steps": float(self.decode_steps), "prefill_calls": float(self.prefill_calls)}


def static_stats(lengths: np.ndarray, call_rows: Sequence[int], wall_s: float) -> EngineStats:
    """The same figures for static `sampler.generate` calls of `call_rows` rows each (rows in order):
    each call decodes until its longest row ends."""
    lengths = np.asarray(lengths)
    bounds = np.cumsum([0, *call_rows])
    steps = [int(lengths[a:b].max(initial=0)) for a, b in zip(bounds[:-1], bounds[1:])]
    return EngineStats(slots=max(call_rows), requests=len(lengths), tokens=int(lengths.sum()),
                       slot_steps=int(sum(s * r for s, r in zip(steps, call_rows))), decode_steps=sum(steps),
                       prefill_calls=len(call_rows), prefill_s=0.0, decode_s=wall_s, wall_s=wall_s, queue_wait_s=0.0)


# --------------------------------------------------------------------------------------------- device
SLOT_AXES = {"logits": ("batch", "vocab"), "tokens": ("batch", None), "logprobs": ("batch", None)}


def _constrain(slots: SlotState) -> SlotState:
    cache = sampler_lib._constrain_cache(slots.cache)
    return slots._replace(cache=cache._replace(index=shd.constrain(cache.index, ("batch",))),
                          **{k: shd.constrain(getattr(slots, k), names) for k, names in SLOT_AXES.items()})


def _empty(slots: int, cache_len: int, new_tokens: int, *, config: Qwen25VLConfig) -> SlotState:
    cache = init_cache(config, slots, cache_len)
    zeros = jnp.zeros((slots,), jnp.int32)
    return _constrain(SlotState(
        cache=cache._replace(index=zeros), logits=jnp.zeros((slots, config.text.vocab_size), jnp.float32),
        tokens=jnp.zeros((slots, new_tokens), jnp.int32), logprobs=jnp.zeros((slots, new_tokens), jnp.float32),
        count=zeros, limit=zeros, start=zeros, keys=jax.random.split(jax.random.key(0), slots),
        active=jnp.zeros((slots,), bool), stopped=jnp.zeros((slots,), bool)))


class Staged(NamedTuple):
    """Prefilled prompts whose samples wait for free slots: what a slot starts from, Q rows."""
    k: jax.Array             # [layers, Q, W, K, H] the prompt's keys / values (W: the source's width)
    v: jax.Array
    segments: jax.Array      # [Q, W] 0 beyond the prompt
    length: jax.Array        # int32 [Q] cache slots the prompt fills (its prefill batch's width)
    logits: jax.Array        # float32 [Q, V] logits of the first response token
    start: jax.Array         # int32 [Q] M-RoPE position of the first response token


def _empty_staged(rows: int, width: int, *, config: Qwen25VLConfig) -> Staged:
    c = init_cache(config, rows, width)
    zeros = jnp.zeros((rows,), jnp.int32)
    return Staged(c.k, c.v, c.segments, zeros, jnp.zeros((rows, config.text.vocab_size), jnp.float32), zeros)


def _stage(state, staged: Staged, prompts, rows, decode_weights, *, graphdef, weight_major: bool,
           cache_len: int) -> Staged:
    """Prefills `prompts` [P, Lp] (with their images) into the staged rows `rows` [P] (Q: unused)."""
    model = sampler_lib._merge(graphdef, state)
    head = model.decode_view(decode_weights) if weight_major else model
    Lp = prompts["input_ids"].shape[1]
    # Prefilled at the pool's cache length (masked beyond the prompt), as the static sampler prefills:
    # the same attention reductions, so the same numbers bit for bit.
    cache, logits = sampler_lib.prefill(model, prompts, cache_len, head=head)
    W = staged.segments.shape[1]
    put = lambda buf, x: buf.at[rows].set(x.astype(buf.dtype), mode="drop")  # noqa: E731
    return Staged(k=staged.k.at[:, rows, :Lp].set(cache.k[:, :, :Lp], mode="drop"),
                  v=staged.v.at[:, rows, :Lp].set(cache.v[:, :, :Lp], mode="drop"),
                  segments=put(staged.segments, jnp.pad(cache.segments[:, :Lp], ((0, 0), (0, W - Lp)))),
                  length=put(staged.length, jnp.full(rows.shape, Lp, jnp.int32)), logits=put(staged.logits, logits),
                  start=put(staged.start, layout_lib.response_start(prompts["attention_mask"], prompts["rope_deltas"])))


def _place(slots: SlotState, staged: Staged, target, source, limits, rows, rng) -> SlotState:
    """Starts request row rows[m] (limit limits[m]) in slot target[m] (S: unused) from staged row source[m]."""
    c = slots.cache
    W = staged.segments.shape[1]
    put = lambda buf, x: buf.at[target].set(x.astype(buf.dtype), mode="drop")  # noqa: E731
    cache = KVCache(k=c.k.at[:, target, :W].set(staged.k[:, source], mode="drop"),
                    v=c.v.at[:, target, :W].set(staged.v[:, source], mode="drop"),
                    segments=put(c.segments, jnp.pad(staged.segments[source], ((0, 0), (0, c.max_len - W)))),
                    index=put(c.index, staged.length[source]))
    keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(rows)
    zeros = jnp.zeros(target.shape, jnp.int32)
    return _constrain(SlotState(
        cache=cache, logits=put(slots.logits, staged.logits[source]), tokens=slots.tokens, logprobs=slots.logprobs,
        count=put(slots.count, zeros), limit=put(slots.limit, limits), start=put(slots.start, staged.start[source]),
        keys=slots.keys.at[target].set(keys, mode="drop"), active=put(slots.active, jnp.ones(target.shape, bool)),
        stopped=put(slots.stopped, jnp.zeros(target.shape, bool))))


def _decode(state, slots: SlotState, refill_at, stops, temperature, top_p, decode_weights, *, graphdef,
            greedy: bool, top_k: int, use_top_p: bool, pad_id: int, weight_major: bool):
    """Decode steps over every slot until at least `refill_at` slots are free (or none is active); a row
    ends at any of `stops` [k] (traced: no program per stop set) or at its limit.
    Returns (steps run, the new state)."""
    model = sampler_lib._merge(graphdef, state)
    step_model = model.decode_view(decode_weights) if weight_major else model
    S, T = slots.tokens.shape
    rows = jnp.arange(S)

    def more(s: SlotState):
        return jnp.any(s.active) & (jnp.sum(~s.active) < refill_at)

    def body(carry):
        steps, s = carry
        tok, lp = choose(s.logits, s.keys, s.count, greedy=greedy, temperature=temperature, top_k=top_k,
                         top_p=top_p if use_top_p else None)
        col = jnp.where(s.active, s.count, T)                  # inactive rows write nothing (dropped)
        tokens = s.tokens.at[rows, col].set(jnp.where(s.active, tok, pad_id), mode="drop")
        logprobs = s.logprobs.at[rows, col].set(lp, mode="drop")
        count = s.count + s.active.astype(jnp.int32)
        hit = s.active & jnp.isin(tok, stops)
        active = s.active & ~hit & (count < s.limit)

        def step(cache):
            pos = jnp.broadcast_to((s.start + count - 1)[None, :, None], (3, S, 1))
            hidden, cache = step_model.forward(tok[:, None], pos, active[:, None].astype(jnp.int32), cache=cache,
                                               return_hidden=True)
            return (sampler_lib._constrain_cache(cache),
                    shd.constrain(step_model.logits(hidden[:, 0]), ("batch", "vocab")))

        # The model runs on the new tokens only while some row will draw another.
        cache, logits = jax.lax.cond(jnp.any(active), step, lambda c: (c, s.logits), s.cache)
        new = SlotState(cache, logits, tokens, logprobs, count, s.limit, s.start, s.keys, active, s.stopped | hit)
        return steps + 1, _constrain(new)

    return jax.lax.while_loop(lambda c: more(c[1]), body, (jnp.zeros((), jnp.int32), slots))


def _take(slots: SlotState, keep: jax.Array) -> SlotState:
    """The slots `keep` (in that order) as a smaller pool."""
    c = slots.cache
    cache = KVCache(k=c.k[:, keep], v=c.v[:, keep], segments=c.segments[keep], index=c.index[keep])
    return _constrain(SlotState(cache, *(getattr(slots, f)[keep] for f in SlotState._fields[1:])))


@functools.lru_cache(maxsize=16)
def _programs(graphdef, config: Qwen25VLConfig, **static):
    """The engine's jitted programs for one graph and one set of sampling statics."""
    wm = static["weight_major"]
    return dict(
        empty=jax.jit(functools.partial(_empty, config=config), static_argnums=(0, 1, 2)),
        empty_staged=jax.jit(functools.partial(_empty_staged, config=config), static_argnums=(0, 1)),
        stage=jax.jit(functools.partial(_stage, graphdef=graphdef, weight_major=wm), donate_argnums=(1,),
                      static_argnames=("cache_len",)),
        place=jax.jit(_place, donate_argnums=(0,)),
        decode=jax.jit(functools.partial(_decode, graphdef=graphdef, **static), donate_argnums=(1,)),
        take=jax.jit(_take))


# ----------------------------------------------------------------------------------------------- host
def _bucket(n: int, unit: int, cap: int) -> int:
    """Prefill batch size for n <= cap prompts: the smallest of unit x 4^k (below cap) and cap that
    holds them, so a run compiles its prefill for a few batch sizes only."""
    sizes, size = [], unit
    while size < cap:
        sizes.append(size)
        size *= 4
    return next(s for s in sizes + [cap] if s >= n)


class Engine:
    """A pool of `slots` decode rows over one model graph (see the module docstring).

    slots: S rows decoded together (the KV cache holds S x cache_len slots); a multiple of the
        data-parallel size.
    cache_len: cache slots per row (prompt + response); None: each call uses its prompts' width + its
        `max_new_tokens` bucket. A request that does not fit fails before anything runs.
    prefill_prompts: most prompts prefilled in one call (None: min(slots / num_samples, 16)); the staged
        buffer of prefilled prompts holds that many plus PREFILL_AHEAD.
    compact: once no prompt waits, the pool halves (down to the data-parallel size) whenever at most
        half its slots are still decoding: the tail of long responses decodes on fewer rows instead of
        beside idle slots (one decode program per pool size: S, S/2, ...).
    """

    def __init__(self, graphdef: nnx.GraphDef, config: Qwen25VLConfig, *, slots: int, stop_ids: Sequence[int],
                 pad_id: int, sampling: SamplingConfig | None = None, cache_len: int | None = None,
                 prefill_prompts: int | None = None, mesh: jax.sharding.Mesh | None = None, rules: Any = None,
                 weight_major: bool | None = None, compact: bool = True,
                 new_token_buckets: Sequence[int] = sampler_lib.NEW_TOKEN_BUCKETS):
        self.graphdef, self.config, self.mesh, self.rules = graphdef, config, mesh, rules
        self.dp = 1 if mesh is None else shd.data_parallel_size(mesh, rules)
        if slots < 1 or slots % self.dp:
            raise ValueError(f"engine slots={slots} must be a positive multiple of the data-parallel size {self.dp}")
        self.slots, self.cache_len, self.prefill_prompts = int(slots), cache_len, prefill_prompts
        self.stop_ids, self.pad_id = tuple(int(s) for s in stop_ids), int(pad_id)
        self.sampling = SamplingConfig.from_any(sampling)
        self.weight_major = jax.default_backend() == "cpu" if weight_major is None else bool(weight_major)
        self.new_token_buckets = tuple(new_token_buckets)
        self.compact = bool(compact)
        s = self.sampling
        self._programs = _programs(graphdef, config, greedy=s.greedy, top_k=int(s.top_k), use_top_p=s.top_p < 1.0,
                                   pad_id=self.pad_id, weight_major=self.weight_major)
        self._stops = jnp.asarray(self.stop_ids or (-1,), jnp.int32)

    def _run(self, name: str, *args, **kw):
        fn = self._programs[name]
        if self.mesh is None:
            return fn(*args, **kw)
        with shd.activate(self.mesh, self.rules):
            return fn(*args, **kw)

    def _put(self, fields: dict, rows: int) -> dict:
        fields = {k: np.asarray(v, np.float32 if k == "pixel_values" else np.int32) for k, v in fields.items()
                  if k in ("input_ids", "attention_mask", "position_ids", "rope_deltas", "pixel_values")
                  or (k.startswith("vision_") and k[len("vision_"):] in sampler_lib.VISION_KEYS)}
        if self.mesh is None:
            return fields
        return shd.shard_batch(fields, shd.batch_shardings(fields, self.mesh, self.rules, batch_size=rows))

    def generate(self, state: Any, source: PromptSource, *, num_samples: int = 1,
                 max_new_tokens: int | Sequence[int] | np.ndarray, rng: int | jax.Array = 0, row_offset: int = 0
                 ) -> tuple[sampler_lib.Generation, EngineStats]:
        """`num_samples` continuations of every prompt of `source`, streamed through the slots.

        max_new_tokens: one limit, or one per request row [num_prompts * num_samples] (each row stops
            at its own). rng: int seed or PRNG key; row r uses fold_in(rng, row_offset + r) (see
            `sampler.generate`). Returns (Generation in request order, its T the largest limit; stats)."""
        t0 = time.perf_counter()
        n, num_prompts, S = int(num_samples), len(source), self.slots
        if n < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        unit = self.dp
        R = num_prompts * n
        limits = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (R,)).copy()
        if (limits < 1).any():
            raise ValueError(f"max_new_tokens must be >= 1, got {int(limits.min())} for row {int(limits.argmin())}")
        T = sampler_lib.new_token_bucket(int(limits.max()), self.new_token_buckets)
        C = self.cache_len or source.width + T
        if source.width + int(limits.max()) > C:
            row = int(np.argmax(limits))
            raise ValueError(f"request row {row} needs {source.width + int(limits[row])} cache slots (prompt "
                             f"width {source.width} + max_new_tokens {int(limits[row])}); the engine's cache "
                             f"holds {C} per slot: raise cache_len or lower max_new_tokens")
        key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
        weights = sampler_lib.decode_weights(self.graphdef, state) if self.weight_major else None
        temp, top_p = jnp.float32(self.sampling.temperature or 1.0), jnp.float32(self.sampling.top_p)
        cap = self.prefill_prompts or min(S // n, PREFILL_PROMPTS)
        cap = max(unit, cap // unit * unit)

        slots = self._run("empty", S, C, T)
        ahead = min(cap, PREFILL_AHEAD * unit)
        Q = cap + ahead                                   # staged prompts: one prefill batch + leftovers
        staged = self._run("empty_staged", Q, source.width)
        pool = S                                          # slots in the current pool (compacting halves it)
        queue = collections.deque(range(num_prompts))
        pending: collections.deque = collections.deque()  # [staged row, prompt, next sample] not yet placed
        stage_free = list(range(Q))
        slot_row = np.full(S, -1, np.int64)               # request row held by each slot (-1: free)
        tokens = np.full((R, T), self.pad_id, np.int32)
        logprobs = np.zeros((R, T), np.float32)
        lengths, stopped = np.zeros(R, np.int32), np.zeros(R, bool)
        waits, prefill_s, decode_s, steps_run, slot_steps, prefills = [], 0.0, 0.0, 0, 0, 0
        while queue or pending or (slot_row >= 0).any():
            free = np.flatnonzero(slot_row < 0)
            t = time.perf_counter()
            waiting = sum(n - j for _, _, j in pending)
            if queue and len(free) > waiting and len(stage_free) >= unit:
                # prefill the prompts for the free slots beyond the staged samples (at least `ahead`)
                want = max(-(-(len(free) - waiting) // n), ahead)
                take = min(len(queue), want, cap, len(stage_free))
                P = _bucket(take, unit, cap)
                idx = [queue.popleft() for _ in range(take)]
                waits += [time.perf_counter() - t0] * take
                rows = [stage_free.pop(0) for _ in range(take)]
                pending.extend([r, i, 0] for r, i in zip(rows, idx))
                fields = self._put(source.layout(np.asarray(idx + [idx[-1]] * (P - take)), unit), P)
                staged = self._run("stage", state, staged, fields, jnp.asarray(rows + [Q] * (P - take), jnp.int32),
                                   weights, cache_len=C)
                prefills += 1
            if pending and len(free):
                # the staged samples into free slots, oldest prompt first
                target, src, req = [], [], []
                for slot in free:
                    if not pending:
                        break
                    entry = pending[0]
                    target.append(slot)
                    src.append(entry[0])
                    req.append(entry[1] * n + entry[2])
                    entry[2] += 1
                    if entry[2] == n:
                        stage_free.append(pending.popleft()[0])
                M = _bucket(len(target), 1, S)
                pad = M - len(target)
                slot_row[target] = req
                req = np.asarray(req + [0] * pad)
                slots = self._run("place", slots, staged, jnp.asarray(target + [S] * pad, jnp.int32),
                                  jnp.asarray(src + [0] * pad, jnp.int32), jnp.asarray(limits[req]),
                                  jnp.asarray(req + row_offset, jnp.int32), key)
                jax.block_until_ready(slots.count)
            prefill_s += time.perf_counter() - t
            t = time.perf_counter()
            if not queue and not pending and self.compact:
                busy = int((slot_row >= 0).sum())
                smaller = pool
                while smaller // 2 >= max(busy, 1) and (smaller // 2) % unit == 0:
                    smaller //= 2
                if smaller < pool:                        # keep the busy slots, in slot order
                    keep = np.argsort(slot_row < 0, kind="stable")[:smaller]
                    slots = self._run("take", slots, jnp.asarray(keep, jnp.int32))
                    slot_row, pool = slot_row[keep], smaller
                # back to the host once half the pool is free, to halve it again
                can_halve = pool // 2 >= 1 and (pool // 2) % unit == 0
                refill_at = pool - pool // 2 if can_halve else pool + 1
            else:
                refill_at = 1 if queue or pending else pool + 1
            steps, slots = self._run("decode", state, slots, jnp.int32(refill_at), self._stops, temp, top_p,
                                     weights)
            steps, active, count, hit = jax.device_get((steps, slots.active, slots.count, slots.stopped))
            steps_run += int(steps)
            slot_steps += int(steps) * pool
            done = np.flatnonzero((slot_row >= 0) & ~active)
            if len(done):
                out_tok, out_lp = jax.device_get((slots.tokens, slots.logprobs))
                for s in done:
                    r = slot_row[s]
                    tokens[r, :count[s]], logprobs[r, :count[s]] = out_tok[s, :count[s]], out_lp[s, :count[s]]
                    lengths[r], stopped[r] = count[s], hit[s]
                slot_row[done] = -1
            decode_s += time.perf_counter() - t
        wall = time.perf_counter() - t0
        Tout = int(limits.max())
        gen = sampler_lib.Generation(tokens[:, :Tout], logprobs[:, :Tout], lengths, stopped)
        stats = EngineStats(slots=S, requests=R, tokens=int(lengths.sum()), slot_steps=slot_steps,
                            decode_steps=steps_run, prefill_calls=prefills, prefill_s=prefill_s, decode_s=decode_s,
                            wall_s=wall, queue_wait_s=float(np.mean(waits)) if waits else 0.0)
        return gen, stats
