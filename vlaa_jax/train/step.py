"""The jitted, sharded forward + backward + optimizer step shared by SFT and GRPO.

The model is split ONCE, outside (`nnx.split(model, nnx.Param, ...)` -> graphdef, params, rest);
the step is a pure function of (params, opt_state, rest, batch), jitted with explicit in/out
shardings from the rules table and with params and optimizer state donated. `nnx.merge` inside the
traced function costs nothing at run time (it only happens while tracing).

Gradient accumulation: with `micro_batches=M > 1`, every batch field carries a leading micro-batch axis
of size M (see `split_micro_batches` / `stack_micro_batches`, built on the host); a `lax.scan` inside
the jit accumulates float32 gradients over them, so peak activation memory is one micro-batch's.

`loss_fn(model, batch) -> (loss, aux)`: `loss` a scalar (mean over the micro-batch), `aux` a dict of
scalar metrics. Losses, metrics and gradients are averaged over micro-batches with equal weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlaa_jax import sharding as shd

LossFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, Mapping[str, jax.Array]]]


def split_model(model: Any) -> tuple[Any, Any, Any]:
    """(graphdef, params, rest): the one `nnx.split` of a training run."""
    return nnx.split(model, nnx.Param, ...)


def split_state(state: Any) -> tuple[Any, Any]:
    """(params, rest) of a full nnx.State, e.g. the one `sharding.create_sharded` returns."""
    return nnx.split_state(state, nnx.Param, ...)


def _apply_frozen(params: Any, trainable: Any | None) -> Any:
    if trainable is None:
        return params
    return jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), trainable, params)


def _grads_fn(graphdef: Any, loss_fn: LossFn, micro_batches: int, trainable: Any | None,
              param_shardings: Any | None) -> Callable:
    """(params, rest, batch) -> (loss, aux, grads), accumulated over micro-batches with lax.scan."""

    def micro_loss(params, rest, batch):
        model = nnx.merge(graphdef, _apply_frozen(params, trainable), rest)
        loss, aux = loss_fn(model, batch)
        return loss.astype(jnp.float32), dict(aux)

    grad = jax.value_and_grad(micro_loss, has_aux=True)

    def constrain_like_params(tree):
        if param_shardings is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, param_shardings)

    def fn(params, rest, batch):
        if micro_batches == 1:
            (loss, aux), grads = grad(params, rest, batch)
            return loss, aux, constrain_like_params(grads)

        def body(carry, micro):
            acc, loss_sum = carry
            (loss, aux), g = grad(params, rest, micro)
            acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)
            return (constrain_like_params(acc), loss_sum + loss), aux

        zeros = constrain_like_params(
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        (acc, loss_sum), auxs = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), batch)
        grads = jax.tree.map(lambda a, p: (a / micro_batches).astype(p.dtype), acc, params)
        aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), auxs)
        return loss_sum / micro_batches, aux, constrain_like_params(grads)

    return fn


@dataclasses.dataclass
class TrainStep:
    """`step(params, opt_state, rest, batch) -> (params, opt_state, metrics)`, jitted once per batch
    structure. `metrics` holds `loss`, `grad_norm` (before clipping) and the loss function's aux.

    Build it with `make_train_step`; call it with arrays placed by `shardings` (`init_train_state`
    and `sharding.shard_batch` do that).
    """
    graphdef: Any
    loss_fn: LossFn
    tx: optax.GradientTransformation
    mesh: Mesh
    rules: Any
    param_shardings: Any
    opt_shardings: Any
    rest_shardings: Any
    micro_batches: int = 1
    trainable: Any | None = None
    donate: bool = True

    def __post_init__(self):
        self._compiled: dict[Any, Callable] = {}
        self._grads = _grads_fn(self.graphdef, self.loss_fn, self.micro_batches, self.trainable,
                                self.param_shardings)
        self._grads_jit = jax.jit(self._grads, out_shardings=(None, None, self.param_shardings))

    def _step(self, params, opt_state, rest, batch):
        loss, aux, grads = self._grads(params, rest, batch)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": grad_norm, **aux}

    def _jit_for(self, batch: Mapping[str, jax.Array]) -> Callable:
        batch_shardings = {k: v.sharding for k, v in batch.items()}
        key = jax.tree.structure(batch), tuple(
            (k, tuple(np.shape(v)), str(batch_shardings[k])) for k, v in sorted(batch.items()))
        if key not in self._compiled:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            self._compiled[key] = jax.jit(
                self._step,
                in_shardings=(self.param_shardings, self.opt_shardings, self.rest_shardings,
                              batch_shardings),
                out_shardings=(self.param_shardings, self.opt_shardings, replicated),
                donate_argnums=(0, 1) if self.donate else ())
        return self._compiled[key]

    def __call__(self, params, opt_state, rest, batch):
        with shd.activate(self.mesh, self.rules):
            return self._jit_for(batch)(params, opt_state, rest, batch)

    def lower(self, params, opt_state, rest, batch):
        """The lowered step (for cost analysis / memory analysis without running it)."""
        with shd.activate(self.mesh, self.rules):
            return self._jit_for(batch).lower(params, opt_state, rest, batch)

    def grads(self, params, rest, batch):
        """(loss, aux, grads) without an update: the same computation the step differentiates."""
        with shd.activate(self.mesh, self.rules):
            return self._grads_jit(params, rest, batch)


def make_train_step(
    graphdef: Any,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    params: Any,
    rest: Any,
    mesh: Mesh,
    rules: Any = None,
    *,
    micro_batches: int = 1,
    trainable: Any | None = None,
    donate: bool = True,
) -> TrainStep:
    """The sharded train step for `graphdef` (params/rest may be abstract: only shapes are read).

    `trainable`: optional pytree of bools like `params` (`optim.trainable_mask`); frozen parameters
    are wrapped in `stop_gradient`, so XLA skips their backward pass altogether.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    rules = shd.resolve_rules(rules)
    param_shardings = shd.tree_shardings(params, mesh, rules)
    opt_shardings = shd.tree_shardings(jax.eval_shape(tx.init, params), mesh, rules)
    rest_shardings = shd.tree_shardings(rest, mesh, rules)
    return TrainStep(graphdef, loss_fn, tx, mesh, rules, param_shardings, opt_shardings,
                     rest_shardings, micro_batches, trainable, donate)


def init_optimizer(tx: optax.GradientTransformation, params: Any, mesh: Mesh,
                   rules: Any = None) -> Any:
    """Optimizer state created directly sharded like the parameters it mirrors."""
    shardings = shd.tree_shardings(jax.eval_shape(tx.init, params), mesh, rules)
    with shd.activate(mesh, rules):
        return jax.jit(tx.init, out_shardings=shardings)(params)


# --------------------------------------------------------------------------------------------------
# Micro-batches (host side)
# --------------------------------------------------------------------------------------------------

def split_micro_batches(batch: Mapping[str, np.ndarray], micro_batches: int, batch_size: int
                        ) -> dict[str, np.ndarray]:
    """[.., B, ..] host fields -> [M, .., B/M, ..]: contiguous row chunks, one per micro-batch.

    Fields without a `batch` axis (concatenated images) cannot be split by rows: build such batches
    per micro-batch on the host and `stack_micro_batches` them.
    """
    if batch_size % micro_batches:
        raise ValueError(f"batch size {batch_size} is not divisible by micro_batches={micro_batches}")
    names = shd.batch_axes(batch, batch_size)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if "batch" not in names[key]:
            raise ValueError(
                f"batch field {key!r} {value.shape} has no batch axis, so it cannot be split into "
                "micro-batches by rows; build one batch per micro-batch and use stack_micro_batches")
        ax = names[key].index("batch")
        parts = np.split(value, micro_batches, axis=ax)
        out[key] = np.stack(parts, axis=0)
    return out


def stack_micro_batches(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks per-micro-batch host batches (same keys, same padded shapes) along a new leading axis."""
    keys = list(batches[0])
    for i, b in enumerate(batches):
        if list(b) != keys:
            raise ValueError(f"micro-batch {i} has fields {sorted(b)}, expected {sorted(keys)}")
        for k in keys:
            if np.shape(b[k]) != np.shape(batches[0][k]):
                raise ValueError(f"micro-batch {i} field {k!r} has shape {np.shape(b[k])}, expected "
                                 f"{np.shape(batches[0][k])} (pad micro-batches to the same bucket)")
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in keys}
