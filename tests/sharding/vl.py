"""Tiny Qwen2.5-VL batches with images and an SFT-style loss, for the sharding tests and benchmark."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlaa_jax.models.qwen2_5_vl import Qwen25VLConfig, layout

LAYOUT_KEYS = ("window_index", "reverse_index", "window_segments", "full_segments", "rotary_hw",
               "num_patches")


def make_batch(config: Qwen25VLConfig, batch_size: int = 8, length: int = 32, seed: int = 0,
               images=((4, 4), (4, 6))) -> dict[str, np.ndarray]:
    """`batch_size` right-padded rows, each: text, one image (patch grid cycling over `images`), text.

    Returns the host arrays `Qwen25VL.forward` takes (layout fields flattened into the dict) plus
    `loss_mask` (1 on the text after the image).
    """
    rs = np.random.RandomState(seed)
    c, v = config, config.vision
    m = v.spatial_merge_size
    specials = {c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id}
    vocab = c.text.vocab_size
    ids = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    loss_mask = np.zeros((batch_size, length), np.int32)
    grids = []
    for b in range(batch_size):
        h, w = images[b % len(images)]
        n_img = h * w // (m * m)
        before = 2 + b % 3
        after = length - before - n_img - 2 - (b % 4)
        text = lambda n: [t for t in rs.randint(3, vocab, size=3 * n) if t not in specials][:n]
        row = text(before) + [c.vision_start_token_id] + [c.image_token_id] * n_img + \
            [c.vision_end_token_id] + text(after)
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
        loss_mask[b, len(row) - after:len(row)] = 1
        grids.append((1, h, w))
    grid = np.asarray(grids, np.int32)
    n_patches = int(np.prod(grid, axis=1).sum())
    pixel_values = rs.randn(n_patches, v.patch_dim).astype(np.float32)
    position_ids, _ = layout.mrope_positions(
        ids, grid, mask, spatial_merge_size=m, image_token_id=c.image_token_id,
        vision_start_token_id=c.vision_start_token_id)
    lay = layout.vision_layout(grid, patch_size=v.patch_size, spatial_merge_size=m,
                               window_size=v.window_size)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask,
             "position_ids": position_ids.astype(np.int32), "pixel_values": pixel_values}
    batch.update({k: np.asarray(getattr(lay, k)) for k in LAYOUT_KEYS})
    return batch


def vl_loss(model, batch):
    """Token-mean next-token cross-entropy over `loss_mask` (the SFT loss), float32."""
    vision = layout.VisionLayout(*(batch[k] for k in LAYOUT_KEYS))
    logits, _ = model.forward(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                              pixel_values=batch["pixel_values"], vision=vision)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    tgt = batch["input_ids"][:, 1:]
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    w = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0), {"tokens": jnp.sum(w)}
