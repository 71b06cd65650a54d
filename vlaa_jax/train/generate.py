"""The trainers' one door to sampling: `generate(...)` -> response tokens, their log-probs and mask.

GRPO, the before/after evaluation and `mode=generate` all call `generate`; what backs it can change
without touching them. Here it is a KV-cache loop over the model's own jit-friendly forward
(`Qwen25VL.forward` with `init_cache`): one prefill of the (already repeated) prompts, then
`max_new_tokens` single-token decode steps inside one `lax.scan`, sampling with temperature (or
greedy). Positions of decoded tokens follow M-RoPE's rule: the k-th valid token sits at
k + rope_delta on all three axes. Rows stop at the first `eos_id` (kept, with its log-prob);
later slots hold `pad_id` with mask 0.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlaa_jax import sharding as shd
from vlaa_jax.train import common


class Generation(NamedTuple):
    tokens: np.ndarray    # int32 [B, T] sampled ids; pad_id after the end
    logprobs: np.ndarray  # float32 [B, T] log p(token) under the (temperature-scaled) sampling policy
    mask: np.ndarray      # int32 [B, T] 1 up to and including the first eos_id


def _sample_loop(graphdef, params, rest, prompt: Mapping[str, jax.Array], rng: jax.Array,
                 temperature: jax.Array, *, max_new_tokens: int, greedy: bool, eos_ids: tuple[int, ...],
                 pad_id: int):
    model = nnx.merge(graphdef, params, rest)
    ids, seg = prompt["input_ids"], prompt["attention_mask"]
    batch, prompt_len = ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.forward(ids, prompt["position_ids"], seg, pixel_values=prompt.get("pixel_values"),
                                  vision=common.vision_from_batch(prompt), cache=cache)
    last = logits[:, -1]
    start_pos = jnp.sum(seg, axis=1) + prompt["rope_deltas"][:, 0]  # position of the first new token
    eos = jnp.asarray(eos_ids, jnp.int32)

    def body(carry, j):
        cache, last, rng, done = carry
        rng, key = jax.random.split(rng)
        scaled = last.astype(jnp.float32) / temperature
        logp_all = jax.nn.log_softmax(scaled, axis=-1)
        tok = jnp.argmax(scaled, axis=-1) if greedy else jax.random.categorical(key, scaled, axis=-1)
        tok = tok.astype(jnp.int32)
        logp = jnp.take_along_axis(logp_all, tok[:, None], axis=-1)[:, 0]
        valid = ~done
        tok = jnp.where(valid, tok, pad_id)
        done = done | jnp.isin(tok, eos)
        pos = jnp.broadcast_to((start_pos + j)[None, :, None], (3, batch, 1)).astype(jnp.int32)
        logits, cache = model.forward(tok[:, None], pos, jnp.ones((batch, 1), jnp.int32), cache=cache)
        return (cache, logits[:, -1], rng, done), (tok, jnp.where(valid, logp, 0.0), valid.astype(jnp.int32))

    done0 = jnp.zeros((batch,), bool)
    _, (toks, logps, valid) = jax.lax.scan(body, (cache, last, rng, done0), jnp.arange(max_new_tokens))
    return toks.T, logps.T, valid.T


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, max_new_tokens: int, greedy: bool, eos_ids: tuple[int, ...], pad_id: int):
    return jax.jit(functools.partial(_sample_loop, graphdef, max_new_tokens=max_new_tokens, greedy=greedy,
                                     eos_ids=eos_ids, pad_id=pad_id))


def generate(graphdef: Any, params: Any, rest: Any, prompt: Mapping[str, np.ndarray], *, rng: jax.Array,
             max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
             eos_ids: tuple[int, ...], pad_id: int, mesh=None, rules=None) -> Generation:
    """Samples one continuation per row of `prompt` (left-padded ids, attention_mask, position_ids,
    rope_deltas, and optionally pixel_values + vision_* layout fields). Repeat rows for n samples."""
    fields = {k: np.asarray(v) for k, v in prompt.items()
              if k in ("input_ids", "attention_mask", "position_ids", "rope_deltas", "pixel_values")
              or k.startswith("vision_")}
    fn = _compiled(graphdef, int(max_new_tokens), bool(greedy), tuple(int(e) for e in eos_ids), int(pad_id))
    if mesh is not None:
        batch = common.put_batch(fields, mesh, rules, batch_size=fields["input_ids"].shape[0])
        with shd.activate(mesh, rules):
            out = fn(params, rest, batch, rng, jnp.float32(temperature))
    else:
        out = fn(params, rest, fields, rng, jnp.float32(temperature))
    toks, logps, valid = jax.device_get(out)
    return Generation(np.asarray(toks, np.int32), np.asarray(logps, np.float32), np.asarray(valid, np.int32))
