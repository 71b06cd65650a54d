"""Optax AdamW with linear warm-up + cosine decay to a floor, global-norm clipping, frozen parameters.

Frozen parameters (e.g. the vision tower during SFT) get no optimizer state and no update
(`optax.masked`); weight decay skips vectors (norm scales, biases), as is usual for transformers,
judged per block: a stacked (scanned) layer's bias [layers, N] is still a vector (`per_block_ndim`).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def lr_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                min_learning_rate: float = 0.0) -> optax.Schedule:
    """0 -> `learning_rate` linearly over `warmup_steps`, then cosine down to `min_learning_rate`."""
    if total_steps <= 0:
        raise ValueError(f"optim.total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"optim.warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}]")
    if not 0 <= min_learning_rate <= learning_rate:
        raise ValueError(
            f"optim.min_learning_rate={min_learning_rate} must lie in [0, learning_rate={learning_rate}]")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=min_learning_rate)


def path_str(path: Sequence[Any]) -> str:
    """'a/b/0/kernel' for a pytree key path (nnx.State paths included)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(p for p in parts if p != "value")


def path_mask(params: Any, patterns: Sequence[str]) -> Any:
    """True for every leaf whose path ('vision/blocks/0/attn/qkv/kernel') matches one of `patterns`."""
    regexes = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(r.search(path_str(path)) for r in regexes), params)


def trainable_mask(params: Any, frozen: Sequence[str] = ()) -> Any:
    """True where a parameter is trained: not matched by any regex in `frozen` (e.g. ('^vision',))."""
    frozen_mask = path_mask(params, frozen)
    return jax.tree.map(lambda f: not f, frozen_mask)


def per_block_ndim(x: Any) -> int:
    """Rank of a parameter as one block sees it: a stacked (scanned) parameter's leading "layers" axis
    (its `out_sharding` logical names, kept by nnx Variables through grads and optax) does not count."""
    if isinstance(x, nnx.Variable):
        names = x.get_metadata().get("out_sharding") or ()
        value = x.get_value()
        return getattr(value, "ndim", 0) - (1 if names and names[0] == "layers" else 0)
    return getattr(x, "ndim", 0)


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on vectors (norm scales, biases), stacked ones included."""

    def one(x):
        decay = per_block_ndim(x) >= 2
        return jax.tree.map(lambda _: decay, x) if isinstance(x, nnx.Variable) else decay

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(
    params: Any,
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    min_learning_rate: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
    frozen: Sequence[str] = (),
) -> optax.GradientTransformation:
    """AdamW + schedule + clipping for (abstract) `params`; parameters matching `frozen` stay fixed.

    `params` is only used for its structure and ranks (abstract shapes are fine).
    """
    schedule = lr_schedule(learning_rate, total_steps, warmup_steps, min_learning_rate)
    chain = []
    if max_grad_norm:
        chain.append(optax.clip_by_global_norm(max_grad_norm))
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=_decay_mask))
    tx = optax.chain(*chain)
    if frozen:
        train = trainable_mask(params, frozen)
        if not any(jax.tree.leaves(train)):
            raise ValueError(f"optim.frozen={tuple(frozen)} freezes every parameter")
        tx = optax.chain(
            optax.masked(tx, train),
            optax.masked(optax.set_to_zero(), jax.tree.map(lambda t: not t, train)))
    return tx


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Drops an update whose gradients hold a NaN or infinity: zero updates, inner state unchanged.

    The same contract and state (`optax.ApplyIfFiniteState`, so checkpoints are interchangeable) as
    `optax.apply_if_finite`, but without its `lax.cond` over the whole optimiser state: the choice is a
    per-element select that XLA fuses into the update's own elementwise pass, where the cond costs
    extra passes over every moment (measured on CPU: AdamW over 680 M parameters 1.9 s -> 1.4 s). The
    test is one global reduction, `isfinite(global_norm(grads))` (a gradient so large that its square
    overflows counts as non-finite too).
    """
    def init(params):
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update(updates, state, params=None, **extra_args):
        ok = jnp.isfinite(optax.global_norm(updates))
        safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), updates)
        new_updates, new_inner = optax.with_extra_args_support(inner).update(
            safe, state.inner_state, params, **extra_args)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        bad = (~ok).astype(jnp.int32)
        return new_updates, optax.ApplyIfFiniteState(
            notfinite_count=jnp.where(ok, 0, state.notfinite_count + 1), last_finite=ok,
            total_notfinite=state.total_notfinite + bad,
            inner_state=jax.tree.map(keep, new_inner, state.inner_state))

    return optax.GradientTransformationExtraArgs(init, update)
