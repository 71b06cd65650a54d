"""Host layout vs HF: M-RoPE positions (get_rope_index) and the vision window layout (vision_utils)."""
import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from tests.fixtures.hf_models import TINY_IDS
from vlaa_jax.models.qwen2_5_vl import layout

untied_only = pytest.mark.parametrize("tiny_hf", [False], indirect=True, ids=["untied"])
IDS = dict(image_token_id=TINY_IDS["image_token_id"], vision_start_token_id=TINY_IDS["vision_start_token_id"])


@pytest.mark.parametrize("padding", ["left", "right"])
@untied_only
def test_mrope_positions_match_hf_get_rope_index(tiny_hf, padding):
    b = tiny_hf.batches[padding]
    hf_pos, hf_deltas = tiny_hf.positions[padding]
    pos, deltas = layout.mrope_positions(b.input_ids, b.image_grid_thw, b.attention_mask, **IDS)
    assert pos.dtype == np.int32 and pos.shape == (3, *b.input_ids.shape)
    assert deltas.dtype == np.int32 and deltas.shape == (2, 1)
    valid = b.attention_mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], hf_pos[:, valid])
    np.testing.assert_array_equal(pos[:, ~valid], 0)
    np.testing.assert_array_equal(deltas, hf_deltas)


@untied_only
def test_mrope_positions_padded_grid_rows_and_text_only_row(tiny_hf):
    """Zero rows of image_grid_thw are padding; a text-only row gets 1D positions and delta 0."""
    model = tiny_hf.model
    b = tiny_hf.batches["left"]
    text_row = np.full((1, b.input_ids.shape[1]), 7)
    ids = np.concatenate([b.input_ids, text_row])
    mask = np.concatenate([b.attention_mask, np.ones_like(text_row)])
    grid = np.concatenate([b.image_grid_thw, np.zeros((2, 3), np.int64)])
    pos, deltas = layout.mrope_positions(ids, grid, mask, **IDS)
    hf_pos, hf_deltas = model.model.get_rope_index(
        torch.from_numpy(ids), torch.from_numpy((ids == IDS["image_token_id"]).astype(np.int64)),
        image_grid_thw=torch.from_numpy(b.image_grid_thw), attention_mask=torch.from_numpy(mask))
    valid = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], hf_pos.numpy()[:, valid])
    np.testing.assert_array_equal(deltas, hf_deltas.numpy())
    assert deltas[2, 0] == 0


@untied_only
def test_mrope_positions_errors(tiny_hf):
    b = tiny_hf.batches["left"]
    with pytest.raises(ValueError, match="more images in input_ids than rows in image_grid_thw"):
        layout.mrope_positions(b.input_ids, b.image_grid_thw[:2], b.attention_mask, **IDS)
    with pytest.raises(ValueError, match="non-zero rows but input_ids hold"):
        grid = np.concatenate([b.image_grid_thw, [[1, 4, 4]]])
        layout.mrope_positions(b.input_ids, grid, b.attention_mask, **IDS)
    with pytest.raises(ValueError, match="needs 8 consecutive image tokens"):
        grid = b.image_grid_thw.copy()
        grid[1] = [1, 4, 8]          # the second image has 6 tokens, not 8
        layout.mrope_positions(b.input_ids, grid, b.attention_mask, **IDS)


GRIDS = [
    [[1, 16, 22], [1, 4, 6], [1, 10, 30]],     # the test images: partial windows
    [[1, 16, 16], [1, 8, 24]],                 # exact multiples of the 4x4-token window
    [[2, 12, 20]],                             # two frames
    [[1, 2, 2], [1, 34, 6]],
]


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("window_size", [112, 56])
def test_vision_layout_matches_hf(grids, window_size):
    g = torch.tensor(grids)
    hf_index, hf_cu_windows = get_vision_window_index(g, spatial_merge_size=2, window_size=window_size,
                                                      patch_size=14)
    hf_cu_full = get_vision_cu_seqlens(g)
    hf_hw = get_vision_position_ids(g, 2).numpy()
    S = int(np.prod(grids, axis=1).sum())
    for padded in (None, S + 12):
        lay = layout.vision_layout(np.array(grids), window_size=window_size, num_patches_padded=padded)
        P = S if padded is None else padded
        assert int(lay.num_patches) == S
        assert all(a.dtype == np.int32 for a in lay if a is not None)
        np.testing.assert_array_equal(lay.window_index[:S // 4], hf_index.numpy())
        np.testing.assert_array_equal(lay.window_index[S // 4:], np.arange(S // 4, P // 4))
        np.testing.assert_array_equal(lay.window_index[lay.reverse_index], np.arange(P // 4))
        # segment boundaries (window order) == HF cu_seqlens; padding is segment 0
        for seg, cu in ((lay.window_segments, hf_cu_windows), (lay.full_segments, hf_cu_full)):
            assert seg.shape == (P,) and (seg[:S] > 0).all() and (seg[S:] == 0).all()
            bounds = np.flatnonzero(np.diff(seg[:S])) + 1
            np.testing.assert_array_equal(np.concatenate([[0], bounds, [S]]), cu.numpy())
            assert len(np.unique(seg[:S])) == len(cu) - 1       # ids are not reused
        # rotary ids in window order == HF ids permuted like HF permutes the hidden states
        hw_window = hf_hw.reshape(-1, 4, 2)[hf_index.numpy()].reshape(-1, 2)
        np.testing.assert_array_equal(lay.rotary_hw[:S], hw_window)
    assert layout.image_token_count(np.array(grids + [[0, 0, 0]])) == S // 4


@pytest.mark.parametrize("grids", GRIDS + [[[1, 32, 32]] * 2, [[1, 16, 22], [1, 4, 6], [1, 10, 30]] * 4])
def test_full_attention_rows(grids):
    """Per-image rows: every real patch sits in exactly one slot, each frame whole in one row, and the
    slot map inverts the gather."""
    S = int(np.prod(grids, axis=1).sum())
    P = S + 64
    auto = layout.vision_layout(np.array(grids), num_patches_padded=P, full_rows=True)
    frames = np.bincount(auto.full_segments)[1:]
    choice = layout.full_attention_rows(frames, P)
    if choice is None:   # dense is no dearer: no rows
        assert auto.full_index is None and auto.full_slot is None
        choice = (len(frames), max(64, 1 << (int(frames.max()) - 1).bit_length()))
    lay = layout.vision_layout(np.array(grids), num_patches_padded=P, full_rows=choice)
    R, Lr = choice
    assert lay.full_index.shape == (R, Lr) and lay.full_slot.shape == (P,)
    flat = lay.full_index.ravel()
    real = np.flatnonzero(lay.full_segments > 0)
    np.testing.assert_array_equal(np.sort(flat[flat < P]), real)           # each real patch once
    np.testing.assert_array_equal(flat[lay.full_slot[real]], real)           # slot inverts the gather
    seg = np.concatenate([lay.full_segments, [0]])[lay.full_index]
    for f in range(1, len(frames) + 1):                                      # frames whole in one row
        assert len(np.unique(np.flatnonzero(seg == f) // Lr)) == 1


def test_full_attention_rows_choice():
    # eight images of 352, 24 and 300 patches (the generation benchmark): 8 rows of 512 beat 2752^2
    frames = [352, 24, 300] * 4
    assert layout.full_attention_rows(frames, 2752) == (8, 512)
    assert layout.full_attention_rows([1024, 1024], 2048) == (2, 1024)
    assert layout.full_attention_rows([600], 640) is None                   # one image: dense is as cheap
    with pytest.raises(ValueError, match="does not fit rows of 256"):
        layout.vision_layout(np.array([[1, 16, 22]]), full_rows=(1, 256))
    with pytest.raises(ValueError, match="need 2 rows of 512"):
        layout.vision_layout(np.array([[1, 16, 22], [1, 10, 30]]), full_rows=(1, 512))


def test_vision_layout_errors():
    with pytest.raises(ValueError, match="num_patches_padded"):
        layout.vision_layout(np.array([[1, 4, 4]]), num_patches_padded=8)
    with pytest.raises(ValueError, match="num_patches_padded"):
        layout.vision_layout(np.array([[1, 4, 4]]), num_patches_padded=18)
    with pytest.raises(ValueError, match="spatial_merge_size"):
        layout.vision_layout(np.array([[1, 3, 4]]))
