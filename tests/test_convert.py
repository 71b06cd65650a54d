"""HF <-> Orbax conversion tools, checked against the transformers reference model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.fixtures.hf_models import hf_tensors
from vlaa_jax import convert
from vlaa_jax.models import qwen2_5_vl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], capture_output=True,
                          text=True, timeout=600)


def _our_logits(model_dir: str, batch) -> np.ndarray:
    model = qwen2_5_vl.from_pretrained(model_dir)
    return np.asarray(model(batch.input_ids, attention_mask=batch.attention_mask,
                            pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw))


def test_round_trip_through_both_tools_is_bit_exact_and_loads_in_transformers(tiny_hf, tmp_path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    # A tokenizer file in the HF dir must travel along (the directory is self-contained).
    shutil.copy(os.path.join(tiny_hf.hf_dir, "config.json"), tmp_path / "src_config.json")
    src = str(tmp_path / "src")
    shutil.copytree(tiny_hf.hf_dir, src)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 32768}, f)

    r = _tool("convert_hf_to_orbax.py", "--hf_dir", src, "--out", ckpt)
    assert r.returncode == 0, r.stderr
    assert qwen2_5_vl.loading.is_model_dir(ckpt)
    assert os.path.isfile(os.path.join(ckpt, "tokenizer_config.json"))

    batch = tiny_hf.batches["left"]
    ours = _our_logits(ckpt, batch)
    ref = tiny_hf.logits["left"]
    valid = batch.attention_mask.astype(bool)
    err = np.abs(ours - ref)[valid].max()
    print(f"converted tiny: max |logit diff| = {err:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert err <= 1e-4 * max(1.0, np.abs(ref).max())

    r = _tool("export_to_hf.py", "--ckpt", ckpt, "--out", out)
    assert r.returncode == 0, r.stderr
    original, exported = hf_tensors(tiny_hf.hf_dir), hf_tensors(out)
    expected_names = {k for k in original if not (tiny_hf.config["tie_word_embeddings"] and k == "lm_head.weight")}
    assert set(exported) == expected_names
    for k in expected_names:
        assert exported[k].dtype == original[k].dtype, k
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        hf_logits = model.eval()(**batch.hf_kwargs()).logits.numpy()
    np.testing.assert_allclose(hf_logits[valid], ref[valid], rtol=0, atol=1e-5)


def test_bfloat16_round_trip_is_bit_exact(tiny_hf, tmp_path):
    import torch
    src, ckpt, out = str(tmp_path / "bf16"), str(tmp_path / "ckpt"), str(tmp_path / "hf")
    tiny_hf.model.to(torch.bfloat16).save_pretrained(src)
    tiny_hf.model.to(torch.float32)
    convert.convert_hf_to_orbax(src, ckpt)
    assert json.load(open(os.path.join(ckpt, qwen2_5_vl.loading.MARKER_FILE)))["dtype"] == "bfloat16"
    convert.export_to_hf(ckpt, out)
    original, exported = hf_tensors(src), hf_tensors(out)
    assert set(exported) <= set(original) and len(exported) >= len(original) - 1
    for k, v in exported.items():
        assert str(v.dtype) == "bfloat16", k
        np.testing.assert_array_equal(v.view(np.uint16), original[k].view(np.uint16), err_msg=k)
    # A bfloat16 directory loads as a bfloat16 model.
    model = qwen2_5_vl.from_pretrained(ckpt, dtype="bfloat16")
    assert str(model.language_model.embed_tokens.value.dtype) == "bfloat16"


def test_convert_with_dtype_cast_and_sharded_export(tiny_hf, tmp_path):
    import ml_dtypes
    from transformers import Qwen2_5_VLForConditionalGeneration
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    r = _tool("convert_hf_to_orbax.py", "--hf_dir", tiny_hf.hf_dir, "--out", ckpt, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    r = _tool("export_to_hf.py", "--ckpt", ckpt, "--out", out, "--max_shard_size", "60KB")
    assert r.returncode == 0, r.stderr
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.getsize(os.path.join(out, s)) < 200_000 for s in shards)
    original, exported = hf_tensors(tiny_hf.hf_dir), hf_tensors(out)
    for k, v in exported.items():
        np.testing.assert_array_equal(v, original[k].astype(ml_dtypes.bfloat16), err_msg=k)
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_sharded_hf_input_and_missing_shard(tiny_hf, tmp_path):
    src = str(tmp_path / "sharded")
    tiny_hf.model.save_pretrained(src, max_shard_size="100KB")
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    convert.convert_hf_to_orbax(src, str(tmp_path / "ok"))
    os.remove(os.path.join(src, shards[-1]))
    r = _tool("convert_hf_to_orbax.py", "--hf_dir", src, "--out", str(tmp_path / "bad"))
    assert r.returncode == 2
    assert shards[-1] in r.stderr and "missing" in r.stderr


def test_errors_name_the_problem(tiny_hf, tmp_path):
    # Not a model directory at all.
    r = _tool("convert_hf_to_orbax.py", "--hf_dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1"))
    assert r.returncode == 2 and "nowhere" in r.stderr
    # A directory of another architecture.
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    r = _tool("convert_hf_to_orbax.py", "--hf_dir", str(other), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "llama" in r.stderr and "config.json" in r.stderr
    # A tensor of the wrong shape is named.
    bad = str(tmp_path / "badshape")
    shutil.copytree(tiny_hf.hf_dir, bad)
    tensors = load_file(os.path.join(bad, "model.safetensors"))
    name = "layers.1.mlp.up_proj.weight"
    stored = next(k for k in tensors if k.endswith(name))
    tensors[stored] = tensors[stored][:-1]
    save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    r = _tool("convert_hf_to_orbax.py", "--hf_dir", bad, "--out", str(tmp_path / "o3"))
    assert r.returncode == 2 and name in r.stderr and "shape" in r.stderr
    # Export from something that is not a converted checkpoint.
    r = _tool("export_to_hf.py", "--ckpt", tiny_hf.hf_dir, "--out", str(tmp_path / "o4"))
    assert r.returncode == 2 and "convert_hf_to_orbax" in r.stderr
    # Refuses to overwrite.
    ckpt = str(tmp_path / "ckpt")
    convert.convert_hf_to_orbax(tiny_hf.hf_dir, ckpt)
    r = _tool("convert_hf_to_orbax.py", "--hf_dir", tiny_hf.hf_dir, "--out", ckpt)
    assert r.returncode == 2 and "already exists" in r.stderr
    with pytest.raises(ValueError, match="max shard size"):
        convert.parse_size("lots")


@pytest.mark.slow
def test_3b_shaped_round_trip_and_peak_memory(qwen3b_shaped_hf, tmp_path):
    """3B-shaped shallow (~2.3 GB fp32, sharded input): round trip is bit-exact, and conversion's peak
    RSS stays about one copy of the weights (not two)."""
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    weights = sum(os.path.getsize(os.path.join(qwen3b_shaped_hf.hf_dir, f))
                  for f in os.listdir(qwen3b_shaped_hf.hf_dir) if f.endswith(".safetensors"))
    # VmHWM (peak RSS of this process image; unlike ru_maxrss it does not inherit pytest's at exec).
    hwm = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024"
    code = ("import sys; sys.argv=['x','--hf_dir',%r,'--out',%r]; "
            "sys.path.insert(0, %r); from tools.convert_hf_to_orbax import main; "
            "print('BASE', %s); rc = main(); print('PEAK', %s); sys.exit(rc)"
            % (qwen3b_shaped_hf.hf_dir, ckpt, ROOT, hwm, hwm))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    base = int(r.stdout.split("BASE")[1].split()[0])      # the interpreter with jax etc. imported
    peak = int(r.stdout.split("PEAK")[1].split()[0])
    print(f"3B-shaped convert: weights {weights / 2**30:.2f} GiB, peak RSS {peak / 2**30:.2f} GiB "
          f"({(peak - base) / 2**30:.2f} GiB above the {base / 2**30:.2f} GiB of imports)")
    assert peak - base < 1.75 * weights
    convert.export_to_hf(ckpt, out, max_shard_size="1GB")
    original, exported = hf_tensors(qwen3b_shaped_hf.hf_dir), hf_tensors(out)
    assert set(exported) == set(original) - {"lm_head.weight"}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)
