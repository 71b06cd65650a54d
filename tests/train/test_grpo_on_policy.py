"""The on-policy GRPO update (one optimiser update per rollout batch: old-policy log-probs from the
update's own forward, `grpo_step.old_logprob_source` "update") against the general path (old-policy
log-probs recomputed with the training forward first), and the image-group pixel buckets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import buckets
from data_pipeline.model_inputs import patch_bucket
from tests.fixtures.hf_models import tiny_hf_config_dict
from vlaa_jax.models import qwen2_5_vl as qwen
from vlaa_jax.models.qwen2_5_vl.config import VisionConfig
from vlaa_jax.rl import GRPOConfig
from vlaa_jax.rl.kl import kl_penalty
from vlaa_jax.train import grpo_step

B, LP, T = 4, 6, 5


@pytest.fixture(scope="module")
def model_and_batch():
    mcfg = qwen.from_hf_dict(tiny_hf_config_dict(), source="test")
    graphdef, params, rest = nnx.split(qwen.Qwen25VL(mcfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    rs = np.random.RandomState(0)
    ids = rs.randint(3, 400, size=(B, LP + T)).astype(np.int32)
    mask = np.ones((B, LP + T), np.int32)
    mask[1, :2] = 0  # a left-padded prompt
    resp_mask = np.ones((B, T), np.int32)
    resp_mask[2, 3:] = 0  # a response that ended early
    mask[:, LP:] = resp_mask
    pos = np.broadcast_to(np.maximum(np.cumsum(mask, axis=1) - 1, 0)[None], (3, B, LP + T)).astype(np.int32)
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=pos, response_mask=resp_mask,
                 advantages=rs.randn(B).astype(np.float32), kl_coef=np.float32(0.05),
                 loss_normalizer=np.float32(B), ref_logp=(-3.0 + 0.5 * rs.randn(B, T)).astype(np.float32))
    return graphdef, params, rest, {k: jnp.asarray(v) for k, v in batch.items()}


def _loss(graphdef, rest, batch, cfg):
    def f(params):
        return grpo_step.grpo_loss_fn(nnx.merge(graphdef, params, rest), batch, cfg=cfg, chunk_size=4,
                                      temperature=0.8)
    return jax.jit(jax.value_and_grad(f, has_aux=True))


def test_on_policy_update_equals_recomputed_old_logprobs(model_and_batch):
    graphdef, params, rest, batch = model_and_batch
    cfg = GRPOConfig(kl_estimator="k3", loss_agg_mode="seq-mean-token-mean")
    old = jax.jit(lambda p: grpo_step.response_logprobs(nnx.merge(graphdef, p, rest), batch, chunk_size=4,
                                                         temperature=0.8)[0])(params)
    (loss_ref, m_ref), g_ref = _loss(graphdef, rest, dict(batch, old_logp=old), cfg)(params)
    (loss_on, m_on), g_on = _loss(graphdef, rest, batch, cfg)(params)
    np.testing.assert_allclose(loss_on, loss_ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert float(m_on["ratio_mean"]) == 1.0 and float(m_on["clipfrac"]) == 0.0
    # kl_sum: what the trainer turns into KL(old || ref) per token for the KL controller.
    m = np.asarray(batch["response_mask"], np.float64)
    kl = np.asarray(kl_penalty(old, batch["ref_logp"], "k3"), np.float64)
    np.testing.assert_allclose(float(m_on["kl_sum"]), (kl * m).sum(), rtol=1e-5)
    assert float(jnp.abs(jnp.asarray(jax.tree.leaves(g_on)[0])).sum()) > 0


def test_patch_bucket_uses_the_loaders_pixel_buckets():
    vision = VisionConfig()
    table = buckets.pixel_buckets(16, 256 * 28 * 28, vision)
    assert len(table) <= 4
    seen = {patch_bucket(n, 16, 256 * 28 * 28, vision) for n in range(16, table[-1] + 1, 16)}
    assert seen == set(table)
    assert patch_bucket(table[-1] + 1, 16, 256 * 28 * 28, vision) == table[-1] + 64
