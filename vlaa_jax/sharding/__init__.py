"""Device meshes, the ONE logical-axis -> mesh-axis table, and placement: the lowest floor of the
package (it imports nothing of vlaa_jax).

Model code only ever names *logical* axes on its parameters and activations; which mesh axis (`data`,
`fsdp`, `tensor`) a logical axis lands on is decided by the rules table and can be chosen in config
(`sharding.rules`: a preset name or a list of (logical, mesh) pairs). Nothing else in the code base
names mesh axes.

    rules.py      logical axes, rule presets, `resolve_rules`, `logical_to_spec`, `use_rules`
    mesh.py       `make_mesh` / `mesh_from_config`, `activate` (mesh + rules), data-parallel size
    placement.py  NamedShardings of arrays and state trees, `constrain`, `abstract_state`, `create_sharded`
    batch.py      `BATCH_AXES` (which batch fields are split, which replicated), `shard_batch`

Use it as `from vlaa_jax import sharding as shd; shd.make_mesh(...)`.
"""
from vlaa_jax.sharding.batch import BATCH_AXES, batch_axes, batch_shardings, shard_batch
from vlaa_jax.sharding.mesh import (
    activate, check_batch_divisible, data_parallel_size, make_mesh, mesh_from_config, resolve_mesh_shape)
from vlaa_jax.sharding.placement import (
    abstract_state, constrain, create_sharded, logical_sharding, tree_shardings)
from vlaa_jax.sharding.rules import (
    ACTIVATION_AXES, DEFAULT_RULES, DP_RULES, FSDP_RULES, FSDP_TP_RULES, LOGICAL_AXES, LOGITS_AXES, MESH_AXES,
    MLP_AXES, RULE_PRESETS, MeshAxes, ResolvedRules, Rules, RulesLike, active_rules, flax_rules,
    logical_to_spec, resolve_rules, rules_from_config, use_rules)

__all__ = [
    "BATCH_AXES", "batch_axes", "batch_shardings", "shard_batch",
    "activate", "check_batch_divisible", "data_parallel_size", "make_mesh", "mesh_from_config",
    "resolve_mesh_shape",
    "abstract_state", "constrain", "create_sharded", "logical_sharding", "tree_shardings",
    "ACTIVATION_AXES", "DEFAULT_RULES", "DP_RULES", "FSDP_RULES", "FSDP_TP_RULES", "LOGICAL_AXES", "LOGITS_AXES",
    "MESH_AXES", "MLP_AXES", "RULE_PRESETS", "MeshAxes", "ResolvedRules", "Rules", "RulesLike", "active_rules",
    "flax_rules", "logical_to_spec", "resolve_rules", "rules_from_config", "use_rules",
]
