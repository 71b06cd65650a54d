"""Qwen2.5-VL in Flax NNX, number for number with HF `Qwen2_5_VLForConditionalGeneration`.

    model = from_pretrained(hf_or_vlaa_dir, dtype="bfloat16")
    logits = model(input_ids, attention_mask=..., pixel_values=..., image_grid_thw=...)   # [B, L, vocab]
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlaa_jax.models.qwen2_5_vl import layout, params
from vlaa_jax.models.qwen2_5_vl.config import (
    Qwen25VLConfig, TextConfig, VisionConfig, from_hf_dict, load_config, to_hf_dict)
from vlaa_jax.models.qwen2_5_vl.layout import VisionLayout, mrope_positions, vision_layout
from vlaa_jax.models.qwen2_5_vl.model import Qwen25VL, scatter_image_features
from vlaa_jax.models.qwen2_5_vl.text import KVCache, init_cache

__all__ = [
    "Qwen25VL", "Qwen25VLConfig", "TextConfig", "VisionConfig", "KVCache", "VisionLayout",
    "from_pretrained", "abstract_model", "load_config", "from_hf_dict", "to_hf_dict", "init_cache",
    "mrope_positions", "vision_layout", "scatter_image_features", "layout", "params",
]


def abstract_model(config: Qwen25VLConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract state (shapes, dtypes, logical axes; no memory) of the model."""
    abstract = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def from_pretrained(path: str, *, dtype: Any = "float32", param_dtype: Any = None, **run_options: Any) -> Qwen25VL:
    """Loads an HF Qwen2.5-VL directory (config.json + single or sharded safetensors) or a vlaa-jax model
    directory (config.json + Orbax params, see vlaa_jax/checkpoint.py).

    dtype: compute dtype; param_dtype: storage dtype (default: dtype); run_options: remat_policy,
    attention_impl. Weights are read tensor by tensor into an abstract model: about one copy in memory.
    """
    config = load_config(path, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype,
                         **run_options)
    graphdef, abstract_state = abstract_model(config)
    pdtype = config.jnp_param_dtype
    from vlaa_jax import checkpoint
    if checkpoint.is_model_dir(path):
        target = _str_keys(nnx.to_pure_dict(abstract_state))
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, pdtype), target)
        pure = checkpoint.load_params(path, target)
        pure = jax.tree.map(lambda a: jnp.asarray(a, pdtype), pure)
    else:
        ckpt = params.HFCheckpoint(path)
        params.check_no_unexpected(config, ckpt.keys(), source=path)
        pure = params.hf_to_state(config, ckpt, source=path,
                                  put=lambda a, _: jnp.asarray(np.asarray(a).astype(pdtype, copy=False)))
        ckpt.close()
    nnx.replace_by_pure_dict(abstract_state, pure)
    return nnx.merge(graphdef, abstract_state)
