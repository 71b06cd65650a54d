"""Padded shapes: the bucket tables the loader and the trainer's micro-batches share."""
import pytest

from data_pipeline.buckets import length_buckets, max_image_patches, pick_bucket, pixel_buckets
from vlaa_jax.models.qwen2_5_vl import VisionConfig


def test_length_buckets():
    assert length_buckets(2048) == (256, 512, 1024, 2048)
    assert length_buckets(384) == (48, 96, 192, 384)
    assert length_buckets(100) == (16, 48, 100)  # multiples of 16, at least 16, and the maximum itself
    assert length_buckets(8) == (8, 16)


def test_pixel_buckets_follow_the_vision_geometry():
    qwen = VisionConfig()  # 28 px per merged token, 4 patches each
    assert max_image_patches(256 * 28 * 28, qwen) == 1024
    assert pixel_buckets(8, 256 * 28 * 28, qwen) == (1024, 2048, 4096, 8192)
    assert pixel_buckets(2, 256 * 28 * 28, qwen, images_per_row=4) == (1024, 2048, 4096, 8192)
    assert pixel_buckets(1, 10, qwen) == (64,)  # at least one merged token, at least 64 rows
    big = VisionConfig(patch_size=16, spatial_merge_size=1)  # 16 px per merged token of one patch
    assert max_image_patches(256 * 28 * 28, big) == 784
    assert pixel_buckets(8, 256 * 28 * 28, big) == (768, 1536, 3136, 6272)  # fractions round down


def test_pick_bucket():
    assert pick_bucket(1, (64, 128), "rows") == 64
    assert pick_bucket(64, (64, 128), "rows") == 64
    assert pick_bucket(65, (64, 128), "rows") == 128
    with pytest.raises(ValueError, match="rows needs 129, more than the largest bucket 128"):
        pick_bucket(129, (64, 128), "rows")
