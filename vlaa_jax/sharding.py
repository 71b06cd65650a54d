"""Logical axis names and the ONE table that maps them to mesh axes.

Model code only ever names *logical* axes (below) on its parameters and activations; which mesh axis
(`data`, `fsdp`, `tensor`) a logical axis lands on is decided here, and can be overridden from config.
"""
from __future__ import annotations

from typing import Sequence

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical axes used by the model (parameters and activation constraints).
#   vocab     embedding rows / lm_head output           embed     model width (text or vision)
#   mlp       SwiGLU intermediate width                 heads     query heads * head_dim (flattened)
#   kv_heads  key/value heads * head_dim (flattened)    patch     flattened patch input (3*2*14*14)
#   batch     batch rows of activations                 length    sequence positions of activations
#   norm      RMSNorm scales (always replicated)
LOGICAL_AXES: tuple[str, ...] = (
    "vocab", "embed", "mlp", "heads", "kv_heads", "patch", "batch", "length", "norm")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# FSDP over `fsdp`, Megatron-style tensor parallelism over `tensor`, batch over `data` x `fsdp`.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("patch", None),
    ("norm", None),
)
