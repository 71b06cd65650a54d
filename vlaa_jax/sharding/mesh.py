"""Device meshes over (data, fsdp, tensor), the data-parallel size, and the mesh + rules context."""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from vlaa_jax.sharding.rules import MESH_AXES, RulesLike, config_value, mesh_sizes, resolve_rules, use_rules


def check_mesh_shape(mesh_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as ints if it can fit some device count (one entry per mesh axis, each positive or -1,
    at most one -1); ValueError otherwise. Needs no devices, so configs are checked before start-up."""
    if isinstance(mesh_shape, (str, bytes)) or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in mesh_shape):
        raise ValueError(f"mesh_shape {mesh_shape!r} must be {len(MESH_AXES)} integers, for axes {MESH_AXES}")
    shape = tuple(int(s) for s in mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape {shape} must have {len(MESH_AXES)} entries, for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape {shape}: at most one entry may be -1 (the rest of the devices)")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape {shape}: entries must be positive or -1")
    return shape


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces one -1 by the rest of the devices; checks that the product is the device count."""
    shape = check_mesh_shape(mesh_shape)
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
    return make_mesh(tuple(config_value(config, "mesh_shape", (1, -1, 1))), devices)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: RulesLike = None) -> Iterator[None]:
    """`jax.set_mesh(mesh)` plus `use_rules(rules)`: open while creating models or tracing steps."""
    with jax.set_mesh(mesh), use_rules(rules):
        yield


def data_parallel_size(mesh: Mesh, rules: RulesLike = None) -> int:
    """How many ways the batch is split: the product of the mesh axes the `batch` rule names."""
    table = dict(resolve_rules(rules))
    sizes = mesh_sizes(mesh)
    return math.prod(sizes[a] for a in table["batch"] if a in sizes)


def check_batch_divisible(batch_size: int, mesh: Mesh, rules: RulesLike = None,
                          what: str = "batch size") -> None:
    """Raises a clear error unless `batch_size` splits evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh, rules)
    if batch_size % dp:
        table = dict(resolve_rules(rules))
        raise ValueError(
            f"{what} {batch_size} is not divisible by the data-parallel size {dp} (mesh axes "
            f"{table['batch']} of mesh {mesh_sizes(mesh)})")
