"""A small NNX decoder carrying the model's logical axis names, for sharding tests without the model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlaa_jax import sharding as shd


def _param(rngs, shape, names, scale=0.2):
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape), sharding_names=names)


class Block(nnx.Module):
    def __init__(self, d, h, kv, f, rngs):
        self.norm = nnx.Param(jnp.ones((d,)), sharding_names=("norm",))
        self.q = _param(rngs, (d, h), ("embed", "heads"))
        self.k = _param(rngs, (d, kv), ("embed", "kv_heads"))
        self.v = _param(rngs, (d, kv), ("embed", "kv_heads"))
        self.o = _param(rngs, (h, d), ("heads", "embed"))
        self.up = _param(rngs, (d, f), ("embed", "mlp"))
        self.down = _param(rngs, (f, d), ("mlp", "embed"))
        self.heads = h // 8

    def __call__(self, x):
        y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.norm[...]
        b, l, _ = y.shape
        q = (y @ self.q[...]).reshape(b, l, self.heads, 8)
        k = jnp.repeat((y @ self.k[...]).reshape(b, l, -1, 8), self.heads // (self.k.shape[1] // 8), 2)
        v = jnp.repeat((y @ self.v[...]).reshape(b, l, -1, 8), self.heads // (self.v.shape[1] // 8), 2)
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, l, -1)
        x = x + a @ self.o[...]
        x = x + jax.nn.silu(x @ self.up[...]) @ self.down[...]
        return shd.constrain(x, ("batch", "length", "embed"))


class Toy(nnx.Module):
    def __init__(self, vocab=64, d=32, h=32, kv=16, f=64, layers=2, remat="none", *, rngs):
        self.embed = _param(rngs, (vocab, d), ("vocab", "embed"))
        self.blocks = nnx.List([Block(d, h, kv, f, rngs) for _ in range(layers)])
        self.head = _param(rngs, (d, vocab), ("embed", "vocab"))
        self.remat = remat

    def __call__(self, ids):
        x = shd.constrain(self.embed[...][ids], ("batch", "length", "embed"))
        for blk in self.blocks:
            if self.remat == "none":
                x = blk(x)
            else:
                policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                          if self.remat == "save_dots" else None)
                x = nnx.remat(lambda m, y: m(y), policy=policy)(blk, x)
        return x @ self.head[...]


def toy_loss(model, batch):
    logits = model(batch["input_ids"][:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    tgt = batch["input_ids"][:, 1:]
    nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    loss = jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, {"tokens": jnp.sum(mask)}
