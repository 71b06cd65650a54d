"""benchmarks/gpu.py end to end on CPU (its --smoke path, in-process: the same code paths as the GPU run on
a tiny config) and benchmarks/flops.py against independent counts: hand-counted vision windows, the
model's own parameter shapes, and XLA's cost analysis of a compiled forward pass. No timing assertions."""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import flops, gpu
from vlaa_jax.models.qwen2_5_vl import Qwen25VL


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_bench")
    out, md = d / "result.json", d / "RESULTS.md"
    md.write_text("# Results\n")
    result = gpu.run(["--smoke", "--repeats", "1", "--out", str(out), "--results", str(md)])
    return result, json.loads(out.read_text()), md.read_text()


def test_smoke_runs_every_part(smoke):
    result, written, _ = smoke
    for part in ("sft", "decode", "grpo"):
        assert "error" not in result[part], result[part].get("error")
    assert not result["failed"]
    assert written["sft"]["model_flops"] == result["sft"]["model_flops"]
    assert written["device"]["platform"] == jax.devices()[0].platform
    assert result["peaks"]["peak_flops"] > 0 and result["peaks"]["hbm_bytes_per_s"] > 0
    assert "measured" in result["peaks"]["peak_flops_source"]          # CPU: measured, not the GPU table


def test_smoke_sft_figures(smoke):
    s = smoke[0]["sft"]
    assert s["model_flops"] > 0 and s["xla_cost_analysis_flops"] > 0
    parts = ("decoder_matmuls_flops", "decoder_attention_flops", "lm_head_flops", "vision_flops")
    assert math.isclose(sum(s["model_flops_parts"][k] for k in parts), s["model_flops"])
    assert 0 < s["mfu"] <= 1.5
    assert s["tokens_per_s"] > 0 and s["step_time_s"] > 0 and s["compile_s"] > 0
    assert s["shapes"]["response_targets"] == s["shapes"]["rows"] * s["shapes"]["response_tokens"]
    assert all(np.isfinite(s["losses"]))


def test_smoke_decode_figures(smoke):
    c = smoke[0]["decode"]
    assert c["all_rows_full_length"]              # no stop ids: every row decodes all its tokens
    assert c["tokens_per_s"] > 0
    assert 0 < c["fraction_of_bound"] < 1        # achieved below the bandwidth bound
    assert c["bound_full_cache_tokens_per_s"] <= c["bound_tokens_per_s"]


def test_smoke_grpo_figures(smoke):
    r = smoke[0]["grpo"]
    sh = r["shapes"]
    assert r["response_tokens_per_iteration"] == sh["rows"] * sh["new_tokens"]
    assert sh["updates_per_iteration"] == sh["rows"] // sh["update_minibatch_rows"]
    assert r["response_tokens_per_s_per_device"] > 0
    assert all(np.isfinite(it["loss"]) for it in r["iterations"])
    assert r["median_rollout_s"] + r["median_logprobs_s"] + r["median_update_s"] <= r["median_iteration_s"] * 1.001


def test_results_section(smoke):
    md = smoke[2]
    assert md.startswith("# Results\n")
    for text in ("SMOKE", "SFT MFU", "Decode / HBM bound", "GRPO response tokens/s/device", ">= 3,600"):
        assert text in md


def test_vision_window_pairs_by_hand():
    cfg = gpu.model_config(False)          # 112-pixel windows: 8 x 8 patches
    # 16 x 24 patches: 2 x 3 full windows of 64 patches.
    assert flops.vision_attention_pairs(cfg, (16, 24)) == (6 * 64 ** 2, (16 * 24) ** 2)
    # 20 x 12 patches: window rows of 8, 8, 4 patches x columns of 8, 4 (partial at the edges).
    sizes = [r * c for r in (8, 8, 4) for c in (8, 4)]
    assert flops.vision_attention_pairs(cfg, (20, 12))[0] == sum(s * s for s in sizes)


def test_decode_weights_are_the_models_decoder_weights():
    cfg = gpu.model_config(True, dtype="float32")
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    lm = nnx.state(model.language_model, nnx.Param)
    n_text = sum(math.prod(x.shape) for x in jax.tree.leaves(lm))
    embed = math.prod(model.language_model.embed_tokens.shape)
    assert cfg.tie_word_embeddings
    # every decoder weight + final norm, and the (tied) output projection read in full
    assert flops.decoder_weight_count(cfg) == n_text - embed + cfg.text.vocab_size * cfg.text.hidden_size
    b = flops.decode_bytes_per_step(cfg, batch=4, context_len=10, weight_bytes=2, kv_bytes=2)
    t = cfg.text
    assert b["kv_cache_bytes"] == 4 * 11 * t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 2


def test_forward_flops_match_xla_cost_analysis():
    """Text-only forward of a mid-size model (matmuls dominate): the analytic forward FLOPs against
    XLA's count of the compiled forward (which adds elementwise work and the masked half of the
    causal attention square). One decoder layer: XLA counts the body of the layer scan once."""
    base = gpu.model_config(True, dtype="float32")
    text = dataclasses.replace(base.text, hidden_size=256, intermediate_size=768, num_attention_heads=4,
                               num_key_value_heads=2, mrope_section=(8, 12, 12), vocab_size=2048,
                               num_hidden_layers=1)
    cfg = base.replace(text=text, vision=dataclasses.replace(base.vision, out_hidden_size=256))
    B, L, R = 2, 128, 64
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 400, (B, L)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (3, B, L))
    seg = jnp.ones((B, L), jnp.int32)

    @nnx.jit
    def forward(model, ids, pos, seg):
        hidden, _ = model.forward(ids, pos, seg, return_hidden=True)
        return model.logits(hidden[:, L - R:])

    xla = forward.lower(model, ids, pos, seg).compile().cost_analysis()
    xla = float((xla[0] if isinstance(xla, (list, tuple)) else xla)["flops"])
    ours = flops.sft_step_flops(cfg, batch=B, image_patches=0, text_tokens=L, response_tokens=R)["forward_flops"]
    print(f"\nXLA / analytic forward FLOPs = {xla / ours:.3f}")
    assert 1.0 <= xla / ours <= 1.3, (xla, ours)
