"""The GRPO update's loss and gradients with the images in one image group per data-parallel device
(`PromptBatch.rows` with `GroupShape(groups=...)`, what the trainer builds on a mesh) equal those with all
images in one group on one device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline.model_inputs import GroupShape, PromptBatch
from tests.fixtures.hf_models import tiny_hf_config_dict
from tests.sharding.vl import make_batch
from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl import Qwen25VL, from_hf_dict, layout
from vlaa_jax.rl import grpo as grpo_lib
from vlaa_jax.train import common
from vlaa_jax.train.grpo_step import grpo_loss_fn


@pytest.fixture(scope="module")
def setup():
    config = from_hf_dict(tiny_hf_config_dict(True))
    model = Qwen25VL(config, rngs=nnx.Rngs(4))
    raw = make_batch(config, batch_size=4, length=32, seed=7, images=((4, 4), (4, 6), (6, 4), (8, 4)))
    grids = np.asarray([[1, h, w] for h, w in ((4, 4), (4, 6), (6, 4), (8, 4))])
    _, deltas = layout.mrope_positions(raw["input_ids"], grids, raw["attention_mask"],
                                       image_token_id=config.image_token_id,
                                       vision_start_token_id=config.vision_start_token_id)
    offsets = np.concatenate([[0], np.cumsum(np.prod(grids, axis=1))])
    prompts = PromptBatch(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"],
                          position_ids=raw["position_ids"], rope_deltas=deltas,
                          patches=tuple(raw["pixel_values"][offsets[i]:offsets[i + 1]] for i in range(4)), grids=grids,
                          records=({},) * 4, image_hw=(((16, 16), (16, 16)),) * 4, max_pixels=32 * 14 * 14)
    rs = np.random.RandomState(0)
    responses = rs.randint(3, 200, size=(4, 6)).astype(np.int32)
    resp_mask = np.ones((4, 6), np.int32)
    resp_mask[1, 4:] = 0
    extra = dict(response_mask=resp_mask, advantages=np.array([1.0, -0.5, 0.25, -1.0], np.float32),
                 kl_coef=np.float32(0.0), loss_normalizer=np.float32(4.0))
    return config, model, prompts, responses, resp_mask, extra


def _loss(model, batch):
    cfg = grpo_lib.GRPOConfig()
    return grpo_loss_fn(model, batch, cfg=cfg, chunk_size=8, temperature=0.8)[0]


def _batch(setup, groups, full_rows):
    config, _, prompts, responses, resp_mask, extra = setup
    b = prompts.rows(np.arange(4), config, GroupShape(groups, 128, full_rows), responses=responses,
                     response_mask=resp_mask)
    b.pop("rope_deltas")
    return {**b, **extra}


@pytest.mark.parametrize("mesh_shape", [(4, 1, 1), (2, 2, 1)])
def test_grouped_images_sharded_match_one_group(setup, mesh_shape):
    if jax.device_count() < 4:
        pytest.skip("needs 4 (simulated) devices")
    _, model, *_ = setup
    one = _batch(setup, 1, False)
    assert one["pixel_values"].shape[:2] == (1, 128)
    ref_loss, ref_grads = nnx.value_and_grad(_loss)(model, {k: jnp.asarray(v) for k, v in one.items()})
    mesh = shd.make_mesh(mesh_shape, jax.devices()[:4])
    rules = shd.resolve_rules(None)
    for full_rows in (False, True):
        host = _batch(setup, 4, full_rows)
        assert host["pixel_values"].shape[:2] == (4, 128)
        batch = common.put_batch(host, mesh, rules, batch_size=4)
        assert batch["pixel_values"].sharding.spec[0] is not None       # each device holds its own images
        graphdef, state = nnx.split(model)
        with shd.activate(mesh, rules):
            loss, grads = jax.jit(jax.value_and_grad(lambda s, b: _loss(nnx.merge(graphdef, s), b)))(state, batch)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     grads.to_pure_dict(), ref_grads.to_pure_dict())
