"""One source for image settings: a trained model directory records the pixel bounds it was trained with
in its processor config, and mode=eval, tools/evaluate.py and tools/generate.py all resize images with
them (vlaa_jax.eval.harness.pixel_limits) unless told otherwise; any other directory gets the paper's."""
from __future__ import annotations

import json

from data_pipeline.image import processor_pixels, write_processor_pixels
from vlaa_jax.eval import harness


def _processor_dir(tmp_path, **cfg):
    d = tmp_path / "model"
    d.mkdir()
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
         "size": {"shortest_edge": 3136, "longest_edge": 12845056}, **cfg}))
    return str(d)


def test_hf_defaults_are_not_training_bounds(tmp_path):
    d = _processor_dir(tmp_path)  # an HF download: HF's processor defaults
    assert processor_pixels(d) is None and processor_pixels(str(tmp_path / "none")) is None
    assert harness.pixel_limits(d) == (4 * 28 * 28, 256 * 32 * 32)  # the paper's evaluation bounds
    assert harness.pixel_limits("") == (4 * 28 * 28, 256 * 32 * 32)


def test_trained_bounds_are_recorded_and_used(tmp_path):
    d = _processor_dir(tmp_path)
    write_processor_pixels(d, 56 * 56, 56 * 56)
    cfg = json.load(open(f"{d}/preprocessor_config.json"))
    assert (cfg["min_pixels"], cfg["max_pixels"], cfg["size"]["longest_edge"]) == (3136, 3136, 3136)
    assert processor_pixels(d) == (3136, 3136)
    assert harness.pixel_limits(d) == (3136, 3136)
    assert harness.pixel_limits(d, max_pixels=256 * 32 * 32) == (3136, 256 * 32 * 32)  # an override wins
