"""Qwen2.5-VL / Qwen2-VL configuration: our frozen dataclasses <-> a Hugging Face `config.json`.

One config class serves both model families, which share the Qwen2 M-RoPE decoder and differ only in the
vision tower. `FAMILIES` is the registry, keyed by the HF `model_type` of config.json (`qwen2_5_vl`,
`qwen2_vl`): how each family's `vision_config` reads and writes, and its HF class name. A config's
`model_type` (read from config.json, never guessed) picks the family; the tower's shape is then in
`VisionConfig` fields (`norm`, `mlp`, `window_size`), so the model code branches on those alone.

Two HF layouts exist and both are read:
  * transformers 5: `text_config` / `vision_config` sub-dicts, rotary in `rope_parameters`;
  * the released Qwen2.5-VL-3B/7B-Instruct repos (transformers 4.4x): text fields at the top level,
    `rope_theta` and `rope_scaling: {"type": "mrope", "mrope_section": [...]}`, `vision_config` nested.
(The released Qwen2-VL-2B/7B repos use the flat layout too.) `to_hf_dict` writes the transformers-5
layout. The configs are frozen (hashable) so they can be static arguments of jitted functions.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from vlaa_jax.nn import ATTENTION_IMPLS, REMAT_POLICIES

MODEL_TYPE = "qwen2_5_vl"       # the default family
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (ViT, window attention in Qwen2.5-VL, and a 2x2 patch merger). Qwen2-VL's tower:
    norm="layer" (LayerNorm with bias), mlp="fc" (fc1 -> act -> fc2), window_size=0 (no windows: every
    block attends over whole images), intermediate_size = embed_dim * mlp_ratio."""
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112              # pixels; 112 = 4x4 merged tokens per window; 0 = no windows
    out_hidden_size: int = 2048         # = text hidden size
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 4          # video only (unused for images); HF default
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6          # fixed in HF (not in config.json); the LayerNorms' eps as well
    norm: str = "rms"                   # rms (RMSNorm) | layer (LayerNorm with bias)
    mlp: str = "swiglu"                 # swiglu (gate/up/down) | fc (fc1 -> act -> fc2)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Flattened patch length: channels * temporal_patch * patch * patch (1176 for the real model)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder. (Its field list looks like VisionConfig's: both mirror HF config.json keys.)"""
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """The whole model, plus how we run it (dtypes, rematerialisation, attention kernel)."""
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = True
    dtype: str = "float32"          # compute dtype of activations and matmuls
    param_dtype: str = "float32"    # storage dtype of parameters
    remat_policy: str = "none"      # per block, both towers: none | full | save_dots
    attention_impl: str = "xla"     # xla | cudnn | splash
    model_type: str = MODEL_TYPE    # HF model_type: the family (`FAMILIES`), from config.json

    def __post_init__(self):
        for key in ("dtype", "param_dtype"):
            object.__setattr__(self, key, _dtype_name(getattr(self, key), key))
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type={self.model_type!r}: expected one of {tuple(FAMILIES)}")
        t, v = self.text, self.vision
        if v.norm not in ("rms", "layer") or v.mlp not in ("swiglu", "fc"):
            raise ValueError(f"vision norm={v.norm!r} / mlp={v.mlp!r}: expected rms|layer and swiglu|fc")
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        if v.temporal_patch_size != 2 or v.window_size % (v.patch_size * v.spatial_merge_size):
            raise ValueError("expected temporal_patch_size 2 and window_size a multiple of "
                             "patch_size * spatial_merge_size")

    @property
    def family(self) -> "Family":
        return FAMILIES[self.model_type]

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw) -> "Qwen25VLConfig":
        return dataclasses.replace(self, **kw)


def _dtype_name(x: Any, key: str) -> str:
    try:
        name = jnp.dtype(x).name
    except TypeError as e:
        raise ValueError(f"{key}={x!r} is not a dtype; expected one of {DTYPES}") from e
    if name not in DTYPES:
        raise ValueError(f"{key}={x!r}: expected one of {DTYPES}")
    return name


def _get(d: Mapping[str, Any], key: str, where: str, default: Any = dataclasses.MISSING) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is dataclasses.MISSING:
        raise ValueError(f"{where}: required key {key!r} is missing")
    return default


def _qwen25_vision(vd: Mapping[str, Any], vwhere: str) -> VisionConfig:
    vrope = vd.get("rope_parameters") or {}
    return VisionConfig(
        depth=int(_get(vd, "depth", vwhere)),
        hidden_size=int(_get(vd, "hidden_size", vwhere)),
        intermediate_size=int(_get(vd, "intermediate_size", vwhere)),
        num_heads=int(_get(vd, "num_heads", vwhere)),
        in_channels=int(vd.get("in_channels", vd.get("in_chans", 3))),
        patch_size=int(vd.get("patch_size", vd.get("spatial_patch_size", 14))),
        temporal_patch_size=int(vd.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vd.get("spatial_merge_size", 2)),
        window_size=int(_get(vd, "window_size", vwhere)),
        out_hidden_size=int(_get(vd, "out_hidden_size", vwhere)),
        fullatt_block_indexes=tuple(int(i) for i in _get(vd, "fullatt_block_indexes", vwhere)),
        tokens_per_second=int(vd.get("tokens_per_second", 4)),
        hidden_act=str(vd.get("hidden_act", "silu")),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )


def _qwen25_vision_hf(v: VisionConfig) -> dict[str, Any]:
    return {
        "model_type": "qwen2_5_vl_vision",
        "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads, "in_channels": v.in_channels, "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size, "out_hidden_size": v.out_hidden_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": v.tokens_per_second,
        "hidden_act": v.hidden_act, "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }


def _qwen2_vision(vd: Mapping[str, Any], vwhere: str) -> VisionConfig:
    """Qwen2-VL's vision_config: `embed_dim` is the tower's width, `hidden_size` the decoder's (the
    merger's output), MLP width embed_dim * mlp_ratio; no windows, LayerNorm, fc1/fc2 MLP."""
    vrope = vd.get("rope_parameters") or {}
    embed, depth = int(_get(vd, "embed_dim", vwhere)), int(_get(vd, "depth", vwhere))
    return VisionConfig(
        depth=depth, hidden_size=embed,
        intermediate_size=int(embed * _get(vd, "mlp_ratio", vwhere, 4)),
        num_heads=int(_get(vd, "num_heads", vwhere)),
        in_channels=int(vd.get("in_channels", vd.get("in_chans", 3))),
        patch_size=int(vd.get("patch_size", vd.get("spatial_patch_size", 14))),
        temporal_patch_size=int(vd.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vd.get("spatial_merge_size", 2)),
        window_size=0, out_hidden_size=int(_get(vd, "hidden_size", vwhere)),
        fullatt_block_indexes=tuple(range(depth)),
        hidden_act=str(vd.get("hidden_act", "quick_gelu")),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
        norm="layer", mlp="fc",
    )


def _qwen2_vision_hf(v: VisionConfig) -> dict[str, Any]:
    ratio = v.intermediate_size / v.hidden_size
    return {
        "model_type": "qwen2_vl_vision",
        "depth": v.depth, "embed_dim": v.hidden_size, "hidden_size": v.out_hidden_size,
        "mlp_ratio": int(ratio) if ratio == int(ratio) else ratio,
        "num_heads": v.num_heads, "in_channels": v.in_channels, "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
        "hidden_act": v.hidden_act, "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: what differs between Qwen2.5-VL and Qwen2-VL outside the model code."""
    model_type: str                                   # HF config.json model_type (the registry key)
    name: str                                         # for messages
    architecture: str                                 # HF class that loads an export
    read_vision: Callable[[Mapping[str, Any], str], VisionConfig]
    write_vision: Callable[[VisionConfig], dict[str, Any]]


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", _qwen25_vision, _qwen25_vision_hf),
    Family("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", _qwen2_vision, _qwen2_vision_hf),
)}


def from_hf_dict(d: Mapping[str, Any], *, source: str = "config", **run_options: Any) -> Qwen25VLConfig:
    """Reads an HF Qwen2.5-VL or Qwen2-VL config dict (transformers-5 or released flat layout); its
    `model_type` picks the family (`FAMILIES`).

    `source` names the file in error messages; `run_options` sets dtype / param_dtype / remat_policy /
    attention_impl.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type not in FAMILIES:
        archs = d.get("architectures")
        raise ValueError(f"{source}: model_type={model_type!r} (architectures={archs!r}) is not a Qwen2.5-VL "
                         f"or Qwen2-VL config; expected model_type one of {tuple(FAMILIES)}")
    td = d.get("text_config")
    if td is None:   # released flat layout: text fields at the top level
        td, twhere = d, source
    else:
        twhere = f"{source}: text_config"
    vd = d.get("vision_config")
    if vd is None:
        raise ValueError(f"{source}: required key 'vision_config' is missing")
    vwhere = f"{source}: vision_config"

    rope = td.get("rope_parameters") or td.get("rope_scaling") or d.get("rope_parameters") \
        or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"{twhere}: rope type {rope_type!r} is not supported (expected mrope/default)")
    if "mrope_section" not in rope:
        raise ValueError(f"{twhere}: rope_parameters/rope_scaling has no 'mrope_section'")
    rope_theta = rope.get("rope_theta", td.get("rope_theta", d.get("rope_theta", 1000000.0)))
    if td.get("use_sliding_window"):
        raise ValueError(f"{twhere}: use_sliding_window=true is not supported")
    eos = td.get("eos_token_id", d.get("eos_token_id"))
    text = TextConfig(
        vocab_size=int(_get(td, "vocab_size", twhere)),
        hidden_size=int(_get(td, "hidden_size", twhere)),
        intermediate_size=int(_get(td, "intermediate_size", twhere)),
        num_hidden_layers=int(_get(td, "num_hidden_layers", twhere)),
        num_attention_heads=int(_get(td, "num_attention_heads", twhere)),
        num_key_value_heads=int(_get(td, "num_key_value_heads", twhere, td.get("num_attention_heads"))),
        rms_norm_eps=float(_get(td, "rms_norm_eps", twhere, 1e-6)),
        rope_theta=float(rope_theta),
        mrope_section=tuple(int(x) for x in rope["mrope_section"]),
        max_position_embeddings=int(_get(td, "max_position_embeddings", twhere, 128000)),
        hidden_act=str(_get(td, "hidden_act", twhere, "silu")),
        bos_token_id=td.get("bos_token_id", d.get("bos_token_id")),
        eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
        pad_token_id=td.get("pad_token_id", d.get("pad_token_id")),
    )
    vision = FAMILIES[model_type].read_vision(vd, vwhere)
    # pre-v5 saves may carry tie_word_embeddings inside text_config; HF ties if either says so
    tie = bool(d.get("tie_word_embeddings") or td.get("tie_word_embeddings"))
    return Qwen25VLConfig(
        text=text, vision=vision,
        image_token_id=int(d.get("image_token_id", 151655)),
        video_token_id=int(d.get("video_token_id", 151656)),
        vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
        tie_word_embeddings=tie,
        model_type=model_type,
        **run_options,
    )


def to_hf_dict(config: Qwen25VLConfig) -> dict[str, Any]:
    """The transformers-5 `config.json` dict of `config` (what its family's HF config class loads)."""
    t, fam = config.text, config.family
    text = {
        "model_type": f"{fam.model_type}_text",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings, "hidden_act": t.hidden_act,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                            "mrope_section": list(t.mrope_section)},
        "bos_token_id": t.bos_token_id,
        "eos_token_id": list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
        "pad_token_id": t.pad_token_id, "use_sliding_window": False,
        "dtype": config.param_dtype,
    }
    return {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "text_config": text,
        "vision_config": fam.write_vision(config.vision),
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dtype": config.param_dtype,
    }


def read_hf_config(model_dir: str) -> dict[str, Any]:
    """The config.json of an HF or vlaa-jax model directory, with errors that name the path."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir!r} is not a directory (a model directory holds config.json and "
                                "the weights)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {model_dir!r} is not a model directory (an HF Qwen2.5-VL "
                                "or Qwen2-VL download or tools/convert_hf_to_orbax.py output)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_config(model_dir: str, **run_options: Any) -> Qwen25VLConfig:
    """Reads `model_dir/config.json` (HF or vlaa-jax model directory)."""
    return from_hf_dict(read_hf_config(model_dir), source=os.path.join(model_dir, "config.json"), **run_options)
