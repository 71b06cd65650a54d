"""The sharded loader's readers: HF tensors sliced in their own layout give our layout's slices, and
safetensors are memory-mapped with bfloat16 intact (what `from_pretrained(..., mesh=...)` builds on)."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vlaa_jax import sharding as shd
from vlaa_jax.models.qwen2_5_vl import loading
from vlaa_jax.models.qwen2_5_vl.params import to_ours


@pytest.mark.parametrize("kind,hf_shape", [("copy", (8, 6)), ("linear", (6, 8)),
                                           ("qkv_weight", (12, 4)), ("qkv_bias", (12,)),
                                           ("patch", (4, 3, 2, 2, 2))])
def test_hf_slices_match_full_layout_transform(kind, hf_shape):
    hf = np.arange(math.prod(hf_shape), dtype=np.float32).reshape(hf_shape)
    ours = to_ours(kind, hf)
    mesh = shd.make_mesh((1, 2, 4))
    names = {2: ("embed", "mlp"), 3: ("embed", None, "heads"), 1: ("heads",)}[ours.ndim]
    if kind == "qkv_bias":
        names = (None, "heads")
    sharding = shd.logical_sharding(names, mesh, "fsdp_tp", ours.shape)
    arr = loading.array_from_reader(ours.shape, np.float32, sharding, lambda idx: loading._hf_slice(kind, hf, idx))
    np.testing.assert_array_equal(np.asarray(arr), ours)


def test_safetensors_memmap_reads_bfloat16(tmp_path):
    t = torch.randn(4, 6).to(torch.bfloat16)
    path = str(tmp_path / "x.safetensors")
    save_file({"w": t, "b": torch.arange(5, dtype=torch.int64)}, path)
    m = {name: loading.safetensors_tensor(path, e) for name, e in loading.safetensors_header(path).items()}
    assert m["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(m["w"][1:3, 2:5].astype(np.float32), t.float().numpy()[1:3, 2:5])
    np.testing.assert_array_equal(m["b"], np.arange(5))
