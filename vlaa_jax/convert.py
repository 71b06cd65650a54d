"""HF Qwen2.5-VL / Qwen2-VL checkpoints <-> vlaa-jax model directories (Orbax), tensor by tensor.

The model family is config.json's `model_type` (models/qwen2_5_vl/config.py `FAMILIES`); nothing here
branches on it.

Both directions keep each tensor's dtype unless a dtype is asked for, so HF -> Orbax -> HF is bit-exact
for float32 and bfloat16 weights. Peak host memory is about one copy of the weights: tensors are read
from safetensors one at a time, and written back shard by shard.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from vlaa_jax.models.qwen2_5_vl import loading, params as params_lib
from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig, from_hf_dict, read_hf_config, to_hf_dict

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


def numpy_dtype(name: str | None) -> np.dtype | None:
    """`--dtype` value -> NumPy dtype (None keeps each tensor's own dtype)."""
    if name is None or name in ("", "keep"):
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {sorted(DTYPES)} (or 'keep')")
    return DTYPES[name]


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (as HF's max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not m:
        raise ValueError(f"max shard size {text!r} is not a size like '5GB' or '500MB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def released_name(name: str) -> str:
    """transformers-5 tensor name -> the name in the released checkpoints (`visual.*`, `model.*`), which is
    also what transformers 5 itself writes on `save_pretrained`, and what 4.x versions and vLLM read."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def _hf_config_with_dtype(hf_config: Mapping[str, Any], dtype_name: str) -> dict[str, Any]:
    out = json.loads(json.dumps(hf_config))
    for d in (out, out.get("text_config")):
        if isinstance(d, dict):
            d.pop("torch_dtype", None)
            d["dtype"] = dtype_name
    return out


def convert_hf_to_orbax(hf_dir: str, out_dir: str, dtype: str | None = None) -> str:
    """Converts an HF Qwen2.5-VL or Qwen2-VL directory into a self-contained vlaa-jax model directory."""
    loading.check_new_model_dir(out_dir)  # before reading gigabytes of weights
    hf_config = read_hf_config(hf_dir)
    config = from_hf_dict(hf_config, source=os.path.join(hf_dir, "config.json"))
    cast = numpy_dtype(dtype)
    ckpt = params_lib.HFCheckpoint(hf_dir)
    params_lib.check_no_unexpected(config, ckpt.keys(), source=hf_dir)
    seen: set[str] = set()

    def put(x: np.ndarray, _path) -> np.ndarray:
        # Contiguous leaves: the serialiser would otherwise make a C-ordered copy of each transposed view.
        seen.add(str(x.dtype))
        return np.ascontiguousarray(x if cast is None else x.astype(cast))

    state = params_lib.hf_to_state(config, ckpt, put=put, source=hf_dir)
    stored = str(cast) if cast is not None else (seen.pop() if len(seen) == 1 else "mixed")
    out_config = _hf_config_with_dtype(hf_config, stored) if stored != "mixed" else hf_config
    return loading.save_model_dir(out_dir, state, out_config, processor_dir=hf_dir,
                                  info={"source": os.path.abspath(hf_dir), "dtype": stored})


def write_hf_dir(config: Qwen25VLConfig, state: Any, out_dir: str, *, max_shard_size: str | int = "5GB",
                 dtype: str | None = None, hf_config: Mapping[str, Any] | None = None,
                 processor_dir: str | None = None) -> str:
    """Writes `state` (our nested pure dict or an nnx.State) as an HF directory that
    its family's HF class (`Qwen2_5_VLForConditionalGeneration` / `Qwen2VLForConditionalGeneration`)
    `.from_pretrained` loads without missing/unexpected keys."""
    limit = parse_size(max_shard_size)
    cast = numpy_dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.endswith(".safetensors") or name == params_lib.SAFETENSORS_INDEX:
            raise FileExistsError(f"{out_dir} already holds HF weights ({name}): choose an empty --out")

    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    total = 0
    dtypes: set[str] = set()

    def flush_needed(nbytes: int) -> bool:
        return bool(shards[-1]) and sizes[-1] + nbytes > limit

    # Shards are written as they fill, so at most one shard is held beyond the state itself.
    written: list[tuple[str, list[str]]] = []
    tmp_names: list[str] = []

    def write_shard(tensors: dict[str, np.ndarray]) -> None:
        name = f"model-{len(tmp_names) + 1:05d}.safetensors.tmp"
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        tmp_names.append(name)
        written.append((name, list(tensors)))

    for hf_name, x in params_lib.state_to_hf(config, state):
        hf_name = released_name(hf_name)
        if cast is not None:
            x = x.astype(cast)
        dtypes.add(str(x.dtype))
        if flush_needed(x.nbytes):
            write_shard(shards[-1])
            shards[-1], sizes[-1] = {}, 0
        shards[-1][hf_name] = x
        sizes[-1] += x.nbytes
        total += x.nbytes
    if shards[-1]:
        write_shard(shards[-1])
    shards.clear()

    n = len(tmp_names)
    weight_map: dict[str, str] = {}
    for i, (tmp, names) in enumerate(written):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        weight_map.update({k: final for k in names})
    if n > 1:
        with open(os.path.join(out_dir, params_lib.SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                      sort_keys=True)
    stored = dtypes.pop() if len(dtypes) == 1 else None
    cfg = dict(hf_config) if hf_config is not None else to_hf_dict(config)
    if stored is not None:
        cfg = _hf_config_with_dtype(cfg, stored)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if processor_dir is not None:
        loading.copy_processor_files(processor_dir, out_dir)
    return out_dir


def export_to_hf(ckpt_dir: str, out_dir: str, *, max_shard_size: str | int = "5GB",
                 dtype: str | None = None) -> str:
    """vlaa-jax model directory -> HF directory (weights, config, tokenizer / processor files)."""
    hf_config = read_hf_config(ckpt_dir)
    config = from_hf_dict(hf_config, source=os.path.join(ckpt_dir, "config.json"))
    state = loading.load_params(ckpt_dir)
    return write_hf_dir(config, state, out_dir, max_shard_size=max_shard_size, dtype=dtype,
                        hf_config=hf_config, processor_dir=ckpt_dir)


def main_args(argv: Iterable[str] | None, description: str, specs: list[tuple[str, dict]]):
    parser = argparse.ArgumentParser(description=description)
    for flag, kw in specs:
        parser.add_argument(flag, **kw)
    return parser.parse_args(None if argv is None else list(argv))


def run_tool(fn, *args: Any, **kwargs: Any) -> int:
    """Runs a conversion for a command-line tool and says what it wrote. (Bad input raises; the tools
    turn it into one `error:` line and exit code 2, tools/cli.py.)"""
    t0 = time.time()
    out = fn(*args, **kwargs)
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    return 0
