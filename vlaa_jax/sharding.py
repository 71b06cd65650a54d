"""Device meshes, the ONE logical-axis -> mesh-axis table, and placement helpers.

Model code only ever names *logical* axes (below) on its parameters and activations; which mesh axis
(`data`, `fsdp`, `tensor`) a logical axis lands on is decided by the rules table here and can be chosen
in config (`sharding.rules`: a preset name or a list of (logical, mesh) pairs). Nothing else in the code
base names mesh axes.

A dimension whose size is not divisible by the mesh axes its rule names is replicated along those axes
instead (JAX arrays must be evenly sharded); a mesh axis is used at most once per array (the first
logical axis that claims it wins), as in Flax's `logical_to_mesh_axes`.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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
# Rules
# --------------------------------------------------------------------------------------------------

def _as_mesh_axes(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    axes = (value,) if isinstance(value, str) else tuple(value)
    for a in axes:
        if a not in MESH_AXES:
            raise ValueError(f"{where}: unknown mesh axis {a!r}; mesh axes are {MESH_AXES}")
    return axes


def resolve_rules(rules: str | Rules | Mapping[str, MeshAxes] | None = None) -> tuple[
    tuple[str, tuple[str, ...]], ...]:
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


def rules_from_config(config: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Rules from `config.sharding.rules` (or `config.rules`); default `fsdp_tp`."""
    sub = _sharding_subconfig(config)
    return resolve_rules(_get(sub, "rules", None))


_ACTIVE = threading.local()


def active_rules() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Rules set by the innermost `use_rules`/`activate` context, else the default table."""
    stack = getattr(_ACTIVE, "rules", None)
    return stack[-1] if stack else resolve_rules(None)


@contextlib.contextmanager
def use_rules(rules: str | Rules | Mapping[str, MeshAxes] | None) -> Iterator[None]:
    """Makes `rules` the table that `constrain` uses while the context is open (and traced)."""
    if not hasattr(_ACTIVE, "rules"):
        _ACTIVE.rules = []
    _ACTIVE.rules.append(resolve_rules(rules))
    try:
        yield
    finally:
        _ACTIVE.rules.pop()


def flax_rules(rules: str | Rules | Mapping[str, MeshAxes] | None = None):
    """Our table as Flax's `logical_axis_rules` context (for Flax APIs that read logical names)."""
    from flax.core import spmd as flax_spmd
    pairs = tuple((name, None if not axes else axes[0] if len(axes) == 1 else axes)
                  for name, axes in resolve_rules(rules))
    return flax_spmd.logical_axis_rules(pairs)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: str | Rules | Mapping[str, MeshAxes] | None = None) -> Iterator[None]:
    """`jax.set_mesh(mesh)` plus `use_rules(rules)`: open while creating models or tracing steps."""
    with jax.set_mesh(mesh), use_rules(rules):
        yield


# --------------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec / NamedSharding
# --------------------------------------------------------------------------------------------------

def _mesh_sizes(mesh: Mesh | Any | None) -> dict[str, int] | None:
    if mesh is None:
        return None
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def logical_to_spec(
    names: Sequence[str | None] | None,
    rules: str | Rules | Mapping[str, MeshAxes] | None = None,
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
    sizes = _mesh_sizes(mesh)
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


def logical_sharding(
    names: Sequence[str | None] | None,
    mesh: Mesh,
    rules: str | Rules | Mapping[str, MeshAxes] | None = None,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
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
    from flax import nnx
    return isinstance(x, nnx.Variable)


def _leaf_names(x: Any) -> Sequence[str | None] | None:
    if _is_variable(x):
        names = x.get_metadata().get("out_sharding")
        return tuple(names) if names else None
    return None


def tree_shardings(tree: Any, mesh: Mesh,
                   rules: str | Rules | Mapping[str, MeshAxes] | None = None) -> Any:
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


def tree_specs(tree: Any) -> Any:
    """PartitionSpec of every (sharded) array in `tree` (handy in tests and logs)."""
    return jax.tree.map(lambda a: a.sharding.spec, tree)


# --------------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------------

def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces one -1 by the rest of the devices; checks that the product is the device count."""
    shape = tuple(int(s) for s in mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape {shape} must have {len(MESH_AXES)} entries, for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape {shape}: at most one entry may be -1 (the rest of the devices)")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape {shape}: entries must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh_shape {shape} over {MESH_AXES}: the fixed axes ({known} devices) do not divide the "
                f"{num_devices} available devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh_shape {shape} over {MESH_AXES} needs {math.prod(shape)} devices but "
            f"{num_devices} are available; use -1 for 'the rest of the devices'")
    return shape


def make_mesh(mesh_shape: Sequence[int] = (1, -1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh over (data, fsdp, tensor) with Auto axis types (classic jit + NamedSharding behaviour)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=axis_types)


def mesh_from_config(config: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh from `config.sharding.mesh_shape` (or `config.mesh_shape`); default (1, -1, 1)."""
    sub = _sharding_subconfig(config)
    return make_mesh(tuple(_get(sub, "mesh_shape", (1, -1, 1))), devices)


def data_parallel_size(mesh: Mesh, rules: str | Rules | Mapping[str, MeshAxes] | None = None) -> int:
    """How many ways the batch is split: the product of the mesh axes the `batch` rule names."""
    table = dict(resolve_rules(rules))
    sizes = _mesh_sizes(mesh)
    return math.prod(sizes[a] for a in table["batch"] if a in sizes)


def check_batch_divisible(batch_size: int, mesh: Mesh,
                          rules: str | Rules | Mapping[str, MeshAxes] | None = None,
                          what: str = "batch size") -> None:
    """Raises a clear error unless `batch_size` splits evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh, rules)
    if batch_size % dp:
        table = dict(resolve_rules(rules))
        raise ValueError(
            f"{what} {batch_size} is not divisible by the data-parallel size {dp} (mesh axes "
            f"{table['batch']} of mesh {dict(zip(mesh.axis_names, mesh.axis_sizes))})")


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------

# Logical names of the batch fields of design.md. Fields not listed: batch-major if their leading dim
# is the batch size, else replicated.
BATCH_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "segment_ids": ("batch", "length"),
    "loss_mask": ("batch", "length"),
    "labels": ("batch", "length"),
    # SFT target positions [groups, K]: one group of rows per data-parallel shard (or one per row)
    "target_pos": ("batch", None),
    "target_valid": ("batch", None),
    "position_ids": (None, "batch", "length"),
    "image_grid_thw": (None, None),
    "loss_normalizer": (),
}
# Image fields (`layout.grouped_vision`): a leading image-group axis, split like the batch rows, so each
# device encodes its own rows' images. The same fields one rank lower (no group axis: one group, all
# images of the batch) are replicated.
VISION_BATCH_AXES: dict[str, tuple[str | None, ...]] = {
    "pixel_values": ("batch", None, None),
    # models/qwen2_5_vl/layout.VisionLayout fields, as batch fields `vision_<name>` (or `<name>`)
    **{f"{prefix}{k}": ("batch",) + (None,) * n for prefix in ("vision_", "") for k, n in (
        ("window_index", 1), ("reverse_index", 1), ("window_segments", 1), ("full_segments", 1),
        ("rotary_hw", 2), ("num_patches", 0), ("full_index", 2), ("full_slot", 1))},
}


def batch_axes(batch: Mapping[str, Any], batch_size: int,
               overrides: Mapping[str, Sequence[str | None]] | None = None,
               micro_batched: bool = False) -> dict[str, tuple[str | None, ...]]:
    """Logical names per batch field: `overrides`, then BATCH_AXES, then leading-dim == batch size."""
    out = {}
    lead = (None,) if micro_batched else ()
    for key, value in batch.items():
        shape = np.shape(value)[len(lead):]
        if overrides and key in overrides:
            names = tuple(overrides[key])
        elif key in VISION_BATCH_AXES:
            names = VISION_BATCH_AXES[key] if len(shape) == len(VISION_BATCH_AXES[key]) else ()
        elif key in BATCH_AXES:
            names = BATCH_AXES[key]
        elif len(shape) >= 1 and shape[0] == batch_size:
            names = ("batch",)
        else:
            names = ()
        names = tuple(names[:len(shape)]) + (None,) * max(0, len(shape) - len(names))
        out[key] = lead + names
    return out


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh,
                    rules: str | Rules | Mapping[str, MeshAxes] | None = None, *,
                    batch_size: int,
                    overrides: Mapping[str, Sequence[str | None]] | None = None,
                    micro_batched: bool = False) -> dict[str, NamedSharding]:
    """NamedSharding per batch field (batch-major fields split over the data-parallel axes)."""
    check_batch_divisible(batch_size, mesh, rules)
    axes = batch_axes(batch, batch_size, overrides, micro_batched)
    return {k: logical_sharding(axes[k], mesh, rules, np.shape(batch[k])) for k in batch}


def shard_batch(batch: Mapping[str, Any], shardings: Mapping[str, NamedSharding], *,
                process_local: bool = False) -> dict[str, jax.Array]:
    """Host NumPy batch -> global sharded arrays.

    process_local=False: every process holds the whole global batch; each device takes its slice.
    process_local=True: each process holds only its own rows (multi-host data loading); the global
    batch is made of every process's rows (`jax.make_array_from_process_local_data`), so fields
    without a batch axis must then be identical on every process.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        sharding = shardings[key]
        if process_local:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        else:
            out[key] = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
    return out


# --------------------------------------------------------------------------------------------------
# Sharded model creation and loading
# --------------------------------------------------------------------------------------------------

def abstract_state(create_fn: Callable[[], Any], mesh: Mesh,
                   rules: str | Rules | Mapping[str, MeshAxes] | None = None) -> tuple[Any, Any, Any]:
    """(graphdef, abstract state, shardings) of `create_fn()` without allocating anything.

    The abstract state holds `jax.ShapeDtypeStruct`s that carry their target NamedSharding, ready to
    be used as an Orbax restore target or as `out_shardings`.
    """
    from flax import nnx
    with activate(mesh, rules), flax_rules(rules), nnx.use_eager_sharding(False):
        model = nnx.eval_shape(create_fn)
    graphdef, state = nnx.split(model)
    shardings = tree_shardings(state, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return graphdef, abstract, shardings


def create_sharded(create_fn: Callable[[], Any], mesh: Mesh,
                   rules: str | Rules | Mapping[str, MeshAxes] | None = None) -> tuple[Any, Any]:
    """Initialises `create_fn()` directly as sharded arrays: (graphdef, state).

    Shapes come from `nnx.eval_shape`; the initialiser is jitted with `out_shardings` from the rules,
    so each device only ever computes and holds its own shards.
    """
    from flax import nnx
    graphdef, _, shardings = abstract_state(create_fn, mesh, rules)

    def init():
        with nnx.use_eager_sharding(False):
            return nnx.split(create_fn())[1]

    with activate(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state


def load_orbax_sharded(path: str, create_fn: Callable[[], Any], mesh: Mesh,
                       rules: str | Rules | Mapping[str, MeshAxes] | None = None) -> tuple[Any, Any]:
    """Restores an Orbax (StandardCheckpointer) NNX state straight onto `mesh`: (graphdef, state).

    Every process reads only the shards its devices own; the checkpoint may have been written with
    any other mesh.
    """
    import orbax.checkpoint as ocp
    graphdef, abstract, _ = abstract_state(create_fn, mesh, rules)
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(path, abstract)
    return graphdef, state


def array_from_reader(shape: Sequence[int], dtype: Any, sharding: NamedSharding,
                      read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array built shard by shard: `read(index)` returns only the host slice `index`."""
    shape = tuple(shape)

    def callback(index):
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape)) if index else ()
        piece = np.asarray(read(index), dtype=dtype)
        expected = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
        if piece.shape != expected:
            raise ValueError(f"reader returned shape {piece.shape} for slice {index}, expected {expected}")
        return piece

    return jax.make_array_from_callback(shape, sharding, callback)


# Safetensors dtype names -> NumPy (bfloat16 through ml_dtypes, which NumPy itself lacks).
def _safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes
    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}


def safetensors_header(path: str) -> dict[str, tuple[Any, tuple[int, ...], int, int]]:
    """name -> (NumPy dtype, shape, byte offset, byte length) of every tensor of a .safetensors file."""
    import json
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    dtypes = _safetensors_dtypes()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = (dtypes[info["dtype"]], tuple(info["shape"]), 8 + n + start, end - start)
    return out


def safetensors_tensor(path: str, entry: tuple[Any, tuple[int, ...], int, int]) -> np.ndarray:
    """One tensor as a read-only np.memmap: slicing it reads only that slice from disk."""
    dtype, shape, offset, length = entry
    if length == 0 or not shape:
        with open(path, "rb") as f:
            f.seek(offset)
            return np.frombuffer(f.read(length), dtype).reshape(shape)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def safetensors_memmap(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a read-only np.memmap (bfloat16 included, which the
    `safetensors` NumPy reader cannot return)."""
    return {name: safetensors_tensor(path, e) for name, e in safetensors_header(path).items()}


def _hf_slice(kind: str, hf: np.ndarray, index: tuple[slice, ...], to_ours: Callable) -> np.ndarray:
    """Our-layout slice `index` of the HF tensor `hf`, reading only what that slice needs."""
    if kind == "copy":
        return hf[index]
    if kind == "linear":                                   # ours = hf.T
        return np.asarray(hf[index[1], index[0]]).T
    if kind in ("qkv_weight", "qkv_bias"):                 # ours[.., c, e] = hf[c * D + e, ..]
        dq = hf.shape[0] // 3
        *lead, sc, se = index if kind == "qkv_bias" else (index[0], index[1], index[2])
        rows = [hf[c * dq + se.start:c * dq + se.stop] for c in range(*sc.indices(3))]
        if kind == "qkv_bias":
            return np.stack(rows)
        return np.stack([np.asarray(r[:, lead[0]]) for r in rows]).transpose(2, 0, 1)
    if kind == "patch":                                    # ours = hf.reshape(D, -1).T
        sp, sd = index
        block = np.asarray(hf[sd])
        return block.reshape(block.shape[0], -1)[:, sp].T
    return to_ours(kind, np.asarray(hf))[index]            # any other layout: whole tensor, then slice


def _stacked_slice(kind: str, hfs: Sequence[np.ndarray], index: tuple[slice, ...],
                   to_ours: Callable) -> np.ndarray:
    """Our-layout slice `index` of a stacked parameter whose layer i is the HF tensor hfs[i]: index[0]
    picks the layers, the rest slices each layer's tensor (`_hf_slice`)."""
    layers = range(*index[0].indices(len(hfs)))
    return np.stack([_hf_slice(kind, hfs[i], index[1:], to_ours) for i in layers])


def load_pretrained_sharded(path: str, mesh: Mesh,
                            rules: str | Rules | Mapping[str, MeshAxes] | None = None,
                            **run_options: Any) -> tuple[Any, Any, Any]:
    """Qwen2.5-VL from an HF directory or a vlaa-jax (Orbax) model directory straight onto `mesh`.

    Returns (model config, graphdef, state). HF safetensors are memory-mapped and every device's
    shard is read on its own (`jax.make_array_from_callback`); an Orbax directory is restored with a
    sharded target. Neither ever holds the full model on one device (nor, for HF, in host memory).
    `run_options`: dtype / param_dtype / remat_policy / attention_impl of the model config.
    """
    import os
    from flax import nnx
    from vlaa_jax import checkpoint
    from vlaa_jax.models.qwen2_5_vl import Qwen25VL, load_config, params as hf_params
    config = load_config(path, **run_options)
    graphdef, abstract, _ = abstract_state(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)), mesh, rules)
    if checkpoint.is_model_dir(path):
        target = _str_keys(abstract.to_pure_dict())
        pure = checkpoint.load_params(path, target)
        pure = jax.tree.map(lambda a, t: a.astype(t.dtype) if a.dtype != t.dtype else a, pure, target)
        nnx.replace_by_pure_dict(abstract, pure)
        return config, graphdef, abstract
    ckpt = hf_params.HFCheckpoint(path)
    hf_params.check_no_unexpected(config, ckpt.keys(), source=path)
    headers: dict[str, dict[str, Any]] = {}
    flat = abstract.to_pure_dict()
    pure: dict[str, Any] = {}

    def memmap(entry):
        if entry.hf_name not in ckpt.files:
            raise KeyError(f"{path}: tensor {entry.hf_name!r} is missing")
        shard, stored = ckpt.files[entry.hf_name]
        file = os.path.join(path, shard)
        if shard not in headers:
            headers[shard] = safetensors_header(file)
        hf = safetensors_tensor(file, headers[shard][stored])
        if tuple(hf.shape) != entry.hf_shape:
            raise ValueError(f"{path}: tensor {entry.hf_name!r} has shape {tuple(hf.shape)}, expected "
                             f"{entry.hf_shape} for this config")
        return hf

    # One parameter at a time: an unstacked one from its HF tensor, a stacked one from its layers' tensors
    # (rows of one stacked parameter are consecutive in the table).
    groups: dict[tuple[str, ...], list[Any]] = {}
    for entry in hf_params.param_table(config):
        groups.setdefault(entry.path, []).append(entry)
    for param_path, entries in groups.items():
        # A memmap per tensor, dropped once its shards are on the devices, so pages read so far do not
        # stay mapped (resident) for the whole load.
        hfs = [memmap(e) for e in entries]            # stacked: in layer order
        kind, stacked = entries[0].kind, entries[0].layer is not None
        target = _lookup_path(flat, param_path)
        pure_node = pure
        for k in param_path[:-1]:
            pure_node = pure_node.setdefault(k, {})
        if stacked:
            read = lambda index, kind=kind, hfs=hfs: _stacked_slice(kind, hfs, index, hf_params.to_ours)
        else:
            read = lambda index, kind=kind, hf=hfs[0]: _hf_slice(kind, hf, index, hf_params.to_ours)
        pure_node[param_path[-1]] = array_from_reader(target.shape, target.dtype, target.sharding, read)
        del hfs, read
    nnx.replace_by_pure_dict(abstract, pure)
    return config, graphdef, abstract


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _lookup_path(tree: Mapping, path: Sequence[str]) -> Any:
    node = tree
    for k in path:
        node = node[int(k)] if k not in node and k.isdigit() else node[k]
    return node


# --------------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------------

def _get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default) if hasattr(config, key) else default


def _sharding_subconfig(config: Any) -> Any:
    sub = _get(config, "sharding", None)
    return config if sub is None else sub
