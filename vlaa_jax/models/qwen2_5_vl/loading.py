"""Qwen2.5-VL / Qwen2-VL weights in and out: `from_pretrained` (an HF or a vlaa-jax model directory, onto the
default device or straight onto a mesh) and vlaa-jax model directories.

A vlaa-jax model directory is self-contained, like an HF one, so that `from_pretrained`, the sampler and
the trainers need nothing else:

    DIR/config.json       the HF config (architecture and family; also how tools recognise the model)
    DIR/params/           Orbax checkpoint of the parameters, a nested dict keyed by our NNX state paths
    DIR/vlaa_jax.json     format marker and provenance (source, dtype)
    DIR/tokenizer*.json, preprocessor_config.json, chat_template.* ...   copied from the source

Training-state checkpoints (optimizer, step, data iterator) are the trainer's business
(vlaa_jax/train/checkpointer.py); this module only moves model weights.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Any, Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import type_handlers
from orbax.checkpoint._src.serialization import type_handler_registry

import vlaa_jax.models.qwen2_5_vl.params as hf_params
from vlaa_jax import quiet
from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig, load_config
from vlaa_jax.models.qwen2_5_vl.model import Qwen25VL, abstract_model

FORMAT = "vlaa-jax-model/1"
PARAMS_SUBDIR = "params"
MARKER_FILE = "vlaa_jax.json"
# Files that make an HF directory usable beyond its weights (tokenizer, processor, generation defaults).
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "generation_config.json",
)


# --------------------------------------------------------------------------------------------------
# from_pretrained
# --------------------------------------------------------------------------------------------------

def from_pretrained(path: str, *, mesh: Mesh | None = None, rules: shd.RulesLike = None, dtype: Any = "float32",
                    param_dtype: Any = None, config: Qwen25VLConfig | None = None,
                    ignore_tensors: Collection[str] = (), **run_options: Any) -> Qwen25VL:
    """Loads an HF Qwen2.5-VL or Qwen2-VL directory (config.json + single or sharded safetensors) or a vlaa-jax model
    directory (config.json + Orbax params).

    dtype: compute dtype; param_dtype: storage dtype (default: dtype); run_options: remat_policy,
    attention_impl. Without `mesh`, weights are read tensor by tensor onto the default device (about one
    copy in memory). With `mesh`, every parameter is placed as `rules` (default `fsdp_tp`) say and each
    device reads only its own shard: HF safetensors are memory-mapped and sliced, a model directory is
    restored with a sharded target, so the full model never sits on one device (nor, for HF, in host
    memory). `nnx.split(model)` gives the (graphdef, state) that jitted code takes.
    config: the architecture to read the weights into (default: the directory's, with the options above);
    ignore_tensors: HF tensors of the directory outside the model (e.g. a reward model's value head),
    which the check for tensors without a place skips.
    """
    if config is None:
        config = load_config(path, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype,
                             **run_options)
    if mesh is None:
        graphdef, abstract = abstract_model(config)
    else:
        graphdef, abstract, _ = shd.abstract_state(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)), mesh, rules)
    if is_model_dir(path):
        pure = _model_dir_params(path, abstract, sharded=mesh is not None)
    elif mesh is None:
        pure = _hf_params(path, config, ignore_tensors)
    else:
        pure = _hf_params_sharded(path, config, abstract, ignore_tensors)
    nnx.replace_by_pure_dict(abstract, pure)
    return nnx.merge(graphdef, abstract)


def _model_dir_params(path: str, abstract: nnx.State, *, sharded: bool) -> dict[str, Any]:
    """The parameters of a vlaa-jax model directory as the abstract state's dtypes (and shardings)."""
    target = _str_keys(nnx.to_pure_dict(abstract))
    if not sharded:          # onto the default device
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    pure = load_params(path, target)
    return jax.tree.map(lambda a, t: jnp.asarray(a, t.dtype), pure, target)


def _hf_params(path: str, config: Qwen25VLConfig, ignore: Collection[str] = ()) -> dict[str, Any]:
    """The parameters of an HF directory on the default device, one tensor at a time."""
    pdtype = config.jnp_param_dtype
    ckpt = hf_params.HFCheckpoint(path)
    hf_params.check_no_unexpected(config, set(ckpt.keys()) - set(ignore), source=path)
    return hf_params.hf_to_state(config, ckpt, source=path,
                                 put=lambda a, _: jnp.asarray(np.asarray(a).astype(pdtype, copy=False)))


def _hf_params_sharded(path: str, config: Qwen25VLConfig, abstract: nnx.State,
                       ignore: Collection[str] = ()) -> dict[str, Any]:
    """The parameters of an HF directory placed like `abstract` (ShapeDtypeStructs with shardings): every
    device's shard is read from the memory-mapped safetensors on its own (`array_from_reader`)."""
    ckpt = hf_params.HFCheckpoint(path)
    hf_params.check_no_unexpected(config, set(ckpt.keys()) - set(ignore), source=path)
    headers: dict[str, dict[str, Any]] = {}
    flat = abstract.to_pure_dict()
    pure: dict[str, Any] = {}

    def memmap(entry):
        if entry.hf_name not in ckpt.files:
            raise KeyError(f"{path}: tensor {entry.hf_name!r} is missing")
        shard, stored = ckpt.files[entry.hf_name]
        file = os.path.join(path, shard)
        if shard not in headers:
            headers[shard] = safetensors_header(file)
        hf = safetensors_tensor(file, headers[shard][stored])
        if tuple(hf.shape) != entry.hf_shape:
            raise ValueError(f"{path}: tensor {entry.hf_name!r} has shape {tuple(hf.shape)}, expected "
                             f"{entry.hf_shape} for this config")
        return hf

    # One parameter at a time: an unstacked one from its HF tensor, a stacked one from its layers' tensors
    # (rows of one stacked parameter are consecutive in the table).
    groups: dict[tuple[str, ...], list[Any]] = {}
    for entry in hf_params.param_table(config):
        groups.setdefault(entry.path, []).append(entry)
    for param_path, entries in groups.items():
        # A memmap per tensor, dropped once its shards are on the devices, so pages read so far do not
        # stay mapped (resident) for the whole load.
        hfs = [memmap(e) for e in entries]            # stacked: in layer order
        kind, stacked = entries[0].kind, entries[0].layer is not None
        target = hf_params.lookup_path(flat, param_path)
        pure_node = pure
        for k in param_path[:-1]:
            pure_node = pure_node.setdefault(k, {})
        if stacked:
            read = lambda index, kind=kind, hfs=hfs: _stacked_slice(kind, hfs, index)
        else:
            read = lambda index, kind=kind, hf=hfs[0]: _hf_slice(kind, hf, index)
        pure_node[param_path[-1]] = array_from_reader(target.shape, target.dtype, target.sharding, read)
        del hfs, read
    return pure


def _str_keys(tree: Any) -> Any:
    """A pure dict with string keys (block indices "0", "1", ...), the tree Orbax stores."""
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


# --------------------------------------------------------------------------------------------------
# HF safetensors, read slice by slice
# --------------------------------------------------------------------------------------------------

def array_from_reader(shape: Sequence[int], dtype: Any, sharding: NamedSharding,
                      read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array built shard by shard: `read(index)` returns only the host slice `index`."""
    shape = tuple(shape)

    def callback(index):
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape)) if index else ()
        piece = np.asarray(read(index), dtype=dtype)
        expected = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
        if piece.shape != expected:
            raise ValueError(f"reader returned shape {piece.shape} for slice {index}, expected {expected}")
        return piece

    return jax.make_array_from_callback(shape, sharding, callback)


# Safetensors dtype names -> NumPy (bfloat16 through ml_dtypes, which NumPy itself lacks).
_SAFETENSORS_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def safetensors_header(path: str) -> dict[str, tuple[Any, tuple[int, ...], int, int]]:
    """name -> (NumPy dtype, shape, byte offset, byte length) of every tensor of a .safetensors file.

    A file whose header does not parse, or whose tensors reach past its end (a cut-short download), is a
    ValueError naming it (`params.damaged_safetensors`)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        entries = {name: (info["dtype"], tuple(info["shape"]), *info["data_offsets"])
                   for name, info in header.items() if name != "__metadata__"}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:  # JSON / layout errors
        raise hf_params.damaged_safetensors(path, e) from None
    out = {}
    for name, (dtype, shape, start, end) in entries.items():
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if 8 + n + end > size:
            raise hf_params.damaged_safetensors(
                path, ValueError(f"tensor {name!r} ends at byte {8 + n + end}, after the end of the file ({size})"))
        out[name] = (_SAFETENSORS_DTYPES[dtype], shape, 8 + n + start, end - start)
    return out


def safetensors_tensor(path: str, entry: tuple[Any, tuple[int, ...], int, int]) -> np.ndarray:
    """One tensor as a read-only np.memmap (bfloat16 included, which the `safetensors` NumPy reader cannot
    return): slicing it reads only that slice from disk."""
    dtype, shape, offset, length = entry
    if length == 0 or not shape:
        with open(path, "rb") as f:
            f.seek(offset)
            return np.frombuffer(f.read(length), dtype).reshape(shape)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _hf_slice(kind: str, hf: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
    """Our-layout slice `index` of the HF tensor `hf`, reading only what that slice needs."""
    if kind == "copy":
        return hf[index]
    if kind == "linear":                                   # ours = hf.T
        return np.asarray(hf[index[1], index[0]]).T
    if kind in ("qkv_weight", "qkv_bias"):                 # ours[.., c, e] = hf[c * D + e, ..]
        dq = hf.shape[0] // 3
        *lead, sc, se = index if kind == "qkv_bias" else (index[0], index[1], index[2])
        rows = [hf[c * dq + se.start:c * dq + se.stop] for c in range(*sc.indices(3))]
        if kind == "qkv_bias":
            return np.stack(rows)
        return np.stack([np.asarray(r[:, lead[0]]) for r in rows]).transpose(2, 0, 1)
    if kind == "patch":                                    # ours = hf.reshape(D, -1).T
        sp, sd = index
        block = np.asarray(hf[sd])
        return block.reshape(block.shape[0], -1)[:, sp].T
    return hf_params.to_ours(kind, np.asarray(hf))[index]  # any other layout: whole tensor, then slice


def _stacked_slice(kind: str, hfs: Sequence[np.ndarray], index: tuple[slice, ...]) -> np.ndarray:
    """Our-layout slice `index` of a stacked parameter whose layer i is the HF tensor hfs[i]: index[0]
    picks the layers, the rest slices each layer's tensor (`_hf_slice`)."""
    layers = range(*index[0].indices(len(hfs)))
    return np.stack([_hf_slice(kind, hfs[i], index[1:]) for i in layers])


# --------------------------------------------------------------------------------------------------
# vlaa-jax model directories
# --------------------------------------------------------------------------------------------------

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


def check_new_model_dir(out_dir: str) -> str:
    """The params/ path of a model directory about to be written; FileExistsError if it cannot be (a file
    in the way, or a model directory there already). Tools call it before the work that precedes a save."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"--out {out_dir} is a file, not a directory: choose another --out")
    params_dir = os.path.join(os.path.abspath(out_dir), PARAMS_SUBDIR)
    if os.path.exists(params_dir):
        raise FileExistsError(f"{params_dir} already exists: choose an empty --out directory")
    return params_dir


def save_model_dir(out_dir: str, params: Mapping[str, Any], hf_config: Mapping[str, Any], *,
                   processor_dir: str | None = None, info: Mapping[str, Any] | None = None) -> str:
    """Writes `params` (nested dict of arrays; our pure dict, int or str keys) as Orbax plus config and
    processor files to `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    params_dir = check_new_model_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # Orbax deep-copies NumPy leaves by default (a second copy of the weights in host memory); the save
    # below is synchronous and nothing mutates the leaves meanwhile, so the copy is not needed.
    defaults = type_handler_registry._DEFAULT_TYPE_HANDLERS  # pylint: disable=protected-access
    registry = type_handlers.create_type_handler_registry(
        *((ty, h) for ty, h in defaults if ty is not np.ndarray),
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False))
    checkpointer.save(params_dir, args=ocp.args.PyTreeSave(_str_keys(params)))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(hf_config), f, indent=2, sort_keys=True)
    if processor_dir is not None:
        copy_processor_files(processor_dir, out_dir)
    with open(os.path.join(out_dir, MARKER_FILE), "w") as f:
        json.dump({"format": FORMAT, **(info or {})}, f, indent=2, sort_keys=True)
    return out_dir


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
    try:
        if target is not None:
            stored = _damage_named(params_dir, lambda: checkpointer.metadata(params_dir).item_metadata.tree)
            if _per_layer_nodes(stored, target):
                return _restore_restacked(checkpointer, params_dir, stored, target)
        return _damage_named(params_dir, lambda: checkpointer.restore(params_dir, target))
    finally:
        checkpointer.close()


def short_reason(e: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, without the kilobytes of spec that tensorstore errors carry."""
    text = " ".join(str(e).split(" [tensorstore_spec=")[0].split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _damage_named(params_dir: str, read: Callable[[], Any]) -> Any:
    """read(), with Orbax / tensorstore errors about damaged files as one ValueError naming the directory."""
    try:
        with quiet.orbax_restore():
            return read()
    except (ValueError, OSError, KeyError, AttributeError) as e:
        raise ValueError(f"{params_dir}: the parameters do not restore ({short_reason(e)}): the model directory "
                         "is damaged or does not match its config.json; write it again "
                         "(tools/convert_hf_to_orbax.py, or the trainer's export)") from None


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
