"""The JAX reward model against transformers' Qwen2_5_VLModel + the same head and pooling, per head layout."""
import json
import os
import shutil

import numpy as np
import pytest

from vlaa_jax.models import reward_model as rm_lib

PARITY_RTOL = 1e-4


@pytest.mark.parametrize("layout", ["value_head", "score"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_scores_match_transformers(tiny_reward_models, layout, padding):
    ref = tiny_reward_models
    rm = _loaded(ref.dirs[layout])
    assert rm.layout.layout == layout
    b = ref.batches[padding]
    got = np.asarray(rm(b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                        image_grid_thw=b.image_grid_thw))
    want = ref.scores[layout][padding]
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-6)
    print(f"parity {layout}/{padding}: max relative difference {rel.max():.2e} (scores {want})")
    assert rel.max() < PARITY_RTOL, (got, want)


_CACHE = {}


def _loaded(path):
    if path not in _CACHE:
        _CACHE[path] = rm_lib.load_reward_model(path, dtype="float32")
    return _CACHE[path]


def test_a_directory_without_a_head_is_named(tiny_reward_models, tmp_path):
    src = tiny_reward_models.dirs["value_head"]
    out = tmp_path / "no_head"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, name), out / name)
    with pytest.raises(ValueError, match=f"{out}: no reward head found .*score.weight.*open_ended='http'"):
        rm_lib.load_reward_model(str(out))


def test_head_layout_detected_from_weight_names(tiny_reward_models):
    assert rm_lib.find_head(tiny_reward_models.dirs["value_head"]).weight == "v_head.summary.weight"
    assert rm_lib.find_head(tiny_reward_models.dirs["score"]).bias is None
    with open(os.path.join(tiny_reward_models.dirs["score"], "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen2_5_VLForSequenceClassification"]
