"""Config: both HF config.json layouts in, a config transformers 5 loads out, clear errors."""
import json

import pytest
from transformers import Qwen2_5_VLConfig

from tests.fixtures.hf_models import qwen3b_shaped_hf_config_dict, tiny_hf_config_dict
from vlaa_jax.models.qwen2_5_vl import config as cfg

# config.json of the released Qwen/Qwen2.5-VL-3B-Instruct (transformers 4.41 flat layout).
RELEASED_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 128000, "max_window_layers": 70,
    "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def _agrees_with_hf(ours: cfg.Qwen25VLConfig, hf: Qwen2_5_VLConfig):
    t, v = hf.text_config, hf.vision_config
    assert (ours.text.vocab_size, ours.text.hidden_size, ours.text.intermediate_size) == \
        (t.vocab_size, t.hidden_size, t.intermediate_size)
    assert (ours.text.num_hidden_layers, ours.text.num_attention_heads, ours.text.num_key_value_heads) == \
        (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads)
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"]
    assert list(ours.text.mrope_section) == list(t.rope_parameters["mrope_section"])
    assert ours.text.rms_norm_eps == t.rms_norm_eps
    assert (ours.vision.depth, ours.vision.hidden_size, ours.vision.intermediate_size, ours.vision.num_heads) == \
        (v.depth, v.hidden_size, v.intermediate_size, v.num_heads)
    assert (ours.vision.window_size, ours.vision.out_hidden_size, ours.vision.patch_size) == \
        (v.window_size, v.out_hidden_size, v.patch_size)
    assert list(ours.vision.fullatt_block_indexes) == list(v.fullatt_block_indexes)
    assert ours.vision.rope_theta == v.rope_parameters["rope_theta"]
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert (ours.image_token_id, ours.vision_start_token_id) == (hf.image_token_id, hf.vision_start_token_id)


def test_released_flat_config_parses_like_hf():
    ours = cfg.from_hf_dict(RELEASED_3B)
    _agrees_with_hf(ours, Qwen2_5_VLConfig(**RELEASED_3B))
    assert ours.text.mrope_section == (16, 24, 24) and ours.tie_word_embeddings
    assert ours.vision.fullatt_block_indexes == (7, 15, 23, 31) and ours.vision.patch_dim == 1176


@pytest.mark.parametrize("d", [tiny_hf_config_dict(False), tiny_hf_config_dict(True),
                               qwen3b_shaped_hf_config_dict(), RELEASED_3B])
def test_to_hf_dict_loads_in_transformers_and_round_trips(d):
    ours = cfg.from_hf_dict(d)
    out = json.loads(json.dumps(cfg.to_hf_dict(ours)))       # what config.json would hold
    _agrees_with_hf(ours, Qwen2_5_VLConfig(**out))
    assert cfg.from_hf_dict(out) == ours


def test_load_config_from_saved_hf_dir(tiny_hf):
    ours = cfg.load_config(tiny_hf.hf_dir, dtype="bfloat16", remat_policy="full")
    assert ours.replace(dtype="float32", remat_policy="none") == cfg.from_hf_dict(tiny_hf.config)
    assert ours.dtype == "bfloat16" and ours.param_dtype == "float32"


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"model_type='llama'.*not a Qwen2.5-VL"):
        cfg.from_hf_dict({"model_type": "llama", "hidden_size": 8})
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}))
    with pytest.raises(ValueError, match=f"{bad}: required key 'vision_config' is missing"):   # Qwen2-VL: a family
        cfg.load_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"nowhere' is not a directory \(a model directory holds config.json"):
        cfg.load_config(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        cfg.load_config(str(tmp_path / "empty"))
    no_vision = {k: v for k, v in RELEASED_3B.items() if k != "vision_config"}
    with pytest.raises(ValueError, match="'vision_config' is missing"):
        cfg.from_hf_dict(no_vision)
    no_heads = {k: v for k, v in RELEASED_3B.items() if k != "num_attention_heads"}
    with pytest.raises(ValueError, match="'num_attention_heads' is missing"):
        cfg.from_hf_dict(no_heads, source="x/config.json")
    with pytest.raises(ValueError, match="remat_policy"):
        cfg.from_hf_dict(RELEASED_3B, remat_policy="some")
    with pytest.raises(ValueError, match="attention_impl"):
        cfg.from_hf_dict(RELEASED_3B, attention_impl="flash")
    with pytest.raises(ValueError, match="dtype"):
        cfg.from_hf_dict(RELEASED_3B, dtype="int8")
