"""Padded shapes of batches: the few sequence lengths and pixel-row counts that jitted code compiles for.

One rule for the loader and the trainer's update micro-batches: a batch is padded to the smallest bucket
that holds it, and the buckets are the worst case / 8, / 4, / 2 and / 1, so a run compiles each
function for at most four shapes. Pixel rows follow the model's vision geometry (`VisionConfig`): an
image of at most `max_pixels` pixels has at most max_pixels / (patch_size * merge)^2 merged tokens of
merge^2 patches each.
"""
from __future__ import annotations

from collections.abc import Sequence

from vlaa_jax.models.qwen2_5_vl.config import VisionConfig

_FRACTIONS = (8, 4, 2)
_LENGTH_MULTIPLE, _PIXEL_MULTIPLE = 16, 64


def length_buckets(max_length: int) -> tuple[int, ...]:
    """Sequence lengths max_length / 8, / 4, / 2 (rounded down to multiples of 16, at least 16) and
    max_length itself."""
    m = _LENGTH_MULTIPLE
    return tuple(sorted({max(m, -(-max_length // d) // m * m) for d in _FRACTIONS} | {max_length}))


def max_image_patches(max_pixels: int, vision: VisionConfig) -> int:
    """Patches of the largest image `smart_resize` makes within `max_pixels` (at least one merged token)."""
    unit = vision.spatial_merge_size ** 2
    return max(unit, max_pixels // (vision.patch_size * vision.spatial_merge_size) ** 2 * unit)


def pixel_buckets(batch_size: int, max_pixels: int, vision: VisionConfig, images_per_row: int = 1
                  ) -> tuple[int, ...]:
    """pixel_values rows for `batch_size` rows of `images_per_row` images: the worst case / 8, / 4, / 2
    (rounded down to multiples of 64, at least 64) and the worst case rounded up to a multiple of 64."""
    m = _PIXEL_MULTIPLE
    worst = batch_size * images_per_row * max_image_patches(max_pixels, vision)
    return tuple(sorted({max(m, -(-worst // d) // m * m) for d in _FRACTIONS} | {-(-worst // m) * m}))


def pick_bucket(n: int, buckets: Sequence[int], what: str) -> int:
    """The smallest of the ascending `buckets` that holds `n`; ValueError naming `what` if none does."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} needs {n}, more than the largest bucket {buckets[-1]}; raise the buckets")
