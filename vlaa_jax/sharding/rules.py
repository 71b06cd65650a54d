"""The ONE logical-axis -> mesh-axis table: logical names, presets, resolution to PartitionSpecs.

Model code only ever names *logical* axes (below) on its parameters and activations; which mesh axis
(`data`, `fsdp`, `tensor`) a logical axis lands on is decided by the rules table here and can be chosen
in config (`sharding.rules`: a preset name or a list of (logical, mesh) pairs).

A dimension whose size is not divisible by the mesh axes its rule names is replicated along those axes
instead (JAX arrays must be evenly sharded); a mesh axis is used at most once per array (the first
logical axis that claims it wins), as in Flax's `logical_to_mesh_axes`.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, Mapping, Sequence

from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical axes used by the model (parameters and activation constraints).
#   vocab     embedding rows / lm_head output           embed     model width (text or vision)
#   mlp       SwiGLU intermediate width                 heads     query heads * head_dim (flattened)
#   kv_heads  key/value heads * head_dim (flattened)    patch     flattened patch input (3*2*14*14)
#   batch     batch rows of activations                 length    sequence positions of activations
#   norm      RMSNorm scales (always replicated)
#   layers    the leading axis of stacked (scanned) blocks, e.g. decoder layers: never sharded, each device holds
#             all layers of its shard (a scan slices one layer per step)
LOGICAL_AXES: tuple[str, ...] = (
    "vocab", "embed", "mlp", "heads", "kv_heads", "patch", "batch", "length", "norm", "layers")

# Logical names of the activations the model constrains (`constrain`) at block boundaries; the rules
# below place them like the parameters. Both towers use them: for the vision tower "batch" is the
# image-group axis and "length" the patches of a group.
ACTIVATION_AXES: tuple[str, ...] = ("batch", "length", "embed")   # hidden states [rows, positions, width]
MLP_AXES: tuple[str, ...] = ("batch", "length", "mlp")            # SwiGLU inner activations
LOGITS_AXES: tuple[str, ...] = ("batch", "length", "vocab")       # logits [rows, positions, vocab]

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]
# What every function taking rules accepts: a preset name, pairs, a dict, or None (the default table).
RulesLike = str | Rules | Mapping[str, MeshAxes] | None
# `resolve_rules`' normal form: ((logical, (mesh axes...)), ...) for every logical axis.
ResolvedRules = tuple[tuple[str, tuple[str, ...]], ...]

# FSDP + Megatron-style tensor parallelism: weights' model width over `fsdp`, heads/MLP/vocab over
# `tensor`, batch over `data` x `fsdp` (FSDP is data parallel for activations).
FSDP_TP_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("patch", None),
    ("norm", None),
    ("layers", None),
)
# FSDP only (ZeRO-3): every weight sharded over `fsdp` along its model width, no tensor parallelism.
FSDP_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", None),
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv_heads", None),
    ("patch", None),
    ("norm", None),
    ("layers", None),
)
# Pure data parallelism: weights replicated, the batch split over every mesh axis.
DP_RULES: Rules = tuple(
    (name, ("data", "fsdp", "tensor") if name == "batch" else None) for name in LOGICAL_AXES)

RULE_PRESETS: dict[str, Rules] = {"fsdp_tp": FSDP_TP_RULES, "fsdp": FSDP_RULES, "dp": DP_RULES}
DEFAULT_RULES: Rules = FSDP_TP_RULES


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------

def _as_mesh_axes(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    axes = (value,) if isinstance(value, str) else tuple(value)
    for a in axes:
        if a not in MESH_AXES:
            raise ValueError(f"{where}: unknown mesh axis {a!r}; mesh axes are {MESH_AXES}")
    return axes


def resolve_rules(rules: RulesLike = None) -> ResolvedRules:
    """Normalises a preset name, a list of pairs or a dict into ((logical, (mesh axes...)), ...).

    Pairs given for a subset of logical axes override the default table (`fsdp_tp`) for those axes.
    """
    if rules is None:
        rules = DEFAULT_RULES
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(
                f"sharding.rules: unknown preset {rules!r}; choose one of {sorted(RULE_PRESETS)} or give "
                "a list of (logical_axis, mesh_axes) pairs")
        rules = RULE_PRESETS[rules]
    pairs = list(rules.items()) if isinstance(rules, Mapping) else [tuple(p) for p in rules]
    table = {name: _as_mesh_axes(axes, "default rules") for name, axes in DEFAULT_RULES}
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"sharding.rules: each rule must be (logical_axis, mesh_axes), got {pair!r}")
        name, axes = pair
        if name not in LOGICAL_AXES:
            raise ValueError(
                f"sharding.rules: unknown logical axis {name!r}; logical axes are {LOGICAL_AXES}")
        table[name] = _as_mesh_axes(axes, f"sharding.rules[{name!r}]")
    return tuple(table.items())


def rules_from_config(config: Any) -> ResolvedRules:
    """Rules from `config.sharding.rules` (or `config.rules`); default `fsdp_tp`."""
    return resolve_rules(config_value(config, "rules", None))


_ACTIVE = threading.local()


def active_rules() -> ResolvedRules:
    """Rules set by the innermost `use_rules`/`activate` context, else the default table."""
    stack = getattr(_ACTIVE, "rules", None)
    return stack[-1] if stack else resolve_rules(None)


@contextlib.contextmanager
def use_rules(rules: RulesLike) -> Iterator[None]:
    """Makes `rules` the table that `constrain` uses while the context is open (and traced)."""
    if not hasattr(_ACTIVE, "rules"):
        _ACTIVE.rules = []
    _ACTIVE.rules.append(resolve_rules(rules))
    try:
        yield
    finally:
        _ACTIVE.rules.pop()


def flax_rules(rules: RulesLike = None):
    """Our table as Flax's `logical_axis_rules` context (for Flax APIs that read logical names)."""
    pairs = tuple((name, None if not axes else axes[0] if len(axes) == 1 else axes)
                  for name, axes in resolve_rules(rules))
    return flax_spmd.logical_axis_rules(pairs)


# --------------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec
# --------------------------------------------------------------------------------------------------

def mesh_sizes(mesh: Mesh | Any | None) -> dict[str, int] | None:
    """{axis name: size} of a (concrete or abstract) mesh; None without one."""
    if mesh is None:
        return None
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def logical_to_spec(
    names: Sequence[str | None] | None,
    rules: RulesLike = None,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | Any | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry logical `names` (None = replicated dim).

    With `shape` and `mesh`, mesh axes that do not evenly divide a dim (or have size 1) are dropped for
    that dim, so the result is always a valid sharding of that shape.
    """
    if not names:
        return PartitionSpec()
    table = dict(resolve_rules(rules))
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical names {tuple(names)} do not match array rank {len(shape)} ({shape})")
    sizes = mesh_sizes(mesh)
    used: set[str] = set()
    spec: list[Any] = []
    for d, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"unknown logical axis {name!r} (known: {LOGICAL_AXES})")
        kept: list[str] = []
        for axis in table[name]:
            if axis in used:
                continue
            if sizes is not None:
                if axis not in sizes:
                    continue
                n = sizes[axis]
                if n == 1 or (shape is not None and shape[d] % (math.prod(sizes[a] for a in kept) * n)):
                    continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


# --------------------------------------------------------------------------------------------------
# Config access (a ConfigDict, a dict, or any object with attributes)
# --------------------------------------------------------------------------------------------------

def _get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default) if hasattr(config, key) else default


def config_value(config: Any, key: str, default: Any) -> Any:
    """`config.sharding.<key>`, or `config.<key>` for a config that is the sharding section itself."""
    sub = _get(config, "sharding", None)
    return _get(config if sub is None else sub, key, default)
