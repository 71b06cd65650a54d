"""Qwen2.5-VL and Qwen2-VL in Flax NNX, number for number with HF `Qwen2_5_VLForConditionalGeneration` /
`Qwen2VLForConditionalGeneration`: one model class, the family (vision tower) from config.json's
`model_type` (`config.FAMILIES`).

    model = from_pretrained(hf_or_vlaa_dir, dtype="bfloat16")                  # default device
    model = from_pretrained(hf_or_vlaa_dir, mesh=mesh, rules="fsdp_tp")        # straight onto a mesh
    logits = model(input_ids, attention_mask=..., pixel_values=..., image_grid_thw=...)   # [B, L, vocab]

    config.py   Qwen25VLConfig <-> HF config.json        layout.py   host-side positions and vision layout
    text.py     the decoder (KV cache)                   vision.py   the vision tower
    model.py    Qwen25VL: both towers, logits             params.py   HF tensor names <-> our state paths
    loading.py  from_pretrained, vlaa-jax model directories (Orbax)
"""
from vlaa_jax.models.qwen2_5_vl import layout, loading, params
from vlaa_jax.models.qwen2_5_vl.config import (
    FAMILIES, Family, Qwen25VLConfig, TextConfig, VisionConfig, from_hf_dict, load_config, read_hf_config, to_hf_dict)
from vlaa_jax.models.qwen2_5_vl.layout import VisionLayout, mrope_positions, vision_layout
from vlaa_jax.models.qwen2_5_vl.loading import from_pretrained
from vlaa_jax.models.qwen2_5_vl.model import Qwen25VL, abstract_model, scatter_image_features
from vlaa_jax.models.qwen2_5_vl.text import KVCache, init_cache

__all__ = [
    "FAMILIES", "Family", "Qwen25VL", "Qwen25VLConfig", "TextConfig", "VisionConfig", "KVCache", "VisionLayout",
    "from_pretrained", "abstract_model", "load_config", "read_hf_config", "from_hf_dict", "to_hf_dict",
    "init_cache", "mrope_positions", "vision_layout", "scatter_image_features", "layout", "loading", "params",
]
