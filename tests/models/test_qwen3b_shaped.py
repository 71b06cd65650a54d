"""Parity at the real Qwen2.5-VL-3B widths (2 decoder layers, 4 vision blocks), float32 on CPU.

The reference (~2.3 GB) is built once per session and saved as sharded safetensors, so this also checks
loading through model.safetensors.index.json.
"""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlaa_jax.models import qwen2_5_vl as q
from vlaa_jax.models.qwen2_5_vl import layout, params

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def big(qwen3b_shaped_hf):
    assert os.path.isfile(os.path.join(qwen3b_shaped_hf.hf_dir, params.SAFETENSORS_INDEX))
    return q.from_pretrained(qwen3b_shaped_hf.hf_dir)


def test_3b_shaped_config_and_layout(big, qwen3b_shaped_hf):
    c = big.config
    assert (c.text.hidden_size, c.text.num_attention_heads, c.text.num_key_value_heads) == (2048, 16, 2)
    assert c.text.mrope_section == (16, 24, 24) and c.tie_word_embeddings and c.vision.head_dim == 80
    b = qwen3b_shaped_hf.batches["left"]
    pos, deltas = layout.mrope_positions(b.input_ids, b.image_grid_thw, b.attention_mask)
    hf_pos, hf_deltas = qwen3b_shaped_hf.positions["left"]
    valid = b.attention_mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], hf_pos[:, valid])
    np.testing.assert_array_equal(deltas, hf_deltas)


def test_3b_shaped_vision_and_logits_match_hf(big, qwen3b_shaped_hf):
    b = qwen3b_shaped_hf.batches["left"]
    lay = layout.vision_layout(b.image_grid_thw, num_patches_padded=b.pixel_values.shape[0] + 16)
    pv = np.concatenate([b.pixel_values, np.zeros((16, b.pixel_values.shape[1]), np.float32)])
    vis = lay.map(jnp.asarray)
    pos, _ = layout.mrope_positions(b.input_ids, b.image_grid_thw, b.attention_mask)

    @nnx.jit
    def run(model, ids, pos, seg, pv, vis):
        feats = model.encode_images(pv, vis)
        logits, _ = model.forward(ids, pos, seg, pixel_values=pv, vision=vis)
        return feats, logits

    feats, logits = run(big, b.input_ids, pos, b.attention_mask, jnp.asarray(pv), vis)
    ref_v = qwen3b_shaped_hf.vision
    feats = np.asarray(feats)[:ref_v.shape[0]]
    vdiff = np.abs(feats - ref_v).max()
    ref = qwen3b_shaped_hf.logits["left"]
    valid = b.attention_mask.astype(bool)
    diff = np.abs(np.asarray(logits, np.float64) - ref)[valid].max()
    scale = np.abs(ref[valid]).max()
    print(f"\n[3B-shaped left-padded] vision max |diff| = {vdiff:.3g} (scale {np.abs(ref_v).max():.3g}); "
          f"max |logit diff| = {diff:.3g} (relative {diff / scale:.3g}, logit scale {scale:.3g})")
    np.testing.assert_allclose(feats, ref_v, rtol=1e-4, atol=1e-4 * np.abs(ref_v).max())
    assert diff / scale <= REL_TOL
