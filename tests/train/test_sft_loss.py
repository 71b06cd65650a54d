"""The SFT loss on compacted target positions equals the plain masked cross-entropy over full logits.

`sft.sft_loss` projects only the response positions through the vocabulary, compacted per group of
rows (`common.target_positions(..., groups=G)`); whatever the grouping, loss and gradients must be
those of the textbook loss, also with the batch sharded over data-parallel devices."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.fixtures.hf_models import tiny_hf_config_dict
from tests.sharding.vl import LAYOUT_KEYS, make_batch, vl_loss
from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl import Qwen25VL, from_hf_dict
from vlaa_jax.train import common, sft


@pytest.fixture(scope="module")
def setup():
    config = from_hf_dict(tiny_hf_config_dict(True))
    model = Qwen25VL(config, rngs=nnx.Rngs(3))
    raw = make_batch(config, batch_size=4, length=32, seed=5)
    raw["loss_mask"][1, -12:] = 0        # rows with different response lengths: padding between targets
    raw["loss_mask"][2, :] = 0           # and a row without any target
    ref_batch = {k: jnp.asarray(v) for k, v in raw.items()}
    (ref_loss, _), ref_grads = nnx.value_and_grad(vl_loss, has_aux=True)(model, ref_batch)
    return model, raw, float(ref_loss), ref_grads.to_pure_dict()


def sft_batch(raw: dict, groups: int | None) -> dict:
    b = {k: v for k, v in raw.items() if k not in LAYOUT_KEYS and k != "loss_mask"}
    b.update({f"vision_{k}": raw[k] for k in LAYOUT_KEYS})
    b["target_pos"], b["target_valid"] = common.target_positions(raw["loss_mask"], multiple=8, groups=groups)
    b["loss_normalizer"] = np.float32(raw["loss_mask"][:, 1:].sum())
    return b


def loss_fn(model, batch):
    return sft.sft_loss(model, batch, chunk_size=4)[0]     # several chunks per group


@pytest.mark.parametrize("groups", [None, 1, 2, 4])
def test_grouped_targets_match_full_logits(setup, groups):
    model, raw, ref_loss, ref_grads = setup
    batch = sft_batch(raw, groups)
    expected_groups = 4 if groups is None else groups
    assert batch["target_pos"].shape[0] == expected_groups
    loss, grads = nnx.value_and_grad(loss_fn)(model, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads.to_pure_dict(), ref_grads)


def test_one_group_has_no_padding_between_rows(setup):
    _, raw, _, _ = setup
    pos, valid = common.target_positions(raw["loss_mask"], multiple=8, groups=1)
    n = int(raw["loss_mask"][:, 1:].sum())
    assert pos.shape == (1, -(-n // 8) * 8) and int(valid.sum()) == n
    per_row, _ = common.target_positions(raw["loss_mask"], multiple=8)
    assert per_row.size > pos.size           # per-row padding would cost extra vocabulary rows
    L = raw["input_ids"].shape[1]
    rows, tokens = np.divmod(pos[0, :n], L)
    np.testing.assert_array_equal(raw["loss_mask"][rows, tokens + 1], 1)


def test_groups_must_divide_rows(setup):
    _, raw, _, _ = setup
    with pytest.raises(ValueError, match="groups=3 must divide the batch of 4 rows"):
        common.target_positions(raw["loss_mask"], groups=3)


def test_sharded_groups_match(setup):
    """Data-parallel over 4 devices with one target group per device (what the trainer passes)."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 (simulated) devices")
    model, raw, ref_loss, ref_grads = setup
    mesh = shd.make_mesh((4, 1, 1), jax.devices()[:4])
    rules = shd.resolve_rules(None)
    dp = shd.data_parallel_size(mesh, rules)
    batch = common.put_batch(sft_batch(raw, dp), mesh, rules, batch_size=4)
    assert batch["target_pos"].sharding.spec[0] is not None      # one group per data shard
    graphdef, state = nnx.split(model)
    with shd.activate(mesh, rules):
        loss, grads = jax.jit(jax.value_and_grad(lambda s, b: loss_fn(nnx.merge(graphdef, s), b)))(state, batch)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads.to_pure_dict(), ref_grads)


def _host(grid, image_token_id, length=8):
    """One row per image: the row's image tokens, then text (pixels all zero)."""
    from vlaa_jax.models.qwen2_5_vl import layout
    grid = np.asarray(grid, np.int32)
    n = sum(layout.frame_lengths(grid))
    tokens = [int(np.prod(g)) // 4 for g in grid]
    ids = np.zeros((len(grid), max(tokens) + length), np.int32)
    for r, k in enumerate(tokens):
        ids[r, :k] = image_token_id
    return {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int32), "loss_mask": np.ones(ids.shape, np.int32),
            "position_ids": np.zeros((3,) + ids.shape, np.int32), "pixel_values": np.zeros((n, 1176), np.float32),
            "image_grid_thw": grid}


def test_pad_to_gives_micro_batches_one_row_shape():
    """Micro-batches that must stack get per-image rows of one shape (the largest); where any of them
    gains nothing from rows, all stay dense. With one image group per row each group holds its own
    image (dense attention within a group is per-image attention)."""
    from tests.fixtures.hf_models import qwen3b_shaped_hf_config_dict
    from vlaa_jax.models.qwen2_5_vl import layout
    mcfg = from_hf_dict(qwen3b_shaped_hf_config_dict())
    img = mcfg.image_token_id
    big, small = _host([[1, 32, 32], [1, 32, 32]], img), _host([[1, 16, 16], [1, 16, 16]], img, length=6)
    out = common.pad_to([big, small], mcfg)
    assert [b["vision_full_index"].shape for b in out] == [(1, 2, 1024), (1, 2, 1024)]
    assert {b["input_ids"].shape[1] for b in out} == {264} and {b["pixel_values"].shape for b in out} == {(1, 2048, 1176)}
    for b, src in zip(out, (big, small)):
        ref = layout.vision_layout(src["image_grid_thw"], num_patches_padded=2048, full_rows=(2, 1024))
        np.testing.assert_array_equal(b["vision_full_index"][0], ref.full_index)
        np.testing.assert_array_equal(b["vision_full_slot"][0], ref.full_slot)
    dense = common.pad_to([big, _host([[1, 32, 64]], img)], mcfg)     # one 2048-patch image: rows gain nothing
    assert all("vision_full_index" not in b for b in dense)
    per_row = common.pad_to([big, small], mcfg, groups=2)
    assert {b["pixel_values"].shape for b in per_row} == {(2, 1024, 1176)}
    assert all("vision_full_index" not in b for b in per_row)
    for b, src in zip(per_row, (big, small)):
        for g in range(2):
            ref = layout.vision_layout(src["image_grid_thw"][g:g + 1], num_patches_padded=1024)
            np.testing.assert_array_equal(b["vision_window_index"][g], ref.window_index)
            np.testing.assert_array_equal(b["vision_full_segments"][g], ref.full_segments)
    with pytest.raises(ValueError, match="3 image groups do not divide the batch of 2 rows"):
        common.pad_to([big], mcfg, groups=3)

