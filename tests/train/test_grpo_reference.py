"""The GRPO reference policy: a copy of the initial parameters in `grpo.ref_dtype` (bf16 by default),
sharded like them, whose log-probs stay within the weights' rounding of the fp32 policy's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlaa_jax import sharding as shd
from vlaa_jax.models import qwen2_5_vl as qwen
from vlaa_jax.train import grpo_step


@pytest.mark.parametrize("ref_dtype,want", [("param", jnp.float32), ("float32", jnp.float32),
                                            ("bfloat16", jnp.bfloat16)])
def test_reference_params_casts_floating_leaves_into_a_copy(ref_dtype, want):
    mesh = shd.make_mesh((2, 1, 4))
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    x = jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4), NS(mesh, P("data")))
    steps = jax.device_put(np.arange(8, dtype=np.int32), NS(mesh, P()))
    ref = grpo_step.reference_params({"w": x, "steps": steps}, ref_dtype)
    assert ref["w"].dtype == want and ref["steps"].dtype == jnp.int32
    assert ref["w"].sharding == x.sharding
    x.delete()  # the trainer donates its params each update: the reference must not share their buffers
    np.testing.assert_array_equal(np.asarray(ref["w"], np.float32), np.arange(32).reshape(8, 4))


def test_bf16_reference_logprobs_are_close_to_fp32():
    """The trainer's response log-probs (`response_logprobs`, jitted as the trainer does) take the bf16
    tree as it is (the model casts weights to the compute dtype) and move only by the weights' rounding."""
    from tests.fixtures.hf_models import tiny_hf_config_dict
    mcfg = qwen.from_hf_dict(tiny_hf_config_dict(), source="test")
    graphdef, params, rest = nnx.split(qwen.Qwen25VL(mcfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    ref = grpo_step.reference_params(params, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(ref)} == {jnp.dtype(jnp.bfloat16)}
    rs = np.random.RandomState(0)
    B, L, T = 4, 12, 6
    ids = rs.randint(3, 400, (B, L)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    mask[1, :3] = 0  # a left-padded prompt
    resp = (np.arange(T)[None] < rs.randint(1, T + 1, (B, 1))).astype(np.int32)
    mask[:, L - T:] = resp
    pos = np.broadcast_to(np.maximum(np.cumsum(mask, axis=1) - 1, 0)[None], (3, B, L)).astype(np.int32)
    batch = {k: jnp.asarray(v) for k, v in dict(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                 response_mask=resp).items()}
    fn = jax.jit(lambda p: grpo_step.response_logprobs(nnx.merge(graphdef, p, rest), batch, chunk_size=4,
                                                       temperature=0.8)[0])
    fp32, bf16 = np.asarray(fn(params)), np.asarray(fn(ref))
    m = resp > 0
    assert (fp32[m] < -1).all() and (bf16[~m] == 0).all()
    assert np.abs(bf16 - fp32)[m].max() > 0  # the copy is bf16 indeed
    np.testing.assert_allclose(bf16[m], fp32[m], rtol=1e-2)  # log-probs -4 .. -9 here, moved by < 0.3%
