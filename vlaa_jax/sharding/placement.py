"""Placement by logical names: NamedShardings of arrays and state trees, activation constraints, and
models created directly as sharded arrays."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlaa_jax.sharding.mesh import activate
from vlaa_jax.sharding.rules import MESH_AXES, RulesLike, active_rules, flax_rules, logical_to_spec, resolve_rules


def logical_sharding(names: Sequence[str | None] | None, mesh: Mesh, rules: RulesLike = None,
                     shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for an array with logical dim `names` (see `logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(names, rules, shape=shape, mesh=mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op when no mesh is set.

    Call it at block boundaries in model code, e.g. `constrain(h, ("batch", "length", "embed"))`.
    It uses the mesh of `jax.set_mesh` and the rules of `use_rules`/`activate` (default `fsdp_tp`).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not set(mesh.axis_names) & set(MESH_AXES):
        return x
    spec = logical_to_spec(names, active_rules(), shape=x.shape, mesh=mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _leaf_names(x: Any) -> Sequence[str | None] | None:
    if _is_variable(x):
        names = x.get_metadata().get("out_sharding")
        return tuple(names) if names else None
    return None


def tree_shardings(tree: Any, mesh: Mesh, rules: RulesLike = None) -> Any:
    """NamedShardings for every array in `tree` (an nnx.State, an optimizer state, ...).

    `nnx.Variable` leaves are placed by their `out_sharding` (alias `sharding_names`) logical names;
    anything else (step counters, plain arrays) is replicated. The result has the same pytree structure
    as `tree`, so it can be passed as `in_shardings`/`out_shardings` of `jax.jit`.
    """
    rules = resolve_rules(rules)

    def one(x):
        if _is_variable(x):
            value = x.get_value()
            if not hasattr(value, "shape"):
                return x
            return x.replace(logical_sharding(_leaf_names(x), mesh, rules, value.shape))
        if hasattr(x, "shape"):
            return NamedSharding(mesh, PartitionSpec())
        return x

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def abstract_state(create_fn: Callable[[], Any], mesh: Mesh, rules: RulesLike = None) -> tuple[Any, Any, Any]:
    """(graphdef, abstract state, shardings) of `create_fn()` without allocating anything.

    The abstract state holds `jax.ShapeDtypeStruct`s that carry their target NamedSharding, ready to
    be used as an Orbax restore target or as `out_shardings`.
    """
    with activate(mesh, rules), flax_rules(rules), nnx.use_eager_sharding(False):
        model = nnx.eval_shape(create_fn)
    graphdef, state = nnx.split(model)
    shardings = tree_shardings(state, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return graphdef, abstract, shardings


def create_sharded(create_fn: Callable[[], Any], mesh: Mesh, rules: RulesLike = None) -> tuple[Any, Any]:
    """Initialises `create_fn()` directly as sharded arrays: (graphdef, state).

    Shapes come from `nnx.eval_shape`; the initialiser is jitted with `out_shardings` from the rules,
    so each device only ever computes and holds its own shards.
    """
    graphdef, _, shardings = abstract_state(create_fn, mesh, rules)

    def init():
        with nnx.use_eager_sharding(False):
            return nnx.split(create_fn())[1]

    with activate(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state
