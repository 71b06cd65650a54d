"""HF tensor names and layouts <-> our NNX state paths, both directions, as one table.

HF (transformers 5) names: `model.visual.*`, `model.language_model.*`, `lm_head.weight`; the released
checkpoints (transformers 4.4x) use `visual.*` and `model.*` and are accepted on read (`canonical_name`).
Layouts: torch Linear weights are [out, in], ours [in, out]; the fused vision qkv is [D, 3, D] here so the
`heads` axis shards without cutting across q/k/v; the Conv3d patch embedding is a [patch_dim, D] matmul.

Our side is a nested "pure dict" keyed by the NNX state path with string keys (block indices as "0",
"1", ...), the tree Orbax stores and `nnx.replace_by_pure_dict` applies (it maps "0" back to 0).
Reading is tensor by tensor (`HFCheckpoint`), so peak host memory stays about one copy of the weights.

Stacked blocks: a run of identical blocks that the model scans (the decoder layers, text.py; the vision
blocks, vision.py) is one module whose parameters have a leading layer axis. The table keeps one row per
HF tensor: HF `model.language_model.layers.{i}.X` is slice i of our `language_model.layers.X`, HF
`model.visual.blocks.{i}.X` slice i of our `visual.blocks.X` (`ParamEntry.layer`).
`repeated(..., stacked=...)` in `param_table` builds either form for any run of blocks (per block:
`visual.blocks.{i}.X`), so a tower is stacked in the checkpoint format by flipping its flag with its
module. Stacked rows come parameter by parameter (all layers of one tensor, then the next), so a reader
fills one stacked array at a time. Model directories written before stacking (per-layer paths such as
`language_model.layers.{i}.X`, `visual.blocks.{i}.X`) still load: `loading.load_params` restacks them
against the model's target, and `state_to_hf` reads either layout.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from vlaa_jax.models.qwen2_5_vl.config import Qwen25VLConfig

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class ParamEntry(NamedTuple):
    hf_name: str
    path: tuple[str, ...]          # NNX state path (string keys)
    hf_shape: tuple[int, ...]
    kind: str                      # copy | linear | qkv_weight | qkv_bias | patch
    layer: int | None = None       # stacked: this tensor is slice `layer` of the leading axis of `path`
    num_layers: int | None = None  # stacked: the size of that axis
    stack: tuple[str, ...] = ()    # stacked: path of the stacked module (e.g. language_model.layers)

    @property
    def per_layer_path(self) -> tuple[str, ...]:
        """The path this tensor had before stacking (`language_model.layers.{i}.X`); `path` if unstacked."""
        if self.layer is None:
            return self.path
        n = len(self.stack)
        return self.path[:n] + (str(self.layer),) + self.path[n:]

    def our_shape(self) -> tuple[int, ...]:
        """Shape of our (whole, stacked) parameter."""
        shape = to_ours(self.kind, np.empty(self.hf_shape, np.bool_)).shape
        return shape if self.layer is None else (self.num_layers, *shape)


def param_table(config: Qwen25VLConfig) -> list[ParamEntry]:
    """Every HF tensor of the model: HF name, our path (and, for stacked blocks, which layer of it), HF
    shape and the layout transform."""
    t, v = config.text, config.vision
    rows: list[ParamEntry] = []

    def add(hf, path, shape, kind):
        rows.append(ParamEntry(hf, tuple(path.split(".")), tuple(shape), kind))

    def linear(hf, path, n_in, n_out, bias):
        add(f"{hf}.weight", f"{path}.kernel", (n_out, n_in), "linear")
        if bias:
            add(f"{hf}.bias", f"{path}.bias", (n_out,), "copy")

    def norm(hf, path, dim, bias=False):
        add(f"{hf}.weight", f"{path}.scale", (dim,), "copy")
        if bias:                      # LayerNorm (Qwen2-VL's vision tower)
            add(f"{hf}.bias", f"{path}.bias", (dim,), "copy")

    def mlp(hf, path, dim, hidden, bias):
        linear(f"{hf}.gate_proj", f"{path}.gate_proj", dim, hidden, bias)
        linear(f"{hf}.up_proj", f"{path}.up_proj", dim, hidden, bias)
        linear(f"{hf}.down_proj", f"{path}.down_proj", hidden, dim, bias)

    def repeated(hf_prefix, prefix, n, block, stacked):
        """Rows of n identical blocks `block(hf, path)`: HF `{hf_prefix}.{i}.X` -> our `{prefix}.{i}.X`,
        or, stacked, slice i of `{prefix}.X` (rows reordered parameter-major)."""
        start = len(rows)
        for i in range(n):
            block(f"{hf_prefix}.{i}", prefix if stacked else f"{prefix}.{i}")
        if not stacked or not n:
            return
        per_layer = rows[start:]
        del rows[start:]
        k = len(per_layer) // n
        stack = tuple(prefix.split("."))
        rows.extend(per_layer[i * k + j]._replace(layer=i, num_layers=n, stack=stack)
                    for j in range(k) for i in range(n))

    D = v.hidden_size
    add("model.visual.patch_embed.proj.weight", "visual.patch_embed.kernel",
        (D, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), "patch")

    ln = v.norm == "layer"

    def vision_block(hf, p):
        norm(f"{hf}.norm1", f"{p}.norm1", D, ln)
        norm(f"{hf}.norm2", f"{p}.norm2", D, ln)
        add(f"{hf}.attn.qkv.weight", f"{p}.attn.qkv.kernel", (3 * D, D), "qkv_weight")
        add(f"{hf}.attn.qkv.bias", f"{p}.attn.qkv.bias", (3 * D,), "qkv_bias")
        linear(f"{hf}.attn.proj", f"{p}.attn.proj", D, D, True)
        if v.mlp == "fc":             # Qwen2-VL
            linear(f"{hf}.mlp.fc1", f"{p}.mlp.fc1", D, v.intermediate_size, True)
            linear(f"{hf}.mlp.fc2", f"{p}.mlp.fc2", v.intermediate_size, D, True)
        else:
            mlp(f"{hf}.mlp", f"{p}.mlp", D, v.intermediate_size, True)

    repeated("model.visual.blocks", "visual.blocks", v.depth, vision_block, stacked=True)
    wide = D * v.spatial_merge_size ** 2
    norm("model.visual.merger.ln_q", "visual.merger.ln_q", D, ln)
    linear("model.visual.merger.mlp.0", "visual.merger.fc1", wide, wide, True)
    linear("model.visual.merger.mlp.2", "visual.merger.fc2", wide, v.out_hidden_size, True)

    H, qd, kvd = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    add("model.language_model.embed_tokens.weight", "language_model.embed_tokens", (t.vocab_size, H), "copy")

    def decoder_layer(hf, p):
        norm(f"{hf}.input_layernorm", f"{p}.input_layernorm", H)
        norm(f"{hf}.post_attention_layernorm", f"{p}.post_attention_layernorm", H)
        linear(f"{hf}.self_attn.q_proj", f"{p}.self_attn.q_proj", H, qd, True)
        linear(f"{hf}.self_attn.k_proj", f"{p}.self_attn.k_proj", H, kvd, True)
        linear(f"{hf}.self_attn.v_proj", f"{p}.self_attn.v_proj", H, kvd, True)
        linear(f"{hf}.self_attn.o_proj", f"{p}.self_attn.o_proj", qd, H, False)
        mlp(f"{hf}.mlp", f"{p}.mlp", H, t.intermediate_size, False)

    repeated("model.language_model.layers", "language_model.layers", t.num_hidden_layers, decoder_layer,
             stacked=True)
    norm("model.language_model.norm", "language_model.norm", H)
    if not config.tie_word_embeddings:
        add("lm_head.weight", "lm_head", (t.vocab_size, H), "linear")
    return rows


def to_ours(kind: str, x: np.ndarray) -> np.ndarray:
    """HF layout -> our layout."""
    if kind == "copy":
        return x
    if kind == "linear":
        return x.T
    if kind == "qkv_weight":                      # [3D, D] -> [D, 3, D]
        return x.T.reshape(x.shape[1], 3, -1)
    if kind == "qkv_bias":                        # [3D] -> [3, D]
        return x.reshape(3, -1)
    if kind == "patch":                           # [D, C, T, p, p] -> [C*T*p*p, D]
        return x.reshape(x.shape[0], -1).T
    raise ValueError(kind)


def to_hf(kind: str, x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    """Our layout -> HF layout (contiguous)."""
    if kind == "copy":
        y = x
    elif kind == "linear":
        y = x.T
    elif kind == "qkv_weight":
        y = x.reshape(x.shape[0], -1).T
    elif kind in ("qkv_bias", "patch"):
        y = x.reshape(-1) if kind == "qkv_bias" else x.T
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(y.reshape(hf_shape))


def canonical_name(name: str) -> str:
    """transformers-5 name of an HF tensor name (maps the released checkpoints' `visual.*` / `model.*`)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + name[len("model."):]
    return name


def hf_to_state(config: Qwen25VLConfig, tensors: Mapping[str, np.ndarray] | Callable[[str], np.ndarray], *,
                put: Callable[[np.ndarray, tuple[str, ...]], Any] | None = None,
                source: str = "checkpoint") -> dict[str, Any]:
    """Builds our nested pure dict from HF tensors, one tensor at a time.

    `tensors`: a mapping or a getter by (transformers-5) name, e.g. an `HFCheckpoint`. `put(array, path)`
    converts each array as it is made (cast, device_put, shard); default keeps NumPy. A stacked parameter
    is filled layer by layer into one host array and put once complete. Errors name the tensor (and
    `source`) on a missing tensor or a wrong shape.
    """
    get = tensors.__getitem__ if isinstance(tensors, Mapping) or hasattr(tensors, "__getitem__") else tensors
    out: dict[str, Any] = {}
    filling: dict[tuple[str, ...], list] = {}       # stacked path -> [host array, layers filled]
    for e in param_table(config):
        try:
            x = get(e.hf_name)
        except KeyError:
            raise KeyError(f"{source}: tensor {e.hf_name!r} is missing") from None
        if tuple(x.shape) != e.hf_shape:
            raise ValueError(f"{source}: tensor {e.hf_name!r} has shape {tuple(x.shape)}, expected {e.hf_shape} "
                             "for this config")
        y = to_ours(e.kind, np.asarray(x))
        if e.layer is not None:
            if e.path not in filling:
                filling[e.path] = [np.empty((e.num_layers, *y.shape), y.dtype), 0]
            filling[e.path][0][e.layer] = y
            filling[e.path][1] += 1
            if filling[e.path][1] < e.num_layers:
                continue
            y = filling.pop(e.path)[0]
        node = out
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
        node[e.path[-1]] = put(y, e.path) if put is not None else y
        del x, y
    return out


def lookup_path(tree: Any, path: tuple[str, ...]) -> Any:
    """The node at `path` (string keys) of a pure dict whose block indices may be ints."""
    node = tree
    for k in path:
        if k in node:
            node = node[k]
        elif k.isdigit() and int(k) in node:
            node = node[int(k)]
        else:
            raise KeyError(f"state has no {'.'.join(path)!r}")
    return node


def _tensor(state: Any, e: ParamEntry, stacked: dict[tuple[str, ...], np.ndarray]) -> np.ndarray:
    """Our-layout array of one HF tensor: the parameter, or its layer's slice of a stacked one (each stacked
    parameter is converted to NumPy once, kept in `stacked` while its layers are read), or the per-layer
    array of a tree written before stacking."""
    if e.layer is None:
        return np.asarray(lookup_path(state, e.path))
    if e.path not in stacked:
        stacked.clear()
        try:
            stacked[e.path] = np.asarray(lookup_path(state, e.path))
        except KeyError:
            return np.asarray(lookup_path(state, e.per_layer_path))
    x = stacked[e.path]
    if x.shape != e.our_shape():
        raise ValueError(f"state {'.'.join(e.path)!r} has shape {x.shape}, expected {e.our_shape()} "
                         f"({e.num_layers} stacked layers of HF tensors like {e.hf_name!r})")
    return x[e.layer]


def state_to_hf(config: Qwen25VLConfig, state: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (transformers-5 HF name, NumPy array in HF layout) for every parameter, one at a time.
    `state`: our nested pure dict (str or int keys), or `nnx.state(model)`; stacked layers may also come
    per layer (a model directory written before stacking)."""
    if hasattr(state, "to_pure_dict"):
        state = nnx.to_pure_dict(state)
    stacked: dict[tuple[str, ...], np.ndarray] = {}
    for e in param_table(config):
        x = _tensor(state, e, stacked)
        expected = to_ours(e.kind, np.empty(e.hf_shape, np.bool_)).shape
        if x.shape != expected:
            raise ValueError(f"state {'.'.join(e.path)!r} has shape {x.shape}, expected {expected} "
                             f"(HF tensor {e.hf_name!r})")
        yield e.hf_name, to_hf(e.kind, x, e.hf_shape)


def damaged_safetensors(path: str, e: BaseException) -> ValueError:
    """The error for a .safetensors file that does not read (cut short by a download, overwritten, a Git
    LFS pointer left by a clone without `git lfs`)."""
    with open(path, "rb") as f:
        if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
            return ValueError(f"{path}: a Git LFS pointer, not the weights: fetch them (`git lfs pull` in the "
                              "clone, or download the file itself)")
    return ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}): it is corrupt or "
                      "truncated; download it again (its size must match the source's)")


_LFS_POINTER = b"version https://git-lfs"


def _open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise damaged_safetensors(path, e) from None


class HFCheckpoint:
    """Lazy, tensor-by-tensor access to the safetensors of an HF directory (single file or sharded via
    model.safetensors.index.json), keyed by transformers-5 names. A file that does not read is a
    ValueError naming it."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, SAFETENSORS_INDEX)
        single = os.path.join(hf_dir, SAFETENSORS_SINGLE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index (needs 'weight_map'): {e}") from e
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(hf_dir, shard)):
                    raise FileNotFoundError(f"{index} names shard {shard!r}, which is missing from {hf_dir}")
        elif os.path.isfile(single):
            with _open(single) as f:
                weight_map = {k: SAFETENSORS_SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}")
        self.files = {canonical_name(k): (v, k) for k, v in weight_map.items()}

    def keys(self):
        return self.files.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> np.ndarray:
        # The file is opened per tensor: safetensors memory-maps it, and a handle kept open would keep every
        # page read so far resident, i.e. a second copy of the weights in RSS by the end of a conversion.
        if name not in self.files:
            raise KeyError(name)
        shard, stored = self.files[name]
        path = os.path.join(self.hf_dir, shard)
        with _open(path) as f:
            if stored not in f.keys():
                raise KeyError(f"{path}: tensor {stored!r} is missing (the index names this shard for it)")
            try:
                return f.get_tensor(stored)
            except SafetensorError as e:
                raise damaged_safetensors(path, e) from None

    def shape(self, name: str) -> tuple[int, ...]:
        shard, stored = self.files[name]
        with _open(os.path.join(self.hf_dir, shard)) as f:
            return tuple(f.get_slice(stored).get_shape())


def check_no_unexpected(config: Qwen25VLConfig, names: Any, source: str) -> None:
    """Errors on tensors the config has no place for (a config/checkpoint mismatch)."""
    known = {e.hf_name for e in param_table(config)}
    if config.tie_word_embeddings:
        known.add("lm_head.weight")           # tied: a saved copy of the embedding is ignored
    extra = sorted(set(names) - known)
    if extra:
        raise ValueError(f"{source}: {len(extra)} tensors have no place in this config, e.g. {extra[:5]}")
