"""Session fixtures of the sharding tests: a tiny HF Qwen2.5-VL checkpoint, a batch with images and the
unsharded (single-device, no mesh) reference loss, gradients and logits, built once."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@dataclasses.dataclass
class TinyReference:
    hf_dir: str
    config: Any                    # Qwen25VLConfig
    batch: dict[str, np.ndarray]   # 8 rows, one image each
    loss: float
    grads: Any                     # pure dict of NumPy arrays, our state paths
    logits: np.ndarray


def vl_forward(model, batch):
    from tests.sharding.vl import LAYOUT_KEYS
    from vlaa_jax.models.qwen2_5_vl import layout
    vision = layout.VisionLayout(*(batch[k] for k in LAYOUT_KEYS))
    return model.forward(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                         pixel_values=batch["pixel_values"], vision=vision)[0]


@pytest.fixture(scope="session")
def tiny_ref(tmp_path_factory) -> TinyReference:
    from flax import nnx
    from tests.fixtures.hf_models import build_hf_model, tiny_hf_config_dict
    from tests.sharding.vl import make_batch, vl_loss
    from vlaa_jax.models.qwen2_5_vl import from_pretrained
    hf_dir = str(tmp_path_factory.mktemp("sharding_tiny_hf"))
    hf = build_hf_model(tiny_hf_config_dict(False), seed=11)
    hf.save_pretrained(hf_dir)
    del hf
    model = from_pretrained(hf_dir)           # plain, unsharded, default device
    batch = make_batch(model.config, batch_size=8)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}

    @nnx.jit
    def loss_and_grads(model, b):
        (loss, _), grads = nnx.value_and_grad(vl_loss, has_aux=True)(model, b)
        return loss, grads, vl_forward(model, b)

    loss, grads, logits = loss_and_grads(model, arrays)
    return TinyReference(hf_dir, model.config, batch, float(loss),
                         jax.tree.map(np.asarray, grads.to_pure_dict()), np.asarray(logits))
