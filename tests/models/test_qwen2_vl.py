"""Qwen2-VL, the second model family, vs HF `Qwen2VLForConditionalGeneration` (float32, CPU).

The family comes from config.json's `model_type` (config.py `FAMILIES`); the model is the same `Qwen25VL`
with the Qwen2-VL vision tower (LayerNorm, fc1/fc2 QuickGELU MLP, no window attention). Checked: the
released flat config, logits with rows of different image sizes, two images in one row and left or right
padding (tiny, tied and untied; the 2B-shaped shallow model, slow), greedy generation token for token
against HF `generate`, HF -> ours -> HF bit-exact, and an export HF loads without missing keys.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.fixtures.hf_models import hf_classes, hf_tensors, qwen2vl_2b_shaped_hf_config_dict
from vlaa_jax import convert, rollout
from vlaa_jax import sharding as shd
from vlaa_jax.models import qwen2_5_vl as q
from vlaa_jax.models.qwen2_5_vl import config as cfg, layout, params

REL_TOL = 1e-4     # max |logit diff| / max |logit|
untied_only = pytest.mark.parametrize("tiny_qwen2_vl_hf", [False], indirect=True, ids=["untied"])

# config.json of the released Qwen/Qwen2-VL-2B-Instruct (transformers 4.45 flat layout).
RELEASED_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_vl_hf):
    return q.from_pretrained(tiny_qwen2_vl_hf.hf_dir)


def _rel_diff(ours, ref, mask):
    diff = np.abs(np.asarray(ours, np.float64) - ref)[mask].max()
    return diff, diff / np.abs(ref[mask]).max()


# ------------------------------------------------------------------------------------------- config

def test_released_config_reads_like_hf_and_round_trips():
    from transformers import Qwen2VLConfig
    ours = cfg.from_hf_dict(RELEASED_2B)
    hf = Qwen2VLConfig(**RELEASED_2B)
    t, v = hf.text_config, hf.vision_config
    assert ours.model_type == "qwen2_vl" and ours.family.architecture == "Qwen2VLForConditionalGeneration"
    assert (ours.text.hidden_size, ours.text.num_attention_heads, ours.text.num_key_value_heads,
            ours.text.intermediate_size, ours.text.vocab_size) == (1536, 12, 2, 8960, 151936)
    assert ours.text.rms_norm_eps == t.rms_norm_eps and ours.text.rope_theta == t.rope_parameters["rope_theta"]
    assert ours.tie_word_embeddings == hf.tie_word_embeddings is True
    assert (ours.vision.depth, ours.vision.hidden_size, ours.vision.num_heads) == (v.depth, v.embed_dim, v.num_heads)
    assert ours.vision.intermediate_size == v.embed_dim * v.mlp_ratio
    assert ours.vision.out_hidden_size == v.hidden_size and ours.vision.hidden_act == v.hidden_act
    assert ours.vision.rope_theta == v.rope_parameters["rope_theta"]
    assert (ours.vision.norm, ours.vision.mlp, ours.vision.window_size) == ("layer", "fc", 0)
    assert ours.vision.fullatt_block_indexes == tuple(range(32)) and ours.vision.patch_dim == 1176
    out = json.loads(json.dumps(cfg.to_hf_dict(ours)))
    assert out["model_type"] == "qwen2_vl" and out["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert cfg.from_hf_dict(out) == ours
    back = Qwen2VLConfig(**out)
    assert back.vision_config.embed_dim == 1280 and back.vision_config.hidden_size == 1536
    assert back.text_config.num_hidden_layers == 28


# preprocessor_config.json of the released Qwen/Qwen2-VL-2B-Instruct (and 7B).
RELEASED_2B_PROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}


def test_image_preprocessing_follows_the_model_config():
    """The loader takes the patch geometry from the model's VisionConfig: for Qwen2-VL it is the
    checkpoint's processor geometry, and our preprocessing equals HF's processor configured from that
    preprocessor_config.json (its own min/max pixels: the same bounds as Qwen2.5-VL's release)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from data_pipeline.image import preprocess_image
    from data_pipeline.tokenizer import QWEN25VL_PREPROCESSOR_CONFIG
    v = cfg.from_hf_dict(RELEASED_2B).vision
    p = RELEASED_2B_PROCESSOR
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == \
        (p["patch_size"], p["merge_size"], p["temporal_patch_size"])
    assert (p["min_pixels"], p["max_pixels"]) == (QWEN25VL_PREPROCESSOR_CONFIG["min_pixels"],
                                                  QWEN25VL_PREPROCESSOR_CONFIG["max_pixels"])
    hf = Qwen2VLImageProcessorPil(**{k: x for k, x in p.items() if not k.endswith(("_type", "_class"))})
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (90, 130, 3), dtype=np.uint8))
    ours = preprocess_image(img, min_pixels=p["min_pixels"], max_pixels=p["max_pixels"], patch_size=v.patch_size,
                            merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
    ref = hf(images=[img], return_tensors="np")
    np.testing.assert_array_equal(ours.image_grid_thw, ref["image_grid_thw"])
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])


# ------------------------------------------------------------------------------------------- tiny

@untied_only
@pytest.mark.parametrize("full_rows", [False, True], ids=["dense", "rows"])
def test_vision_tower_matches_hf(tiny, tiny_qwen2_vl_hf, full_rows):
    """Every block attends over whole images: densely with segment ids, or per image in rows."""
    b = tiny_qwen2_vl_hf.batches["left"]
    pad = 40
    lay = layout.vision_layout(b.image_grid_thw, window_size=0, num_patches_padded=b.pixel_values.shape[0] + pad,
                               full_rows=full_rows)
    np.testing.assert_array_equal(lay.window_index, np.arange(len(lay.window_index)))   # no windows:
    np.testing.assert_array_equal(lay.window_segments, lay.full_segments)                # one per image
    pv = np.concatenate([b.pixel_values, np.full((pad, b.pixel_values.shape[1]), 3.0, np.float32)])
    feats = np.asarray(nnx.jit(lambda m, p, v: m.encode_images(p, v))(tiny, jnp.asarray(pv), lay.map(jnp.asarray)))
    ref = tiny_qwen2_vl_hf.vision
    np.testing.assert_allclose(feats[:ref.shape[0]], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_match_hf(tiny, tiny_qwen2_vl_hf, padding):
    b = tiny_qwen2_vl_hf.batches[padding]
    assert b.image_grid_thw.shape[0] == 3 and len({tuple(g) for g in b.image_grid_thw}) == 3   # sizes differ
    logits = tiny(b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                  image_grid_thw=b.image_grid_thw)
    diff, rel = _rel_diff(logits, tiny_qwen2_vl_hf.logits[padding], b.attention_mask.astype(bool))
    print(f"\n[qwen2-vl tiny {'tied' if tiny.config.tie_word_embeddings else 'untied'} {padding}-padded] "
          f"max |logit diff| = {diff:.3g} (relative {rel:.3g})")
    assert rel <= REL_TOL


@untied_only
def test_bfloat16_runs_close_to_float32(tiny_qwen2_vl_hf):
    """bf16 compute and storage (the presets' compute dtype) through the LayerNorms and fc1/fc2."""
    b = tiny_qwen2_vl_hf.batches["left"]
    m16 = q.from_pretrained(tiny_qwen2_vl_hf.hf_dir, dtype="bfloat16")
    assert m16.visual.blocks.norm1.bias[...].dtype == jnp.bfloat16
    lo = np.asarray(m16(b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                        image_grid_thw=b.image_grid_thw))
    assert np.isfinite(lo).all()
    assert _rel_diff(lo, tiny_qwen2_vl_hf.logits["left"], b.attention_mask.astype(bool))[1] < 0.1


def test_state_to_hf_is_bit_exact(tiny, tiny_qwen2_vl_hf):
    hf_state = {k: v.numpy() for k, v in tiny_qwen2_vl_hf.model.state_dict().items()}
    exported = dict(params.state_to_hf(tiny.config, nnx.state(tiny, nnx.Param)))
    assert set(exported) == set(hf_state) - ({"lm_head.weight"} if tiny.config.tie_word_embeddings else set())
    for name, x in exported.items():
        np.testing.assert_array_equal(x, hf_state[name], err_msg=name)
    back = dict(_flatten(params.hf_to_state(tiny.config, exported)))        # and back: our state again
    ours = {tuple(str(k) for k in p): x for p, x in nnx.to_flat_state(nnx.state(tiny, nnx.Param))}
    assert set(back) == set(ours)
    for p, x in ours.items():
        np.testing.assert_array_equal(back[p], np.asarray(x[...]), err_msg=str(p))


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_convert_and_export_round_trip_loads_in_transformers(tiny, tiny_qwen2_vl_hf, tmp_path):
    """HF -> vlaa-jax model directory -> HF: bit-exact, and `Qwen2VLForConditionalGeneration` loads the
    export with no missing / unexpected keys and gives the reference logits."""
    ref = tiny_qwen2_vl_hf
    ckpt = convert.convert_hf_to_orbax(ref.hf_dir, str(tmp_path / "ckpt"))
    with open(os.path.join(ckpt, "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen2_vl"
    out = convert.export_to_hf(ckpt, str(tmp_path / "hf"))
    original, exported = hf_tensors(ref.hf_dir), hf_tensors(out)
    assert set(exported) == set(original) - ({"lm_head.weight"} if ref.config["tie_word_embeddings"] else set())
    for k, x in exported.items():
        assert x.dtype == original[k].dtype, k
        np.testing.assert_array_equal(x, original[k], err_msg=k)
    # A directory written from our config alone (what a trainer's export holds) loads in HF as well.
    fresh = convert.write_hf_dir(tiny.config, nnx.state(tiny, nnx.Param), str(tmp_path / "fresh"))
    _, model_cls = hf_classes(ref.config)
    b = ref.batches["left"]
    valid = b.attention_mask.astype(bool)
    for d in (out, fresh):
        model, info = model_cls.from_pretrained(d, output_loading_info=True, attn_implementation="eager")
        assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        with torch.no_grad():
            hf_logits = model.eval()(**b.hf_kwargs()).logits.numpy()
        np.testing.assert_allclose(hf_logits[valid], ref.logits["left"][valid], rtol=0, atol=1e-5)


def _greedy(ref, model, n_new: int, eos: int, pad: int):
    """(ours, HF) greedy tokens of the reference's left-padded batch."""
    b = ref.batches["left"]
    graphdef, state = nnx.split(model)
    prompts = rollout.prompt_batch(model.config, b.input_ids, b.attention_mask,
                                   pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw, pad_id=pad)
    ours = rollout.generate(graphdef, state, prompts, max_new_tokens=n_new, stop_ids=(eos,), pad_id=pad,
                            sampling=rollout.SamplingConfig(temperature=0))
    with torch.no_grad():
        hf = ref.model.generate(**b.hf_kwargs(), max_new_tokens=n_new, do_sample=False,
                                eos_token_id=eos, pad_token_id=pad)
    return ours, hf[:, b.input_ids.shape[1]:].numpy()


def _check_greedy(ours, hf_tokens, eos):
    width = hf_tokens.shape[1]
    np.testing.assert_array_equal(ours.tokens[:, :width], hf_tokens)
    for r in range(hf_tokens.shape[0]):
        hits = np.flatnonzero(hf_tokens[r] == eos)
        assert ours.lengths[r] == (hits[0] + 1 if len(hits) else width)


@untied_only
def test_greedy_matches_hf_generate(tiny, tiny_qwen2_vl_hf):
    """32 greedy tokens, token for token with HF `generate`, for the left-padded batch with images."""
    ours, hf_tokens = _greedy(tiny_qwen2_vl_hf, tiny, 32, eos=2, pad=0)
    _check_greedy(ours, hf_tokens, 2)
    assert ours.lengths.min() >= 24
    print(f"\n[qwen2-vl tiny greedy] {ours.lengths.tolist()} tokens per row identical to HF generate")


# ------------------------------------------------------------------------------------------- 2B-shaped

@pytest.mark.slow
def test_2b_shaped_logits_and_greedy_match_hf(qwen2vl_2b_shaped_hf):
    """Qwen2-VL-2B widths (hidden 1536, 12/2 heads, vision 1280 x 16 heads), 2 decoder layers, 2 vision
    blocks, from sharded safetensors: logits and 16 greedy tokens."""
    ref = qwen2vl_2b_shaped_hf
    assert os.path.isfile(os.path.join(ref.hf_dir, params.SAFETENSORS_INDEX))
    assert ref.config == qwen2vl_2b_shaped_hf_config_dict()
    model = q.from_pretrained(ref.hf_dir)
    c = model.config
    assert (c.text.hidden_size, c.text.num_attention_heads, c.vision.hidden_size, c.vision.intermediate_size) == \
        (1536, 12, 1280, 5120) and c.tie_word_embeddings
    b = ref.batches["left"]
    logits = model(b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                   image_grid_thw=b.image_grid_thw)
    valid = b.attention_mask.astype(bool)
    diff, rel = _rel_diff(logits, ref.logits["left"], valid)
    print(f"\n[qwen2-vl 2B-shaped left-padded] max |logit diff| = {diff:.3g} (relative {rel:.3g}, "
          f"logit scale {np.abs(ref.logits['left'][valid]).max():.3g})")
    assert rel <= REL_TOL
    ours, hf_tokens = _greedy(ref, model, 16, eos=151645, pad=151643)
    _check_greedy(ours, hf_tokens, 151645)
    print(f"[qwen2-vl 2B-shaped greedy] {ours.lengths.tolist()} tokens per row identical to HF generate")


@untied_only
def test_sharded_load_matches_hf(tiny_qwen2_vl_hf):
    """Read straight onto a 2x2x2 mesh (each device its shards of the memory-mapped safetensors): the
    LayerNorm biases and fc1/fc2 land like the other parameters and the logits stay HF's."""
    ref = tiny_qwen2_vl_hf
    mesh = shd.make_mesh((2, 2, 2))
    model = q.from_pretrained(ref.hf_dir, mesh=mesh, rules="fsdp_tp")
    fc1 = model.visual.blocks.mlp.fc1.kernel[...]
    assert len(fc1.sharding.device_set) == 8 and fc1.shape == (2, 32, 128)
    b = ref.batches["left"]
    with jax.set_mesh(mesh):
        logits = model(b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                       image_grid_thw=b.image_grid_thw)
    _, rel = _rel_diff(logits, ref.logits["left"], b.attention_mask.astype(bool))
    assert rel <= REL_TOL


def test_memory_planner_knows_the_qwen2_vl_presets():
    """tools/plan_memory.py: the built-in Qwen2-VL shapes have the released models' parameter counts, and a
    qwen2_vl preset without a converted model is planned as Qwen2-VL (not as the Qwen2.5-VL 7B)."""
    from tools import plan_memory
    counts = {}
    for name in ("qwen2_vl_2b", "qwen2_vl_7b"):
        c = plan_memory.builtin_config(name)
        assert c.model_type == "qwen2_vl"
        counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(q.abstract_model(c)[1]))
    assert counts == {"qwen2_vl_2b": 2_208_985_600, "qwen2_vl_7b": 8_291_375_616}   # HF's 2.21B / 8.29B
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    c = plan_memory.model_from_trainer_config(plan_memory.load_trainer_config(
        os.path.join(root, "configs", "grpo.py:qwen2_vl_7b")))
    assert (c.model_type, c.text.hidden_size, c.vision.norm) == ("qwen2_vl", 3584, "layer")
