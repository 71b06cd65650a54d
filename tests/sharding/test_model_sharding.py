"""The real (tiny) Qwen2.5-VL with images on 8 simulated devices: every mesh gives the single-device
loss and gradients, parameters land where the rules say, checkpoints load straight onto a mesh."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.sharding.conftest import vl_forward
from tests.sharding.vl import vl_loss
from vlaa_jax import sharding as shd
from vlaa_jax.kernels import splash_attention
from vlaa_jax.models.qwen2_5_vl import from_pretrained, loading, params as hf_params, to_hf_dict
from vlaa_jax.train import optim, step as st


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def _grads_on(mesh_shape, ref, rules="fsdp_tp", **run_options):
    mesh = shd.make_mesh(mesh_shape)
    graphdef, params, rest = st.split_model(from_pretrained(ref.hf_dir, mesh=mesh, rules=rules, **run_options))
    tx = optim.make_optimizer(params, learning_rate=1e-3, total_steps=10)
    train = st.make_train_step(graphdef, vl_loss, tx, params, rest, mesh, rules)
    batch = shd.shard_batch(ref.batch, shd.batch_shardings(ref.batch, mesh, rules, batch_size=8))
    loss, _, grads = train.grads(params, rest, batch)
    return params, float(loss), grads


# Named parameters and the spec the fsdp_tp rules give them on each mesh (dims that do not divide
# stay replicated; a mesh axis of size 1 is never named). "up" / "qkv" are one block's: the stacked
# decoder / vision parameters add their (never sharded) leading layer axis, see `_stacked`.
SPEC_CHECKS = {
    (8, 1, 1): {"up": P(), "qkv": P(), "embed": P()},
    (1, 8, 1): {"up": P("fsdp"), "qkv": P("fsdp"), "embed": P(None, "fsdp")},
    (2, 2, 2): {"up": P("fsdp", "tensor"), "qkv": P("fsdp", None, "tensor"),
                "embed": P("tensor", "fsdp")},
    (1, 2, 4): {"up": P("fsdp", "tensor"), "qkv": P("fsdp", None, "tensor"),
                "embed": P("tensor", "fsdp")},
}


def _stacked(spec: P) -> P:
    """The spec of a stacked (decoder or vision) parameter whose blocks are sharded like `spec`."""
    return P(None, *spec) if len(spec) else P()


@pytest.mark.parametrize("mesh_shape", list(SPEC_CHECKS), ids=lambda s: "x".join(map(str, s)))
def test_mesh_matches_single_device(tiny_ref, mesh_shape):
    params, loss, grads = _grads_on(mesh_shape, tiny_ref)
    assert abs(loss - tiny_ref.loss) < 1e-5
    got = jax.tree.map(np.asarray, grads.to_pure_dict())
    assert jax.tree.structure(got) == jax.tree.structure(tiny_ref.grads)
    assert _max_diff(got, tiny_ref.grads) < 1e-5
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(tiny_ref.grads))
    assert scale > 1e-3   # the comparison is not vacuous
    want = SPEC_CHECKS[mesh_shape]
    lm = params["language_model"]
    assert lm["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == _stacked(want["up"])
    assert params["visual"]["blocks"]["attn"]["qkv"]["kernel"].sharding.spec == _stacked(want["qkv"])
    assert lm["embed_tokens"].sharding.spec == want["embed"]
    assert lm["norm"]["scale"].sharding.spec == P()
    # gradients come back placed like their parameters
    assert grads["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == _stacked(want["up"])


def test_remat_policies_identical_gradients(tiny_ref):
    results = {p: _grads_on((1, 8, 1), tiny_ref, remat_policy=p) for p in ("full", "save_dots")}
    for policy, (_, loss, grads) in results.items():
        assert abs(loss - tiny_ref.loss) < 1e-5, policy
        assert _max_diff(jax.tree.map(np.asarray, grads.to_pure_dict()), tiny_ref.grads) < 1e-5, policy


def _sharded_logits(path, mesh_shape, ref):
    mesh = shd.make_mesh(mesh_shape)
    graphdef, state = nnx.split(from_pretrained(path, mesh=mesh))
    batch = shd.shard_batch(ref.batch, shd.batch_shardings(ref.batch, mesh, batch_size=8))
    with shd.activate(mesh):
        logits = jax.jit(lambda s, b: vl_forward(nnx.merge(graphdef, s), b))(state, batch)
    return state, logits


def test_load_hf_and_converted_checkpoint_onto_fsdp_mesh(tiny_ref, tmp_path):
    # HF safetensors, read slice by slice onto the mesh
    state, logits = _sharded_logits(tiny_ref.hf_dir, (1, 8, 1), tiny_ref)
    kernel = state["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 64 // 8, 64)}   # both layers, a row slice
    np.testing.assert_allclose(np.asarray(logits), tiny_ref.logits, atol=1e-4, rtol=0)
    # a converted (Orbax) model directory, restored with a sharded target
    hf = hf_params.HFCheckpoint(tiny_ref.hf_dir)
    pure = hf_params.hf_to_state(tiny_ref.config, hf)
    converted = loading.save_model_dir(str(tmp_path / "converted"), pure, to_hf_dict(tiny_ref.config))
    state, logits = _sharded_logits(converted, (1, 8, 1), tiny_ref)
    assert state["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp")
    np.testing.assert_allclose(np.asarray(logits), tiny_ref.logits, atol=1e-4, rtol=0)


def test_train_step_with_micro_batches_and_frozen_vision(tiny_ref):
    """Two micro-batches in one jitted step = the mean of their gradients; the frozen vision tower
    gets no update and no optimizer state; the step donates and keeps the placement."""
    from tests.sharding.vl import make_batch
    mesh = shd.make_mesh((2, 2, 2))
    graphdef, params, rest = st.split_model(from_pretrained(tiny_ref.hf_dir, mesh=mesh))
    second = make_batch(tiny_ref.config, batch_size=8, seed=1)
    stacked = st.stack_micro_batches([tiny_ref.batch, second])
    tx = optim.make_optimizer(params, learning_rate=1e-2, total_steps=10, frozen=("^visual/",))
    trainable = optim.trainable_mask(params, ("^visual/",))
    train = st.make_train_step(graphdef, vl_loss, tx, params, rest, mesh, micro_batches=2,
                               trainable=trainable)
    batch = shd.shard_batch(stacked, shd.batch_shardings(stacked, mesh, batch_size=8,
                                                         micro_batched=True))
    single = st.make_train_step(graphdef, vl_loss, tx, params, rest, mesh, trainable=trainable)
    per = [single.grads(params, rest, shd.shard_batch(b, shd.batch_shardings(b, mesh, batch_size=8)))
           for b in (tiny_ref.batch, second)]
    loss, _, grads = train.grads(params, rest, batch)
    assert abs(float(loss) - (float(per[0][0]) + float(per[1][0])) / 2) < 1e-5
    mean = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, per[0][2], per[1][2])
    assert _max_diff(jax.tree.map(np.asarray, grads), mean) < 1e-5
    assert all(float(np.max(np.abs(g))) == 0 for g in jax.tree.leaves(grads["visual"]))
    before = jax.tree.map(np.asarray, params.to_pure_dict())
    opt_state = st.init_optimizer(tx, params, mesh)
    assert len(jax.tree.leaves(opt_state)) < 2 * len(jax.tree.leaves(params)) + 2  # no vision moments
    new_params, opt_state, metrics = train(params, opt_state, rest, batch)
    assert abs(float(metrics["loss"]) - float(loss)) < 1e-5
    after = jax.tree.map(np.asarray, new_params.to_pure_dict())
    assert _max_diff(after["visual"], before["visual"]) == 0
    assert _max_diff(after["language_model"], before["language_model"]) > 0
    up = new_params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.spec == P(None, "fsdp", "tensor")
    assert params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].is_deleted()  # donated


def test_splash_attention_model_matches_xla(tiny_ref, monkeypatch):
    """Both towers with attention_impl="splash" (Pallas interpreter on CPU) on a (2, 2, 2) mesh give
    the XLA logits on every real token."""
    monkeypatch.setattr(splash_attention, "dot_product_attention",  # the Pallas interpreter on CPU
                        functools.partial(splash_attention.dot_product_attention, interpret=True))
    mesh = shd.make_mesh((2, 2, 2))
    graphdef, state = nnx.split(from_pretrained(tiny_ref.hf_dir, mesh=mesh, attention_impl="splash"))
    batch = shd.shard_batch(tiny_ref.batch, shd.batch_shardings(tiny_ref.batch, mesh, batch_size=8))
    with shd.activate(mesh):
        logits = jax.jit(lambda s, b: vl_forward(nnx.merge(graphdef, s), b))(state, batch)
    real = tiny_ref.batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], tiny_ref.logits[real], atol=1e-4, rtol=0)
