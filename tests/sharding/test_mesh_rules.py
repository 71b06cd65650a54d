"""Meshes, the rules table, placement helpers, the optimizer, the train step on a toy model, splash
attention (Pallas interpreter) and distributed settings: fast, no big model."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.sharding.toy import Toy, toy_loss
from vlaa_jax import distributed, nn, sharding as shd
from vlaa_jax.train import optim, step as st


# ------------------------------------------------------------------------------------------ meshes

def test_mesh_shape_resolution_and_errors():
    assert shd.resolve_mesh_shape((1, -1, 1), 8) == (1, 8, 1)
    assert shd.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        shd.resolve_mesh_shape((1, 6, 1), 8)
    with pytest.raises(ValueError, match="do not divide"):
        shd.resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="at most one entry may be -1"):
        shd.resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="3 entries"):
        shd.resolve_mesh_shape((8,), 8)
    mesh = shd.mesh_from_config(ml_collections.ConfigDict({"sharding": {"mesh_shape": (2, -1, 2)}}))
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_presets_overrides_and_specs():
    mesh = shd.make_mesh((2, 2, 2))
    names = ("embed", "mlp")
    assert shd.logical_to_spec(names, "fsdp_tp", shape=(8, 8), mesh=mesh) == P("fsdp", "tensor")
    assert shd.logical_to_spec(names, "fsdp", shape=(8, 8), mesh=mesh) == P("fsdp")
    assert shd.logical_to_spec(names, "dp", shape=(8, 8), mesh=mesh) == P()
    # dims that the mesh axes do not divide stay replicated; size-1 axes are never named
    assert shd.logical_to_spec(names, "fsdp_tp", shape=(5, 8), mesh=mesh) == P(None, "tensor")
    assert shd.logical_to_spec(names, "fsdp_tp", shape=(8, 8), mesh=shd.make_mesh((8, 1, 1))) == P()
    # a mesh axis is used once per array: the activation's embed loses fsdp to the batch
    act = ("batch", "length", "embed")
    assert shd.logical_to_spec(act, "fsdp_tp", shape=(8, 4, 8), mesh=mesh) == P(("data", "fsdp"))
    assert shd.logical_to_spec(act, "dp", shape=(8, 4, 8), mesh=mesh) == P(("data", "fsdp", "tensor"))
    # overrides on top of the default table, from a list of pairs or a config
    rules = shd.rules_from_config(ml_collections.ConfigDict(
        {"sharding": {"rules": [["mlp", ["fsdp", "tensor"]], ["embed", None]]}}))
    assert shd.logical_to_spec(names, rules, shape=(8, 8), mesh=mesh) == P(None, ("fsdp", "tensor"))
    with pytest.raises(ValueError, match="unknown preset 'zero3'"):
        shd.resolve_rules("zero3")
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        shd.resolve_rules([("mlp", "model")])
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        shd.resolve_rules([("hidden", "fsdp")])


def test_batch_divisibility_and_batch_placement():
    mesh = shd.make_mesh((2, 2, 2))
    assert shd.data_parallel_size(mesh, "fsdp_tp") == 4
    assert shd.data_parallel_size(mesh, "dp") == 8
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the data-parallel size 4"):
        shd.check_batch_divisible(6, mesh, "fsdp_tp")
    batch = {"input_ids": np.zeros((4, 6), np.int32), "position_ids": np.zeros((3, 4, 6), np.int32),
             "pixel_values": np.zeros((10, 12), np.float32), "advantages": np.zeros((4,), np.float32)}
    sh = shd.batch_shardings(batch, mesh, batch_size=4)
    assert sh["input_ids"].spec == P(("data", "fsdp"))
    assert sh["position_ids"].spec == P(None, ("data", "fsdp"))
    assert sh["pixel_values"].spec == P()
    assert sh["advantages"].spec == P(("data", "fsdp"))
    # image fields with their group axis are split like the rows; one group (one rank less) is replicated
    grouped = {"pixel_values": np.zeros((4, 10, 12), np.float32), "vision_rotary_hw": np.zeros((4, 10, 2)),
               "vision_num_patches": np.zeros((4,), np.int32), "num_patches": np.zeros((), np.int32)}
    specs = {k: v.spec for k, v in shd.batch_shardings(grouped, mesh, batch_size=4).items()}
    assert specs == {"pixel_values": P(("data", "fsdp")), "vision_rotary_hw": P(("data", "fsdp")),
                     "vision_num_patches": P(("data", "fsdp")), "num_patches": P()}
    arrays = shd.shard_batch(batch, sh)
    assert arrays["input_ids"].addressable_shards[0].data.shape == (1, 6)


def test_constrain_is_a_noop_without_mesh_and_places_with_one():
    x = jnp.ones((8, 4, 16))
    assert shd.constrain(x, ("batch", "length", "embed")) is x
    mesh = shd.make_mesh((1, 2, 4))
    with shd.activate(mesh, "fsdp_tp"):
        y = jax.jit(lambda a: shd.constrain(a * 2, ("batch", "length", "mlp")))(x)
    assert y.sharding.spec == P("fsdp", None, "tensor")


# --------------------------------------------------------------------------------- optimizer

def test_schedule_warmup_cosine_floor():
    sched = optim.lr_schedule(1e-3, total_steps=100, warmup_steps=10, min_learning_rate=1e-4)
    assert float(sched(0)) == 0.0
    assert math.isclose(float(sched(5)), 5e-4, rel_tol=1e-5)
    assert math.isclose(float(sched(10)), 1e-3, rel_tol=1e-5)
    mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 45 / 90))
    assert math.isclose(float(sched(55)), mid, rel_tol=1e-5)
    assert math.isclose(float(sched(100)), 1e-4, rel_tol=1e-5)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.lr_schedule(1e-3, total_steps=10, warmup_steps=20)


def test_optimizer_matches_optax_adamw_with_clipping_and_frozen_leaves():
    params = {"vision": {"w": jnp.ones((3, 3))}, "text": {"w": jnp.full((3, 3), 2.0), "b": jnp.ones(3)}}
    grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
    tx = optim.make_optimizer(params, learning_rate=0.1, total_steps=10, weight_decay=0.1,
                              max_grad_norm=1.0, frozen=("^vision/",))
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    assert np.all(np.asarray(updates["vision"]["w"]) == 0)
    # reference: clip over the trainable grads only, then optax.adamw (decay on matrices only)
    text_g = grads["text"]
    norm = optax.global_norm(text_g)
    clipped = jax.tree.map(lambda g: g / jnp.maximum(norm, 1.0), text_g)
    ref_tx = optax.adamw(optim.lr_schedule(0.1, 10), weight_decay=0.1,
                         mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    ref, _ = ref_tx.update(clipped, ref_tx.init(params["text"]), params["text"])
    for k in ("w", "b"):
        np.testing.assert_allclose(updates["text"][k], ref[k], rtol=1e-6)
    with pytest.raises(ValueError, match="freezes every parameter"):
        optim.make_optimizer(params, learning_rate=0.1, total_steps=10, frozen=(".",))


# --------------------------------------------------------------------------- toy train step

def _toy(mesh, rules="fsdp_tp", remat="none"):
    graphdef, state = shd.create_sharded(lambda: Toy(remat=remat, rngs=nnx.Rngs(0)), mesh, rules)
    params, rest = st.split_state(state)
    return graphdef, params, rest


def _toy_batch(rows=8, seed=0):
    rs = np.random.RandomState(seed)
    return {"input_ids": rs.randint(0, 64, (rows, 16)).astype(np.int32),
            "loss_mask": (rs.rand(rows, 16) > 0.3).astype(np.int32)}


def test_sharded_creation_places_params_by_rules():
    mesh = shd.make_mesh((1, 2, 4))
    _, params, _ = _toy(mesh)
    assert params["embed"].sharding.spec == P("tensor", "fsdp")
    assert params["blocks"][0]["q"].sharding.spec == P("fsdp", "tensor")
    assert params["blocks"][0]["down"].sharding.spec == P("tensor", "fsdp")
    assert params["blocks"][0]["norm"].sharding.spec == P()
    assert params["embed"].addressable_shards[0].data.shape == (16, 16)
    # same values as an unsharded creation
    with nnx.use_eager_sharding(False):
        ref = nnx.state(Toy(rngs=nnx.Rngs(0)), nnx.Param)
    np.testing.assert_allclose(np.asarray(params["embed"][...]), np.asarray(ref["embed"][...]),
                               rtol=1e-6)  # same random stream (jit may fuse the scaling)


def test_micro_batch_accumulation_equals_full_batch():
    mesh = shd.make_mesh((2, 4, 1))
    graphdef, params, rest = _toy(mesh)
    tx = optim.make_optimizer(params, learning_rate=1e-2, total_steps=10)
    batch = _toy_batch(16)
    batch["loss_mask"][:] = 1     # equal token counts, so the mean of means is the full mean
    full = st.make_train_step(graphdef, toy_loss, tx, params, rest, mesh)
    accum = st.make_train_step(graphdef, toy_loss, tx, params, rest, mesh, micro_batches=2)
    b1 = shd.shard_batch(batch, shd.batch_shardings(batch, mesh, batch_size=16))
    micro = st.split_micro_batches(batch, 2, batch_size=16)
    b2 = shd.shard_batch(micro, shd.batch_shardings(micro, mesh, batch_size=8, micro_batched=True))
    assert b2["input_ids"].sharding.spec == P(None, ("data", "fsdp"))
    l1, _, g1 = full.grads(params, rest, b1)
    l2, _, g2 = accum.grads(params, rest, b2)
    assert abs(float(l1) - float(l2)) < 1e-5
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g1, g2)
    assert max(jax.tree.leaves(diff)) < 1e-5
    with pytest.raises(ValueError, match="not divisible by micro_batches=3"):
        st.split_micro_batches(batch, 3, batch_size=16)


def test_train_step_descends_donates_and_keeps_shardings():
    mesh = shd.make_mesh((1, 8, 1))
    graphdef, params, rest = _toy(mesh)
    tx = optim.make_optimizer(params, learning_rate=3e-2, total_steps=20)
    train = st.make_train_step(graphdef, toy_loss, tx, params, rest, mesh)
    opt_state = st.init_optimizer(tx, params, mesh)
    mu = opt_state[1][0].mu
    assert mu["blocks"][0]["up"].sharding.spec == P("fsdp")
    batch = shd.shard_batch(_toy_batch(), shd.batch_shardings(_toy_batch(), mesh, batch_size=8))
    losses = []
    for _ in range(5):
        old = params
        params, opt_state, metrics = train(params, opt_state, rest, batch)
        losses.append(float(metrics["loss"]))
    assert old["embed"].is_deleted()
    assert losses[-1] < losses[0]
    assert params["blocks"][0]["up"].sharding.spec == P("fsdp")
    assert len(train._compiled) == 1     # one compilation for the whole loop

# ------------------------------------------------------------------------------------ splash kernel

def test_splash_attention_matches_xla_in_interpreter():
    """Packed segments, left padding (segment 0: rows with no allowed key) and a length that is not a
    multiple of 128 (padded inside), through the segment-id and the dense-mask paths, with gradients
    under a mesh (shard_map)."""
    from vlaa_jax.kernels import splash_attention as splash
    B, T, N, K, H = 2, 100, 4, 2, 32
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, K, H)),
               jax.random.normal(ks[2], (B, T, K, H)))
    seg = np.ones((B, T), np.int32)
    seg[0, 70:] = 2
    seg[1, :10] = 0
    seg[1, 50:] = 3
    real = seg > 0
    mask = nn.attention_mask(jnp.asarray(seg), jnp.asarray(seg), causal=True)
    ref = nn.dot_product_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="needs a TPU.*'xla'"):
        splash.dot_product_attention(q, k, v, mask)
    out = splash.dot_product_attention(q, k, v, segment_ids=jnp.asarray(seg), causal=True,
                                       interpret=True)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)
    weights = jnp.asarray(real, jnp.float32)[:, :, None, None]
    with shd.activate(shd.make_mesh((2, 2, 2))):
        fn = jax.jit(jax.value_and_grad(
            lambda q: (splash.dot_product_attention(q, k, v, mask, interpret=True) * weights).sum()))
        val, grad = fn(q)
    ref_val, ref_grad = jax.value_and_grad(
        lambda q: (nn.dot_product_attention(q, k, v, mask) * weights).sum())(q)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-4)


# ------------------------------------------------------------------------------- distributed

def test_distributed_settings_from_config_env_and_cluster():
    assert distributed.resolve_settings(env={}) is None
    cfg = {"distributed": {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                           "process_id": 2}}
    assert distributed.resolve_settings(cfg, env={}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    env = {"VLAA_COORDINATOR_ADDRESS": "h:1", "VLAA_NUM_PROCESSES": "2", "VLAA_PROCESS_ID": "1"}
    assert distributed.resolve_settings(None, env=env)["process_id"] == 1
    assert distributed.resolve_settings(None, env={"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == {}
    assert distributed.resolve_settings(None, env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) == {}
    assert distributed.resolve_settings(None, env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    with pytest.raises(ValueError, match="not \\['num_processes', 'process_id'\\]"):
        distributed.resolve_settings({"coordinator_address": "h:1"}, env={})
    assert distributed.is_main_process()
    assert distributed.process_batch_slice(8) == slice(0, 8)
