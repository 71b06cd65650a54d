"""Qwen25VL vs HF Qwen2_5_VLForConditionalGeneration on the tiny config (float32, CPU): vision tower,
logits with left/right padding, tied/untied lm_head, KV-cache decoding, params mapping both ways,
Orbax model directories, remat, logical axes and creation with or without a mesh."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.fixtures.hf_models import tiny_hf_config_dict
from vlaa_jax import nn
from vlaa_jax.kernels import splash_attention
from vlaa_jax.models import qwen2_5_vl as q
from vlaa_jax.models.qwen2_5_vl import layout, params
from vlaa_jax.sharding import LOGICAL_AXES

REL_TOL = 1e-4     # max |logit diff| / max |logit|
# Tests that do not depend on the lm_head run on the untied tiny model only (tied/untied both run for
# the logits, the head itself, the export and sharded checkpoints; the 3B-shaped model is tied).
untied_only = pytest.mark.parametrize("tiny_hf", [False], indirect=True, ids=["untied"])


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    return q.from_pretrained(tiny_hf.hf_dir)


def _layout_arrays(model, batch, pad_patches=0, full_rows=False):
    c = model.config
    lay = layout.vision_layout(batch.image_grid_thw, num_patches_padded=batch.pixel_values.shape[0] + pad_patches,
                               window_size=c.vision.window_size, full_rows=full_rows)
    pv = np.concatenate([batch.pixel_values, np.full((pad_patches, batch.pixel_values.shape[1]), 3.0, np.float32)])
    return jnp.asarray(pv), lay.map(jnp.asarray)


def _rel_diff(ours, ref, mask):
    diff = np.abs(np.asarray(ours, np.float64) - ref)[mask].max()
    return diff, diff / np.abs(ref[mask]).max()


@nnx.jit
def _encode_images(model, pixel_values, vision):
    return model.encode_images(pixel_values, vision)


@untied_only
# Full-attention blocks dense over all patches, or per image in rows (two rows hold the three images of
# 352, 24 and 300 patches; four leave empty rows).
@pytest.mark.parametrize("full_rows", [False, (2, 512), (4, 512)], ids=["dense", "rows", "rows_empty"])
def test_vision_tower_matches_hf(tiny, tiny_hf, full_rows):
    b = tiny_hf.batches["left"]
    for pad in (0, 40):          # a bucket with padding patches must not change the real tokens
        pv, vis = _layout_arrays(tiny, b, pad, full_rows)
        assert (vis.full_index is None) == (not full_rows)
        feats = np.asarray(_encode_images(tiny, pv, vis))
        n = tiny_hf.vision.shape[0]
        assert feats.shape == (n + pad // 4, tiny.config.text.hidden_size)
        np.testing.assert_allclose(feats[:n], tiny_hf.vision, rtol=1e-5, atol=1e-5 * np.abs(tiny_hf.vision).max())


@nnx.jit
def _forward(model, input_ids, position_ids, mask, pixel_values, vision):
    return model.forward(input_ids, position_ids, mask, pixel_values=pixel_values, vision=vision)[0]


@untied_only
@pytest.mark.parametrize("full_rows", [False, (2, 512), True], ids=["dense", "rows", "auto"])
@pytest.mark.parametrize("groups", [1, 2])
def test_image_groups_match_hf(tiny, tiny_hf, groups, full_rows):
    """Images split into image groups of rows (`layout.grouped_vision`: what each data-parallel device
    encodes; row 0 holds two images, row 1 one), each group padded past its real patches: the logits
    are HF's."""
    c = tiny.config
    b = tiny_hf.batches["left"]
    rows = layout.image_rows(b.input_ids, b.image_grid_thw, image_token_id=c.image_token_id)
    assert rows.tolist() == [0, 0, 1]
    pv, vis = layout.grouped_vision(b.pixel_values, b.image_grid_thw, rows // (2 // groups), groups,
                                    window_size=c.vision.window_size, num_patches_padded=704, full_rows=full_rows)
    assert pv.shape == (groups, 704, pv.shape[-1]) and vis.window_segments.shape == (groups, 704)
    # auto: per-image rows only where cheaper than dense (per row, not for all images together)
    assert (vis.full_index is None) == (not full_rows or (full_rows is True and groups == 1))
    pos, _ = layout.mrope_positions(b.input_ids, b.image_grid_thw, b.attention_mask,
                                    image_token_id=c.image_token_id, vision_start_token_id=c.vision_start_token_id)
    logits = _forward(tiny, jnp.asarray(b.input_ids, jnp.int32), jnp.asarray(pos), jnp.asarray(b.attention_mask),
                      jnp.asarray(pv), vis.map(jnp.asarray))
    _, rel = _rel_diff(logits, tiny_hf.logits["left"], b.attention_mask.astype(bool))
    assert rel <= REL_TOL


def test_grouped_vision_errors():
    grid = np.array([[1, 4, 4], [1, 4, 6]])
    pv = np.zeros((40, 1176), np.float32)
    with pytest.raises(ValueError, match="non-decreasing"):
        layout.grouped_vision(pv, grid, np.array([1, 0]), 2)
    with pytest.raises(ValueError, match="more than num_patches_padded=16"):
        layout.grouped_vision(pv, grid, np.array([0, 1]), 2, num_patches_padded=16)
    ids = np.array([[7, 151655, 151655, 151655], [151655, 151655, 151655, 151655]])
    with pytest.raises(ValueError, match="spans two rows"):
        layout.image_rows(ids, np.array([[1, 4, 4], [1, 2, 6]]))
    with pytest.raises(ValueError, match="image tokens"):
        layout.image_rows(ids, grid)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_match_hf(tiny, tiny_hf, padding):
    b = tiny_hf.batches[padding]
    logits = tiny(b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                  image_grid_thw=b.image_grid_thw)
    assert logits.shape == (*b.input_ids.shape, tiny.config.text.vocab_size) and logits.dtype == jnp.float32
    diff, rel = _rel_diff(logits, tiny_hf.logits[padding], b.attention_mask.astype(bool))
    print(f"\n[tiny {'tied' if tiny.config.tie_word_embeddings else 'untied'} {padding}-padded] "
          f"max |logit diff| = {diff:.3g} (relative {rel:.3g})")
    assert rel <= REL_TOL


def test_lm_head_tied_or_untied(tiny, tiny_hf):
    tied = tiny.config.tie_word_embeddings
    assert tied == tiny_hf.config["tie_word_embeddings"]
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(tiny, nnx.Param))}
    assert ("lm_head" in paths) != tied
    hf_head = tiny_hf.model.lm_head.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(tiny.lm_head_weight()), hf_head.T)
    # hidden states + the head matrix give the logits (what GRPO's chunked log-probs use)
    b = tiny_hf.batches["left"]
    hidden = tiny(b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                  image_grid_thw=b.image_grid_thw, return_hidden=True)
    assert hidden.shape == (*b.input_ids.shape, tiny.config.text.hidden_size)
    _, rel = _rel_diff(hidden @ tiny.lm_head_weight(), tiny_hf.logits["left"], b.attention_mask.astype(bool))
    assert rel <= REL_TOL


@untied_only
def test_kv_cache_prefill_then_decode_equals_full_forward(tiny, tiny_hf):
    """Prefill the prompt (left-padded, with images) into a cache, decode 3 tokens one at a time: the
    logits equal one full forward over prompt + tokens; decode positions follow `k + rope_delta`."""
    b = tiny_hf.batches["left"]
    extra = np.array([[7, 8, 9], [10, 11, 12]])
    ids = np.concatenate([b.input_ids, extra], 1)
    mask = np.concatenate([b.attention_mask, np.ones_like(extra)], 1)
    pos, deltas = layout.mrope_positions(ids, b.image_grid_thw, mask, image_token_id=tiny.config.image_token_id,
                                         vision_start_token_id=tiny.config.vision_start_token_id)
    pv, vis = _layout_arrays(tiny, b, pad_patches=8)
    graphdef, state = nnx.split(tiny)

    @jax.jit
    def step(state, ids, pos, seg, cache, pv=None, vis=None):
        return nnx.merge(graphdef, state).forward(ids, pos, seg, pixel_values=pv, vision=vis, cache=cache)

    full, none = step(state, ids, pos, mask, None, pv, vis)
    assert none is None
    L = b.input_ids.shape[1]
    cache = tiny.init_cache(batch=2, max_len=L + 5)
    logits, cache = step(state, ids[:, :L], pos[:, :, :L], mask[:, :L], cache, pv, vis)
    outs = [logits]
    n_valid = mask[:, :L].sum(1, keepdims=True)
    for k in range(3):
        p = np.broadcast_to((n_valid + k + deltas)[None], (3, 2, 1))
        np.testing.assert_array_equal(p, pos[:, :, L + k:L + k + 1])
        logits, cache = step(state, ids[:, L + k:L + k + 1], p, mask[:, L + k:L + k + 1], cache)
        outs.append(logits)
    assert int(cache.index) == L + 3
    np.testing.assert_array_equal(np.asarray(cache.segments[:, :L + 3]), mask)
    incremental = np.concatenate([np.asarray(o) for o in outs], 1)
    diff, rel = _rel_diff(incremental, np.asarray(full, np.float64), mask.astype(bool))
    print(f"\n[tiny cache] prefill+decode vs full forward: max |diff| = {diff:.3g} (relative {rel:.3g})")
    assert rel <= REL_TOL
    # and the full forward itself matches HF on the prompt
    _, rel = _rel_diff(np.asarray(full)[:, :L], tiny_hf.logits["left"], b.attention_mask.astype(bool))
    assert rel <= REL_TOL


def test_state_to_hf_is_bit_exact(tiny, tiny_hf):
    hf_state = {k: v.numpy() for k, v in tiny_hf.model.state_dict().items()}
    exported = dict(params.state_to_hf(tiny.config, nnx.state(tiny, nnx.Param)))
    expected = set(hf_state) - ({"lm_head.weight"} if tiny.config.tie_word_embeddings else set())
    assert set(exported) == expected
    for name, x in exported.items():
        assert x.flags.c_contiguous
        np.testing.assert_array_equal(x, hf_state[name], err_msg=name)
    # and back: hf_to_state reproduces our state
    pure = params.hf_to_state(tiny.config, exported)
    ours = nnx.to_pure_dict(nnx.state(tiny, nnx.Param))
    for (path, a), (path2, b) in zip(sorted(_flat(pure).items()), sorted(_flat(ours).items())):
        assert path == path2
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=path)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@untied_only
def test_released_checkpoint_names_are_accepted(tiny):
    """The released repos (transformers 4.4x) store `visual.*` and `model.*` names."""
    old = {}
    for name, x in params.state_to_hf(tiny.config, nnx.state(tiny, nnx.Param)):
        if name.startswith("model.visual."):
            name = name[len("model."):]
        elif name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        old[params.canonical_name(name)] = x
    pure = params.hf_to_state(tiny.config, old)
    assert set(_flat(pure)) == set(_flat(nnx.to_pure_dict(nnx.state(tiny, nnx.Param))))


@untied_only
def test_param_errors_name_the_tensor(tiny, tiny_hf, tmp_path):
    hf = dict(params.state_to_hf(tiny.config, nnx.state(tiny, nnx.Param)))
    name = "model.language_model.layers.1.self_attn.k_proj.weight"
    wrong = dict(hf, **{name: hf[name][:, :-1]})
    with pytest.raises(ValueError, match=rf"{name}.*shape \(32, 63\), expected \(32, 64\)"):
        params.hf_to_state(tiny.config, wrong, source="ckpt")
    missing = {k: v for k, v in hf.items() if k != "model.visual.merger.mlp.0.bias"}
    with pytest.raises(KeyError, match="model.visual.merger.mlp.0.bias.*missing"):
        params.hf_to_state(tiny.config, missing)
    with pytest.raises(ValueError, match="no place in this config"):
        params.check_no_unexpected(tiny.config, list(hf) + ["model.visual.blocks.9.norm1.weight"], "ckpt")
    # a checkpoint whose tensors do not fit its config.json: from_pretrained names file and tensor
    import json
    import shutil
    d = tmp_path / "bad"
    shutil.copytree(tiny_hf.hf_dir, d)
    conf = json.loads((d / "config.json").read_text())
    conf["vision_config"]["intermediate_size"] = 40
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"bad.*model.visual.blocks.0.mlp.gate_proj.weight.*expected \(40, 32\)"):
        q.from_pretrained(str(d))
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        q.from_pretrained(str(d))
    conf["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"bad/config.json: model_type='llama'.*not a Qwen2.5-VL"):
        q.from_pretrained(str(d))


def test_sharded_safetensors_and_missing_shard(tiny, tiny_hf, tmp_path):
    """model.safetensors.index.json + shards load; a missing shard is named."""
    d = tmp_path / "sharded"
    tiny_hf.model.save_pretrained(d, max_shard_size="100KB")
    assert (d / params.SAFETENSORS_INDEX).is_file()
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    b = tiny_hf.batches["right"]
    padded = np.concatenate([b.pixel_values, np.zeros((8, b.pixel_values.shape[1]), np.float32)])
    logits = q.from_pretrained(str(d))(b.input_ids, attention_mask=b.attention_mask, pixel_values=padded,
                                       image_grid_thw=b.image_grid_thw)
    _, rel = _rel_diff(logits, tiny_hf.logits["right"], b.attention_mask.astype(bool))
    assert rel <= REL_TOL
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard '{shards[-1].name}', which is missing"):
        q.from_pretrained(str(d))


@untied_only
def test_from_pretrained_orbax_model_dir(tiny, tiny_hf, tmp_path):
    """A vlaa-jax model directory (Orbax params + config.json) loads to the same model."""
    c = tiny.config
    pure = params.hf_to_state(c, params.HFCheckpoint(tiny_hf.hf_dir))
    out = q.loading.save_model_dir(str(tmp_path / "m"), pure, q.to_hf_dict(c))
    loaded = q.from_pretrained(out)
    a = nnx.to_flat_state(nnx.state(loaded, nnx.Param))
    b = nnx.to_flat_state(nnx.state(tiny, nnx.Param))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(p))


@untied_only
def test_params_carry_logical_axes(tiny):
    state = nnx.state(tiny, nnx.Param)
    n = 0
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, path
        assert all(a is None or a in LOGICAL_AXES for a in names), (path, names)
        n += 1
    assert n == len({e.path for e in params.param_table(tiny.config)})    # stacked layers: one path each


def test_creation_without_mesh_and_under_mesh():
    config = _small_config()
    m = q.Qwen25VL(config, rngs=nnx.Rngs(0))                     # no mesh: one device
    assert m.language_model.embed_tokens[...].shape == (config.text.vocab_size, config.text.hidden_size)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):                                    # mesh but no rules: created unsharded
        m = q.Qwen25VL(config, rngs=nnx.Rngs(0))
    assert m.language_model.embed_tokens[...].shape == (config.text.vocab_size, config.text.hidden_size)
    from flax.core import spmd
    from vlaa_jax.sharding import DEFAULT_RULES
    with jax.set_mesh(mesh), spmd.logical_axis_rules(DEFAULT_RULES):   # mesh + rules: eagerly sharded
        m = q.Qwen25VL(config, rngs=nnx.Rngs(0))
    spec = m.language_model.embed_tokens[...].sharding.spec
    assert tuple(spec) == ("tensor", "fsdp")
    assert tuple(m.language_model.layers.mlp.down_proj.kernel[...].sharding.spec) == (None, "tensor", "fsdp")


def _small_config(**kw):
    """The tiny config cut to one window block, one full-attention block and one decoder layer."""
    c = q.from_hf_dict(tiny_hf_config_dict(), **kw)
    return c.replace(text=dataclasses.replace(c.text, num_hidden_layers=1),
                     vision=dataclasses.replace(c.vision, depth=2, fullatt_block_indexes=(1,)))


@untied_only
def test_remat_policies_give_the_same_gradients(tiny_hf):
    b = tiny_hf.batches["right"]
    pos, _ = layout.mrope_positions(b.input_ids, b.image_grid_thw, b.attention_mask, image_token_id=500,
                                    vision_start_token_id=498)
    grads = {}
    state = nnx.state(q.Qwen25VL(_small_config(), rngs=nnx.Rngs(0)))
    for policy in ("none", "full", "save_dots"):
        graphdef, _ = q.abstract_model(_small_config(remat_policy=policy))
        model = nnx.merge(graphdef, state)
        pv, vis = _layout_arrays(model, b)

        def loss(model):
            logits, _ = model.forward(b.input_ids, pos, b.attention_mask, pixel_values=pv, vision=vis)
            return jnp.mean(jax.nn.logsumexp(logits, -1) * b.attention_mask)

        grads[policy] = nnx.jit(nnx.grad(loss))(model)
    ref = jax.tree.leaves(grads["none"])
    for policy in ("full", "save_dots"):
        for x, y in zip(jax.tree.leaves(grads[policy]), ref):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5 * np.abs(y).max())


@untied_only
def test_bfloat16_runs_close_to_float32(tiny, tiny_hf):
    b = tiny_hf.batches["left"]
    m16 = q.from_pretrained(tiny_hf.hf_dir, dtype="bfloat16")
    assert m16.language_model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    kw = dict(attention_mask=b.attention_mask, pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw)
    lo = np.asarray(m16(b.input_ids, **kw))
    assert np.isfinite(lo).all()
    _, rel = _rel_diff(lo, tiny_hf.logits["left"], b.attention_mask.astype(bool))
    assert rel < 0.1
    m = q.from_pretrained(tiny_hf.hf_dir, dtype="bfloat16", param_dtype="float32")
    assert m.language_model.layers.mlp.up_proj.kernel[...].dtype == jnp.float32


def test_attention_implementations():
    qk = jnp.ones((1, 4, 2, 8))
    mask = nn.attention_mask(jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32), causal=True)
    ref = nn.dot_product_attention(qk, qk, qk, mask)
    # "cudnn" falls back to XLA off-GPU / in float32
    np.testing.assert_array_equal(nn.dot_product_attention(qk, qk, qk, mask, implementation="cudnn"), ref)
    with pytest.raises(ValueError, match=r"'flash'.*\('xla', 'cudnn', 'splash'\)"):
        nn.dot_product_attention(qk, qk, qk, mask, implementation="flash")


def test_segment_mask_isolates_segments():
    """Segment ids: tokens attend only inside their segment; padding (0) neither attends nor is seen."""
    seg = jnp.array([[1, 1, 2, 2, 0]])
    m = np.asarray(nn.attention_mask(seg, seg, causal=False))[0, 0]
    expected = np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0] * 5], bool)
    np.testing.assert_array_equal(m, expected)
    mc = np.asarray(nn.attention_mask(seg, seg, causal=True))[0, 0]
    np.testing.assert_array_equal(mc, expected & np.tril(np.ones((5, 5), bool)))


@untied_only
def test_splash_attention_matches_hf(tiny_hf, monkeypatch):
    """attention_impl="splash" (Pallas splash kernel, interpreted on CPU; segment-id fast path in both
    towers): same logits. Splash wants lengths that are multiples of 128: text and patches are padded."""
    monkeypatch.setattr(splash_attention, "dot_product_attention",  # the Pallas interpreter on CPU
                        functools.partial(splash_attention.dot_product_attention, interpret=True))
    b = tiny_hf.batches["left"]
    extra = 128 - b.input_ids.shape[1]
    ids, mask = (np.pad(a, ((0, 0), (extra, 0))) for a in (b.input_ids, b.attention_mask))
    pv = np.concatenate([b.pixel_values, np.zeros((1024 - b.pixel_values.shape[0], 1176), np.float32)])
    model = q.from_pretrained(tiny_hf.hf_dir, attention_impl="splash")
    logits = model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=b.image_grid_thw)
    _, rel = _rel_diff(np.asarray(logits)[:, extra:], tiny_hf.logits["left"], b.attention_mask.astype(bool))
    assert rel <= REL_TOL


@pytest.mark.parametrize("T", [300, 517])
def test_local_segment_attention_equals_dense(T):
    """Chunked window attention == dense segment-masked attention (contiguous segments <= 16 long,
    padding at the end), including lengths that are not a multiple of the chunk, for a batch of two
    sequences segmented differently (image groups)."""
    rs = np.random.RandomState(T)
    segs = []
    for _ in range(2):
        lengths = []
        while sum(lengths) < T - 20:
            lengths.append(rs.randint(1, 17))
        segs.append(np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                                   + [np.zeros(T - sum(lengths), int)]))
    q_, k_, v_ = (jnp.asarray(rs.randn(2, T, 4, 8), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.stack(segs), jnp.int32)
    dense = nn.dot_product_attention(q_, k_, v_, nn.attention_mask(seg, seg, causal=False))
    local = nn.local_segment_attention(q_, k_, v_, seg, max_segment_len=16)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(local)[real], np.asarray(dense)[real], rtol=1e-5, atol=1e-6)
