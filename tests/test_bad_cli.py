"""Bad input to the command-line tools, table-driven: a damaged, foreign or missing checkpoint, a wrong
--out, a bad image or data path. Each case ends with exit code 2 and one `error:` line on stderr naming
the file and what to do, never a traceback, and within a time limit.

The tools' `main(argv)` run in this process (the exit goes through the same `sys.exit(2)` as a script);
two cases also run as real processes, to see that nothing else reaches stderr on the way out.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tests.fixtures.eval_models import write_tsv
from tests.fixtures.hf_models import tiny_hf_config_dict
from tests.time_limit import within
from tools import convert_hf_to_orbax, evaluate, export_to_hf, generate
from vlaa_jax import convert
from vlaa_jax.models import qwen2_5_vl as qwen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 120.0
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, qwen_tokenizer_dir) -> dict[str, Path]:
    """A tiny random HF Qwen2.5-VL directory (with the real tokenizer files), its sharded form, and its
    conversion to a vlaa-jax model directory."""
    root = tmp_path_factory.mktemp("cli")
    hf_config = tiny_hf_config_dict()
    config = qwen.from_hf_dict(hf_config, source="tiny")
    state = nnx.to_pure_dict(nnx.state(qwen.Qwen25VL(config, rngs=nnx.Rngs(0)), nnx.Param))
    convert.write_hf_dir(config, state, str(root / "hf"), hf_config=hf_config, processor_dir=qwen_tokenizer_dir)
    convert.write_hf_dir(config, state, str(root / "sharded"), hf_config=hf_config, max_shard_size="60KB")
    convert.convert_hf_to_orbax(str(root / "hf"), str(root / "ours"))
    return {"hf": root / "hf", "sharded": root / "sharded", "ours": root / "ours"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: float | int) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep) if isinstance(keep, float) else size - keep)


def _edit_config(d: Path, edit: Callable[[dict], object]) -> None:
    """config.json after `edit` mutated it."""
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    _write_config(d, cfg)


def _write_config(d: Path, obj: object) -> None:
    (d / "config.json").write_text(json.dumps(obj))


def _edit_tensors(d: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(str(d / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})


def _name_ending(tensors: dict, suffix: str) -> str:
    return next(k for k in tensors if k.endswith(suffix))


def _shrink(t: dict) -> None:
    k = _name_ending(t, "layers.1.mlp.up_proj.weight")
    t[k] = t[k][:-1]


def _drop(t: dict) -> None:
    del t[_name_ending(t, "layers.0.input_layernorm.weight")]


def _extra(t: dict) -> None:
    t["model.language_model.layers.7.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)


def _first_shard(d: Path) -> Path:
    return d / sorted(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())[0]


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123456\n"

# name -> (source dir, damage(dir, tmp) -> None, words of the message). The damaged copy is --hf_dir.
CONVERT = {
    "hf_dir_missing": (None, None, ["is not a directory"]),
    "hf_dir_is_a_file": ("file", None, ["is not a directory"]),
    "config_missing": ("hf", lambda d: (d / "config.json").unlink(), ["config.json is missing"]),
    "config_not_json": ("hf", lambda d: (d / "config.json").write_text("{\"model_type\": "),
                        ["config.json is not valid JSON"]),
    "config_is_a_list": ("hf", lambda d: _write_config(d, [tiny_hf_config_dict()]),
                         ["config.json", "expected a JSON object"]),
    "config_of_another_model": ("hf", lambda d: _write_config(d, {"model_type": "llama", "hidden_size": 8}),
                                ["config.json", "model_type='llama'", "'qwen2_5_vl'"]),
    "config_without_vision": ("hf", lambda d: _edit_config(d, lambda c: c.pop("vision_config")),
                              ["config.json", "'vision_config' is missing"]),
    "config_without_hidden_size": ("hf", lambda d: _edit_config(d, lambda c: c["text_config"].pop("hidden_size")),
                                   ["config.json", "'hidden_size' is missing"]),
    "no_weights": ("hf", lambda d: (d / WEIGHTS).unlink(), ["no model.safetensors or model.safetensors.index.json"]),
    "weights_truncated_half": ("hf", lambda d: _truncate(d / WEIGHTS, 0.5),
                               [WEIGHTS, "not a readable safetensors file", "download it again"]),
    "weights_short_by_100_bytes": ("hf", lambda d: _truncate(d / WEIGHTS, 100), [WEIGHTS, "corrupt or truncated"]),
    "weights_zero_bytes": ("hf", lambda d: _truncate(d / WEIGHTS, 0.0), [WEIGHTS, "not a readable safetensors"]),
    "weights_garbage": ("hf", lambda d: (d / WEIGHTS).write_bytes(b"\x00garbage" * 100),
                        [WEIGHTS, "not a readable safetensors"]),
    "weights_git_lfs_pointer": ("hf", lambda d: (d / WEIGHTS).write_bytes(LFS_POINTER),
                                [WEIGHTS, "Git LFS pointer", "git lfs pull"]),
    "weights_a_directory": ("hf", lambda d: ((d / WEIGHTS).unlink(), (d / WEIGHTS).mkdir()),
                            ["no model.safetensors or model.safetensors.index.json"]),
    "tensor_of_another_shape": ("hf", lambda d: _edit_tensors(d, _shrink), ["layers.1.mlp.up_proj.weight", "shape"]),
    "tensor_missing": ("hf", lambda d: _edit_tensors(d, _drop), ["layers.0.input_layernorm.weight", "missing"]),
    "tensor_unexpected": ("hf", lambda d: _edit_tensors(d, _extra), ["no place in this config", "layers.7"]),
    "index_not_json": ("sharded", lambda d: (d / "model.safetensors.index.json").write_text("{"),
                       ["model.safetensors.index.json", "not a safetensors index"]),
    "index_names_missing_shard": ("sharded", lambda d: _first_shard(d).unlink(), ["names shard", "missing"]),
    "shard_truncated": ("sharded", lambda d: _truncate(_first_shard(d), 0.5),
                        ["-of-", "not a readable safetensors file"]),
}


def _run(main, argv: list[str], capsys) -> str:
    """The tool's stderr; asserts exit code 2, one `error:` line and no traceback."""
    with pytest.raises(SystemExit) as e, within(LIMIT_S):
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _source(dirs, tmp_path: Path, src: str | None, damage) -> Path:
    if src is None:
        return tmp_path / "nowhere"
    if src == "file":
        (tmp_path / "a_file").write_text("not a directory")
        return tmp_path / "a_file"
    d = _copy(dirs[src], tmp_path / "src")
    if damage is not None:
        damage(d)
    return d


@pytest.mark.parametrize("name", sorted(CONVERT))
def test_convert_hf_to_orbax(dirs, tmp_path, capsys, name):
    src, damage, words = CONVERT[name]
    d = _source(dirs, tmp_path, src, damage)
    out = tmp_path / "out"
    line = _run(convert_hf_to_orbax.main, ["--hf_dir", str(d), "--out", str(out)], capsys)
    assert str(d) in line, line
    for w in words:
        assert w in line, (w, line)
    assert not (out / "params").exists()


@pytest.mark.parametrize("where,words", [("a_file", ["is a file, not a directory"]),
                                         ("converted", ["params already exists", "empty --out"])])
def test_convert_hf_to_orbax_bad_out(dirs, tmp_path, capsys, where, words):
    out = tmp_path / "out"
    if where == "a_file":
        out.write_text("x")
    else:
        shutil.copytree(dirs["ours"], out)
    line = _run(convert_hf_to_orbax.main, ["--hf_dir", str(dirs["hf"]), "--out", str(out)], capsys)
    assert str(out) in line and all(w in line for w in words), line


def _params_files(d: Path, pattern: str) -> list[Path]:
    found = sorted((d / "params").glob(pattern))
    assert found
    return found


EXPORT = {
    "ckpt_missing": (None, None, ["is not a directory"]),
    "ckpt_is_an_hf_dir": ("hf", None, ["not a vlaa-jax model directory", "convert_hf_to_orbax"]),
    "params_chunks_truncated": ("ours", lambda d: [_truncate(p, 0.5) for p in _params_files(d, "*/0*")],
                                ["params", "do not restore", "write it again"]),
    "params_arrays_metadata_broken": ("ours", lambda d: [p.write_text("{") for p in _params_files(d, "*/.zarray")],
                                      ["params", "do not restore"]),
    "params_empty": ("ours", lambda d: (shutil.rmtree(d / "params"), (d / "params").mkdir()),
                     ["params", "do not restore"]),
    "config_of_another_model": ("ours", lambda d: _write_config(d, {"model_type": "llava"}),
                                ["config.json", "model_type='llava'"]),
}


@pytest.mark.parametrize("name", sorted(EXPORT))
def test_export_to_hf(dirs, tmp_path, capsys, name):
    src, damage, words = EXPORT[name]
    d = _source(dirs, tmp_path, src, damage)
    line = _run(export_to_hf.main, ["--ckpt", str(d), "--out", str(tmp_path / "out")], capsys)
    assert str(d) in line and all(w in line for w in words), line
    assert "tensorstore_spec" not in line and len(line) < 800


def test_export_to_hf_bad_out_and_shard_size(dirs, tmp_path, capsys):
    out = _copy(dirs["hf"], tmp_path / "out")
    line = _run(export_to_hf.main, ["--ckpt", str(dirs["ours"]), "--out", str(out)], capsys)
    assert str(out) in line and "already holds HF weights" in line
    line = _run(export_to_hf.main, ["--ckpt", str(dirs["ours"]), "--out", str(tmp_path / "o2"),
                                    "--max_shard_size", "lots"], capsys)
    assert "max shard size 'lots'" in line


def _png(path: Path) -> Path:
    from PIL import Image
    Image.fromarray(np.zeros((56, 84, 3), np.uint8)).save(path)
    return path


GENERATE = {  # name -> (ckpt source, damage, image (None: no --image), words)
    "ckpt_missing": (None, None, None, ["--ckpt", "not a directory"]),
    "ckpt_of_another_model": ("hf", lambda d: _write_config(d, {"model_type": "llama"}), None,
                              ["config.json", "model_type='llama'"]),
    "ckpt_weights_truncated": ("hf", lambda d: _truncate(d / WEIGHTS, 0.5), None, [WEIGHTS, "download it again"]),
    "ckpt_without_tokenizer": ("hf", lambda d: (d / "tokenizer.json").unlink(), None, ["no tokenizer.json"]),
    "preprocessor_config_broken": ("hf", lambda d: (d / "preprocessor_config.json").write_text("{"), "good",
                                   ["preprocessor_config.json", "not valid JSON"]),
    "image_missing": ("hf", None, "missing", ["--image", "no such file"]),
    "image_is_a_directory": ("hf", None, "dir", ["--image", "a directory"]),
    "image_corrupt": ("hf", None, "corrupt", ["--image", "cannot decode image", "not in an image format"]),
    "image_zero_bytes": ("hf", None, "empty", ["--image", "empty file"]),
    "image_extreme_aspect_ratio": ("hf", None, "thin", ["aspect ratio"]),
}


@pytest.mark.parametrize("name", sorted(GENERATE))
def test_generate(dirs, tmp_path, capsys, name):
    src, damage, image, words = GENERATE[name]
    d = _source(dirs, tmp_path, src, damage)
    argv = ["--ckpt", str(d), "--question", "How many?", "--max_new_tokens", "2"]
    if image is not None:
        img = tmp_path / "img.png"
        if image == "good":
            _png(img)
        elif image == "dir":
            img.mkdir()
        elif image == "corrupt":
            img.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        elif image == "empty":
            img.write_bytes(b"")
        elif image == "thin":
            from PIL import Image
            Image.fromarray(np.zeros((2, 600, 3), np.uint8)).save(img)
        argv += ["--image", str(img)]
    line = _run(generate.main, argv, capsys)
    assert all(w in line for w in words), line


EVALUATE = {  # name -> (ckpt source, damage, data ("tsv" / "missing" / "empty"), words)
    "ckpt_missing": (None, None, "tsv", ["--ckpt", "not a directory"]),
    "data_missing": ("hf", None, "missing", ["--data", "no such file"]),
    "data_empty_file": ("hf", None, "empty", ["data.tsv"]),
    "ckpt_of_another_model": ("hf", lambda d: _write_config(d, {"model_type": "llama"}), "tsv",
                              ["config.json", "model_type='llama'"]),
    "ckpt_weights_truncated": ("hf", lambda d: _truncate(d / WEIGHTS, 0.5), "tsv", [WEIGHTS, "download it again"]),
}


@pytest.mark.parametrize("name", sorted(EVALUATE))
def test_evaluate(dirs, tmp_path, capsys, name):
    src, damage, data, words = EVALUATE[name]
    d = _source(dirs, tmp_path, src, damage)
    path = tmp_path / "data.tsv"
    if data == "tsv":
        write_tsv(str(path))
    elif data == "empty":
        path.write_text("")
    line = _run(evaluate.main, ["--ckpt", str(d), "--data", str(path), "--out", str(tmp_path / "o"),
                                "--max_new_tokens", "2"], capsys)
    assert all(w in line for w in words), line


@pytest.mark.parametrize("tool,flag,name,table", [
    ("convert_hf_to_orbax.py", "--hf_dir", "weights_truncated_half", CONVERT),
    ("export_to_hf.py", "--ckpt", "params_chunks_truncated", EXPORT),
])
def test_as_a_process_only_the_error_line_reaches_stderr(dirs, tmp_path, tool, flag, name, table):
    src, damage, words = table[name]
    d = _source(dirs, tmp_path, src, damage)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), flag, str(d), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=LIMIT_S)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(d) in lines[0], r.stderr[-2000:]
    assert all(w in lines[0] for w in words)


@pytest.mark.slow
def test_main_job_stops_on_bad_data_with_one_error_line(tmp_path):
    """`python -m vlaa_jax.main` (set-up, then the loader): a split file with no record is exit code 2 and
    an error line naming it, not a traceback."""
    repo = tmp_path / "repo"
    (repo / "images").mkdir(parents=True)
    (repo / "VLAA-Thinking-SFT-126K.json").write_text("\n")
    r = subprocess.run([sys.executable, "-m", "vlaa_jax.main", "--config", "configs/sft.py:demo", "--workdir",
                        str(tmp_path / "wd"), "--config.data.source=vlaa_thinking",
                        f"--config.data.dir={tmp_path / 'tfds'}", f"--config.data.manual_dir={repo}"],
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "VLAA-Thinking-SFT-126K.json" in errors[0] and "[empty_split]" in errors[0]
    assert "Traceback" not in r.stderr

