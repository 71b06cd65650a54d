"""Model directories: an Orbax checkpoint of the weights plus everything needed to use them.

A vlaa-jax model directory is self-contained, like an HF one, so that `from_pretrained`, the sampler and
the trainers need nothing else:

    DIR/config.json       the HF Qwen2.5-VL config (architecture; also how tools recognise the model)
    DIR/params/           Orbax checkpoint of the parameters, a nested dict keyed by our NNX state paths
    DIR/vlaa_jax.json     format marker and provenance (source, dtype)
    DIR/tokenizer*.json, preprocessor_config.json, chat_template.* ...   copied from the source

Training-state checkpoints (optimizer, step, data iterator) are the trainer's business; this module only
moves model weights.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import type_handlers

FORMAT = "vlaa-jax-model/1"
PARAMS_SUBDIR = "params"
MARKER_FILE = "vlaa_jax.json"
# Files that make an HF directory usable beyond its weights (tokenizer, processor, generation defaults).
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "generation_config.json",
)


def is_model_dir(path: str) -> bool:
    """True for a vlaa-jax (Orbax) model directory, False for anything else (e.g. an HF directory)."""
    return os.path.isfile(os.path.join(path, MARKER_FILE)) and os.path.isdir(
        os.path.join(path, PARAMS_SUBDIR))


def copy_processor_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies tokenizer / processor files present in `src_dir`; returns the names copied."""
    copied = []
    for name in PROCESSOR_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def save_model_dir(out_dir: str, params: Mapping[str, Any], hf_config: Mapping[str, Any], *,
                   processor_dir: str | None = None, info: Mapping[str, Any] | None = None) -> str:
    """Writes `params` (nested dict of arrays) as Orbax plus config and processor files to `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    params_dir = os.path.join(out_dir, PARAMS_SUBDIR)
    if os.path.exists(params_dir):
        raise FileExistsError(f"{params_dir} already exists: choose an empty --out directory")
    os.makedirs(out_dir, exist_ok=True)
    # Orbax deep-copies NumPy leaves by default (a second copy of the weights in host memory); the save
    # below is synchronous and nothing mutates the leaves meanwhile, so the copy is not needed.
    registry = type_handlers.create_type_handler_registry(
        *((ty, h) for ty, h in _default_handlers() if ty is not np.ndarray),
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False))
    checkpointer.save(params_dir, args=ocp.args.PyTreeSave(dict(params)))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(hf_config), f, indent=2, sort_keys=True)
    if processor_dir is not None:
        copy_processor_files(processor_dir, out_dir)
    with open(os.path.join(out_dir, MARKER_FILE), "w") as f:
        json.dump({"format": FORMAT, **(info or {})}, f, indent=2, sort_keys=True)
    return out_dir


def _default_handlers():
    from orbax.checkpoint._src.serialization import type_handler_registry
    return type_handler_registry._DEFAULT_TYPE_HANDLERS  # pylint: disable=protected-access


def read_hf_config(model_dir: str) -> dict[str, Any]:
    """The config.json of an HF or vlaa-jax model directory, with errors that name the path."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {model_dir!r} is not a model directory")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_params(model_dir: str, target: Any | None = None) -> Any:
    """Restores the parameter tree of a vlaa-jax model directory.

    `target` may be an abstract tree (`jax.ShapeDtypeStruct`s with shardings, e.g. from `nnx.eval_shape`):
    each shard is then read straight onto its devices and the full model never sits on one device.
    A directory written before the decoder layers were stacked (per-layer subtrees "0", "1", ... where
    `target` has one stacked array per parameter) is restacked on load (`_restore_restacked`).
    """
    if not is_model_dir(model_dir):
        raise FileNotFoundError(
            f"{model_dir!r} is not a vlaa-jax model directory (no {MARKER_FILE} and {PARAMS_SUBDIR}/); "
            "convert an HF checkpoint with tools/convert_hf_to_orbax.py")
    params_dir = os.path.join(os.path.abspath(model_dir), PARAMS_SUBDIR)
    checkpointer = ocp.StandardCheckpointer()
    if target is not None:
        stored = checkpointer.metadata(params_dir).item_metadata.tree
        if _per_layer_nodes(stored, target):
            return _restore_restacked(checkpointer, params_dir, stored, target)
    return checkpointer.restore(params_dir, target)


def _per_layer_nodes(stored: Any, target: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths where `stored` holds per-layer subtrees ("0", "1", ...) and `target` one stacked subtree."""
    if not isinstance(stored, Mapping) or not isinstance(target, Mapping):
        return []
    if set(stored) != set(target) and stored and all(str(k).isdigit() for k in stored) and not any(
            str(k).isdigit() for k in target):
        return [path]
    return [p for k in target if k in stored for p in _per_layer_nodes(stored[k], target[k], path + (k,))]


def _layer_target(x: Any) -> Any:
    """The target of one layer's slice of a stacked target leaf (its sharding without the layer axis)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def _restore_restacked(checkpointer: Any, params_dir: str, stored: Any, target: Any) -> Any:
    """Restores a per-layer (pre-stacking) directory into the stacked layout of `target`: each layer's
    arrays are read onto the devices the stacked target places them on, then stacked one parameter at a
    time (peak: the weights once plus one stacked parameter)."""
    nodes = set(_per_layer_nodes(stored, target))

    def count(path):
        node = stored
        for k in path:
            node = node[k]
        return len(node)

    def per_layer(tree, path=()):
        if path in nodes:
            n = count(path)
            for leaf in jax.tree.leaves(tree):
                if leaf.shape[0] != n:
                    raise ValueError(f"{params_dir}: {'.'.join(path)} holds {n} per-layer subtrees but the "
                                     f"model stacks {leaf.shape[0]} layers; re-run tools/convert_hf_to_orbax.py")
            return {str(i): jax.tree.map(_layer_target, tree) for i in range(n)}
        if isinstance(tree, Mapping):
            return {k: per_layer(v, path + (k,)) for k, v in tree.items()}
        return tree

    def restack(tree, like, path=()):
        if path in nodes:
            flat = [jax.tree.leaves(tree[str(i)]) for i in range(len(tree))]
            tree.clear()
            out = []
            for j, t in enumerate(jax.tree.leaves(like)):
                pieces = [f[j] for f in flat]
                for f in flat:
                    f[j] = None
                out.append(_stack(pieces, t))
                del pieces
            return jax.tree.unflatten(jax.tree.structure(like), out)
        if isinstance(tree, Mapping):
            return {k: restack(tree[k], like[k], path + (k,)) for k in list(tree)}
        return tree

    try:
        restored = checkpointer.restore(params_dir, per_layer(target))
    except (ValueError, KeyError) as e:
        raise ValueError(f"{params_dir}: a model directory with per-layer decoder parameters (written before "
                         f"the layers were stacked) that does not fit this model ({e}); re-run "
                         "tools/convert_hf_to_orbax.py on the HF checkpoint") from e
    return restack(restored, target)


def _stack(pieces: list[Any], target: Any) -> jax.Array:
    """One stacked parameter from its layers, placed like `target` (a ShapeDtypeStruct)."""
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        return jnp.stack(pieces).astype(target.dtype)
    return jax.jit(lambda *xs: jnp.stack(xs).astype(target.dtype), out_shardings=sharding)(*pieces)
