"""One source for image settings: a trained model directory records the pixel bounds it was trained with
in its processor config, and mode=eval, tools/evaluate.py and tools/generate.py all resize images with
them (vlaa_jax.eval.harness.pixel_limits) unless told otherwise; any other directory gets the paper's.
The system prompt it was trained with (data.system_prompt) is recorded and used the same way."""
from __future__ import annotations

import json

import pytest

from data_pipeline.chat import (TRAINED_SYSTEM_PROMPT_KEY, VLAA_SYSTEM_PROMPT, resolve_system_prompt, system_prompt_of,
                                trained_system_prompt, write_trained_system_prompt)
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


def test_trained_system_prompt_is_recorded_and_used(tmp_path):
    """The system prompt follows the same rule: the model directory's record (data.system_prompt of its
    training run), else the paper's VLAA-Thinker prompt; an explicit one wins."""
    d = _processor_dir(tmp_path)
    assert trained_system_prompt(d) is None and resolve_system_prompt(d) == "vlaa"
    assert resolve_system_prompt("") == "vlaa" and resolve_system_prompt(d, "default") == "default"
    write_trained_system_prompt(d, "default")
    write_processor_pixels(d, 56 * 56, 56 * 56)  # a second record keeps the first
    assert trained_system_prompt(d) == "default" and resolve_system_prompt(d) == "default"
    assert resolve_system_prompt(d, "vlaa") == "vlaa"
    assert system_prompt_of("default") is None and system_prompt_of("vlaa") == VLAA_SYSTEM_PROMPT
    assert system_prompt_of("Answer briefly.") == "Answer briefly."
    with pytest.raises(ValueError, match="system prompt ''"):
        system_prompt_of("")
    cfg = json.load(open(f"{d}/preprocessor_config.json"))
    cfg[TRAINED_SYSTEM_PROMPT_KEY] = 3
    (tmp_path / "model" / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="preprocessor_config.json: vlaa_jax_system_prompt must be"):
        resolve_system_prompt(d)
