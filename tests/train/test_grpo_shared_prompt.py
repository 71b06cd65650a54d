"""The grouped layout of the GRPO forward (`GRPOStep.micro_batch(grouped=True)`: each prompt once, then its
n responses, `response_logprobs` with the shared-prefix mask) gives the log-probs, entropies, loss and
gradients of the one-row-per-response layout, on prompts with images and responses of different lengths
(one fully masked, as dynamic sampling leaves a dropped group's rows)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline.model_inputs import PromptBatch
from tests.fixtures.hf_models import tiny_hf_config_dict
from tests.sharding.vl import make_batch
from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl import Qwen25VL, from_hf_dict, layout
from vlaa_jax.rl import grpo as grpo_lib
from vlaa_jax.train import grpo_step as gs

N, T = 3, 5
IMAGES = ((4, 4), (4, 6))


def settings(**kw) -> gs.GRPOSettings:
    base = dict(num_samples=N, temperature=0.8, top_p=1.0, max_new_tokens=T, rollout_micro_batch=0,
                rollout_engine="continuous", rollout_slots=2 * N, logprob_chunk=4, update_epochs=1,
                batch_size=2 * N, grad_accum_steps=1, dynamic_sampling=False, old_logprobs="recompute",
                use_ref=False, loss=grpo_lib.GRPOConfig(), updates_per_step=1)
    return gs.GRPOSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def setup():
    config = from_hf_dict(tiny_hf_config_dict(True))
    model = Qwen25VL(config, rngs=nnx.Rngs(2))
    raw = make_batch(config, batch_size=2, length=24, seed=3, images=IMAGES)
    # left-padded, as the loader lays prompts out (the response follows the prompt's last token)
    shift = raw["attention_mask"].shape[1] - raw["attention_mask"].sum(1)
    ids, mask = (np.stack([np.roll(x[i], shift[i]) for i in range(2)])
                 for x in (raw["input_ids"], raw["attention_mask"]))
    grids = np.asarray([[1, h, w] for h, w in IMAGES])
    pos, deltas = layout.mrope_positions(ids, grids, mask, image_token_id=config.image_token_id,
                                         vision_start_token_id=config.vision_start_token_id)
    offsets = np.concatenate([[0], np.cumsum(np.prod(grids, axis=1))])
    prompts = PromptBatch(input_ids=ids, attention_mask=mask, position_ids=pos.astype(np.int32), rope_deltas=deltas,
                          patches=tuple(raw["pixel_values"][offsets[i]:offsets[i + 1]] for i in range(2)), grids=grids,
                          records=({},) * 2, image_hw=(((16, 16), (16, 16)),) * 2, max_pixels=32 * 14 * 14)
    rs = np.random.RandomState(0)
    tokens = rs.randint(3, 200, size=(2 * N, T)).astype(np.int32)
    mask = np.ones((2 * N, T), np.int32)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    mask[4, :] = 0
    rollout = gs.Rollout(prompts=prompts, prompt_index=np.repeat(np.arange(2), N), tokens=tokens, mask=mask,
                         logprobs=np.zeros((2 * N, T), np.float32), texts=("",) * (2 * N), stats=None)
    scored = gs.ScoredRollout(rollout, np.zeros(2 * N, np.float32), {})
    adv = np.array([1.0, -0.5, 0.25, -1.0, 0.5, 0.75], np.float32)
    batch = gs.TrainBatch(scored, adv, mask, None, rs.normal(-3, 0.5, (2 * N, T)).astype(np.float32), 0.1)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    graphdef, state = nnx.split(model)
    step = gs.GRPOStep(settings(), graphdef, None, config, mesh, shd.resolve_rules(None), (), 0)
    return model, step, batch


def _fields(step, batch, grouped):
    shape = step.update_shape(batch.scored.rollout.prompts, grouped)
    host = step.micro_batch(batch, np.arange(2 * N), shape, loss_normalizer=float(2 * N), grouped=grouped)
    return {k: jnp.asarray(v) for k, v in host.items()}


def test_grouped_layout_rows(setup):
    _, step, batch = setup
    one, grouped = _fields(step, batch, False), _fields(step, batch, True)
    assert one["input_ids"].shape[0] == 2 * N and grouped["input_ids"].shape[0] == 2
    assert grouped["input_ids"].shape[1] == one["input_ids"].shape[1] + (N - 1) * T
    assert grouped["pixel_values"].shape[1] < one["pixel_values"].shape[1]   # each prompt's image once
    seg = np.asarray(grouped["attention_mask"])[:, -N * T:].reshape(2, N, T)
    np.testing.assert_array_equal(seg, (2 + np.arange(N))[None, :, None] * batch.response_mask.reshape(2, N, T))
    rollout = batch.scored.rollout
    parts = [getattr(step, f) for f in ("graphdef", "rest", "mcfg", "mesh", "rules", "stop_ids", "pad_id")]
    assert step.grouped(rollout)
    for other in (dict(num_samples=1), dict(updates_per_step=2), dict(batch_size=4)):   # batch_size: 4 % 3
        assert not gs.GRPOStep(settings(**other), *parts).grouped(rollout), other
    long = dataclasses.replace(rollout, tokens=np.zeros((2 * N, 64), np.int32))  # 24 + 3*64 columns > 3 rows of 88
    assert not step.grouped(long)


def test_grouped_logprobs_loss_and_grads_match(setup):
    model, step, batch = setup
    one, grouped = _fields(step, batch, False), _fields(step, batch, True)
    lp1, ent1 = gs.response_logprobs(model, one, chunk_size=4, temperature=0.8)
    lp2, ent2 = gs.response_logprobs(model, grouped, chunk_size=4, temperature=0.8)
    assert lp2.shape == (2 * N, T)
    assert float(jnp.abs(lp1).sum()) > 0
    np.testing.assert_allclose(np.asarray(lp2), np.asarray(lp1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent2), np.asarray(ent1), rtol=1e-5, atol=1e-5)

    def loss(m, b):
        return gs.grpo_loss_fn(m, b, cfg=grpo_lib.GRPOConfig(), chunk_size=4, temperature=0.8)[0]

    l1, g1 = nnx.value_and_grad(loss)(model, one)
    l2, g2 = nnx.value_and_grad(loss)(model, grouped)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 g2.to_pure_dict(), g1.to_pure_dict())


def test_grouped_logprobs_sharded_over_data_parallel_devices(setup):
    """On a (2, 1, 1) mesh each device holds whole groups: its prompt rows and their responses' rows; the
    trainer's log-prob forward (`GRPOStep.logprob_fn`, the sharded batch of `_forward_logprobs`) gives the
    one-device per-row layout's log-probs."""
    if jax.device_count() < 2:
        pytest.skip("needs 2 (simulated) devices")
    model, step, batch = setup
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = dataclasses.replace(step, graphdef=graphdef, rest=rest)
    rollout, rows = batch.scored.rollout, np.arange(2 * N)

    def logprobs(s: gs.GRPOStep, grouped: bool) -> np.ndarray:
        host = s.micro_batch(batch, rows, s.update_shape(rollout.prompts, grouped), grouped=grouped)
        return s._forward_logprobs(params, [host]) * host["response_mask"]

    ref = logprobs(step, False)
    sharded = dataclasses.replace(step, mesh=shd.make_mesh((2, 1, 1), jax.devices()[:2]))
    assert sharded.grouped(rollout)  # one group per device
    assert np.abs(ref).sum() > 0
    np.testing.assert_allclose(logprobs(sharded, True), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logprobs(sharded, False), ref, rtol=1e-5, atol=1e-5)
