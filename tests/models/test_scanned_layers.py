"""Stacked, scanned decoder layers: parameter shapes and logical axes, the stacked checkpoint table, model
directories written before stacking (per-layer paths), the stacked KV cache and the prefill's top layer,
and a program whose size does not grow with depth."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.fixtures.hf_models import tiny_hf_config_dict
from vlaa_jax import convert
from vlaa_jax import sharding as shd
from vlaa_jax.models import qwen2_5_vl as q
from vlaa_jax.models.qwen2_5_vl import params

untied_only = pytest.mark.parametrize("tiny_hf", [False], indirect=True, ids=["untied"])
STACKS = (("language_model", "layers"), ("visual", "blocks"))


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    return q.from_pretrained(tiny_hf.hf_dir)


def _config(layers: int) -> q.Qwen25VLConfig:
    c = q.from_hf_dict(tiny_hf_config_dict())
    return c.replace(text=dataclasses.replace(c.text, num_hidden_layers=layers))


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, prefix + (str(k),)) if isinstance(v, dict) else {prefix + (str(k),): v})
    return out


def test_decoder_parameters_are_stacked_with_a_layers_axis():
    c = _config(3)
    _, state = q.abstract_model(c)
    layers = nnx.to_flat_state(state["language_model"]["layers"])
    assert layers, "no decoder parameters"
    for path, var in layers:
        names = var.get_metadata()["out_sharding"]
        assert var.shape[0] == 3 and names[0] == "layers" and len(names) == len(var.shape), (path, names)
    kernel = state["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.shape == (3, c.text.hidden_size, c.text.intermediate_size)
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    # "layers" is never sharded, in every preset
    for preset in shd.RULE_PRESETS:
        assert dict(shd.resolve_rules(preset))["layers"] == ()
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    assert shd.logical_to_spec(("layers", "embed", "mlp"), "fsdp_tp", shape=(3, 64, 96), mesh=mesh) == \
        jax.sharding.PartitionSpec()


def test_table_maps_each_hf_layer_to_a_slice():
    c = _config(3)
    table = params.param_table(c)
    rows = [e for e in table if e.path == ("language_model", "layers", "self_attn", "k_proj", "kernel")]
    assert [e.hf_name for e in rows] == [f"model.language_model.layers.{i}.self_attn.k_proj.weight" for i in range(3)]
    assert [e.layer for e in rows] == [0, 1, 2] and {e.num_layers for e in rows} == {3}
    assert rows[1].per_layer_path == ("language_model", "layers", "1", "self_attn", "k_proj", "kernel")
    assert rows[0].our_shape() == (3, c.text.hidden_size, c.text.num_key_value_heads * c.text.head_dim)
    # one stacked parameter's rows are consecutive (readers fill one stacked array at a time)
    paths = [e.path for e in table]
    for p in set(paths):
        idx = [i for i, x in enumerate(paths) if x == p]
        assert idx == list(range(idx[0], idx[0] + len(idx))), p
    # the table covers the model's state exactly
    _, state = q.abstract_model(c)
    assert set(_flat(nnx.to_pure_dict(state))) == set(paths)


def _per_layer(pure):
    """The pre-stacking layout of a pure dict: stacked blocks as per-block subtrees "0", "1", ..."""
    out = jax.tree.map(lambda a: a, pure)
    for outer, inner in STACKS:
        stacked = out[outer][inner]
        if all(str(k).isdigit() for k in stacked):        # a tower that is not stacked
            continue
        n = jax.tree.leaves(stacked)[0].shape[0]
        out[outer][inner] = {str(i): jax.tree.map(lambda a, i=i: np.asarray(a[i]), stacked) for i in range(n)}
    return out


@untied_only
def test_per_layer_model_dir_restacks_on_load(tiny, tiny_hf, tmp_path):
    """A model directory written before stacking loads into the stacked model (from_pretrained and the
    sharded loader), and exports to the same HF tensors."""
    c = tiny.config
    pure = params.hf_to_state(c, params.HFCheckpoint(tiny_hf.hf_dir))
    old = q.loading.save_model_dir(str(tmp_path / "old"), _per_layer(pure), q.to_hf_dict(c))
    want = _flat(nnx.to_pure_dict(nnx.state(tiny, nnx.Param)))
    loaded = _flat(nnx.to_pure_dict(nnx.state(q.from_pretrained(old), nnx.Param)))
    assert set(loaded) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(want[k]), err_msg=str(k))
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    sharded = _flat(nnx.to_pure_dict(nnx.state(q.from_pretrained(old, mesh=mesh))))
    for k in want:
        np.testing.assert_array_equal(np.asarray(sharded[k]), np.asarray(want[k]), err_msg=str(k))
    hf_dir = convert.export_to_hf(old, str(tmp_path / "hf"))
    exported = params.HFCheckpoint(hf_dir)
    reference = params.HFCheckpoint(tiny_hf.hf_dir)
    assert set(exported.keys()) == set(reference.keys())
    for name in reference.keys():
        np.testing.assert_array_equal(exported[name], reference[name], err_msg=name)


@untied_only
def test_per_layer_model_dir_of_another_depth_names_the_directory(tiny, tiny_hf, tmp_path):
    c = tiny.config
    pure = _per_layer(params.hf_to_state(c, params.HFCheckpoint(tiny_hf.hf_dir)))
    del pure["language_model"]["layers"]["1"]            # one layer where the config has two
    old = q.loading.save_model_dir(str(tmp_path / "short"), pure, q.to_hf_dict(c))
    with pytest.raises(ValueError, match=r"short/params.*language_model.layers.*convert_hf_to_orbax"):
        q.from_pretrained(old)


@untied_only
def test_stacked_cache_and_last_only_prefill(tiny, tiny_hf):
    """The cache holds all layers [L, B, S, K, H]; a prefill whose top layer computes the last token only
    writes the same cache and gives the same last logits as the full forward, for 2 layers and for 1
    (no scan at all)."""
    b = tiny_hf.batches["left"]
    pv = jnp.asarray(b.pixel_values)
    vis = q.vision_layout(b.image_grid_thw, num_patches_padded=pv.shape[0],
                          window_size=tiny.config.vision.window_size).map(jnp.asarray)
    pos, _ = q.mrope_positions(b.input_ids, b.image_grid_thw, b.attention_mask,
                               image_token_id=tiny.config.image_token_id,
                               vision_start_token_id=tiny.config.vision_start_token_id)
    ids, mask = jnp.asarray(b.input_ids, jnp.int32), jnp.asarray(b.attention_mask)
    B, L = ids.shape
    one = q.Qwen25VL(tiny.config.replace(text=dataclasses.replace(tiny.config.text, num_hidden_layers=1)),
                     rngs=nnx.Rngs(0))
    for model in (tiny, one):
        t = model.config.text
        cache = model.init_cache(B, L + 4)
        assert cache.k.shape == cache.v.shape == (t.num_hidden_layers, B, L + 4, t.num_key_value_heads, t.head_dim)

        @nnx.jit(static_argnums=1)
        def run(model, last_only):
            return model.forward(ids, jnp.asarray(pos), mask, pixel_values=pv, vision=vis,
                                 cache=model.init_cache(B, L + 4), last_only=last_only)

        full, full_cache = run(model, False)
        last, last_cache = run(model, True)
        assert last.shape == (B, 1, t.vocab_size)
        np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(last_cache.k), np.asarray(full_cache.k), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(last_cache.v), np.asarray(full_cache.v), rtol=1e-6, atol=1e-6)
        assert int(last_cache.index) == L
        assert float(jnp.abs(full_cache.k[-1, :, :L]).max()) > 0       # the top layer's keys are written
        assert float(jnp.abs(full_cache.k[:, :, L:]).max()) == 0        # and nothing past the prompt


@pytest.mark.parametrize("remat", ["none", "full"])
def test_program_size_does_not_grow_with_depth(remat):
    """The lowered loss + gradient of a text-only forward is about as large for 6 layers as for 2 (a
    scan holds one layer's body); unrolled layers would add one body per layer."""
    def size(layers):
        c = _config(layers).replace(remat_policy=remat)
        graphdef, state = q.abstract_model(c)
        ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)

        def loss(state, ids):
            model = nnx.merge(graphdef, state)
            pos = jnp.broadcast_to(jnp.arange(16)[None, None], (3, 2, 16))
            logits, _ = model.forward(ids, pos, jnp.ones_like(ids))
            return jnp.mean(logits)

        return len(jax.jit(jax.grad(loss)).lower(state, ids).as_text())

    two, six = size(2), size(6)
    assert six < 1.05 * two, (two, six)


@untied_only
def test_decode_view_runs_layer_by_layer_on_per_layer_kernels(tiny):
    """The decode view's transposed kernels are one array per layer (a slice of a stacked weight would be
    copied on every decode step on CPU) and its cached forward (prefill, then one token) gives the stacked
    model's numbers."""
    t = tiny.config.text
    kernels = tiny.language_model.decode_kernels()
    assert len(kernels["gate_proj"]) == t.num_hidden_layers
    assert kernels["gate_proj"][1].shape == (t.intermediate_size, t.hidden_size)
    np.testing.assert_array_equal(np.asarray(kernels["gate_proj"][1]),
                                  np.asarray(tiny.language_model.layers.mlp.gate_proj.kernel[1]).T)
    rs = np.random.default_rng(0)
    ids = jnp.asarray(rs.integers(3, 400, (2, 9)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(9)[None, None], (3, 2, 9))

    @nnx.jit(static_argnums=1)
    def run(model, view):
        m = model.decode_view() if view else model
        cache = m.init_cache(2, 12)
        first, cache = m.forward(ids[:, :8], pos[..., :8], jnp.ones((2, 8), jnp.int32), cache=cache, last_only=True)
        second, cache = m.forward(ids[:, 8:], pos[..., 8:], jnp.ones((2, 1), jnp.int32), cache=cache)
        return first, second, cache.k

    ref, view = run(tiny, False), run(tiny, True)
    for a, b in zip(ref, view):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
