"""SFT / GRPO examples against the HF Qwen2_5_VLProcessor (chat template + image expansion) and tokenizer."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.chat import ChatFormatter
from data_pipeline.image import preprocess_image
from data_pipeline.records import SPLIT_FILES, read_records

from .conftest import MAX_PIXELS, MIN_PIXELS


def _demo_records(demo_dir, split):
    recs = read_records(Path(demo_dir) / SPLIT_FILES[split][0], split=split)
    images = {}
    for arch in (Path(demo_dir) / "images").glob("*.tar.gz"):
        with tarfile.open(arch) as tf:
            for m in tf.getmembers():
                images[m.name] = tf.extractfile(m).read()
    return [(r, Image.open(io.BytesIO(images[r.image]))) for r in recs[:15]]


@pytest.mark.parametrize("system_prompt", ["default", None])
def test_grpo_prompts_match_hf_processor(qwen_tokenizer_dir, hf_processor, demo_dir, system_prompt):
    kw = {} if system_prompt == "default" else {"system_prompt": system_prompt}
    fmt = ChatFormatter.create(qwen_tokenizer_dir, **kw)
    for rec, img in _demo_records(demo_dir, "grpo"):
        feats = preprocess_image(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        ids = fmt.encode_prompt(rec, feats.num_tokens)
        text = hf_processor.apply_chat_template(fmt.messages(rec.question), tokenize=False, add_generation_prompt=True)
        ref = hf_processor(text=[text], images=[img], return_tensors="np")
        np.testing.assert_array_equal(ids, ref["input_ids"][0])
        np.testing.assert_array_equal(feats.image_grid_thw, ref["image_grid_thw"])
        np.testing.assert_allclose(feats.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)


def test_sft_examples_match_hf_processor(qwen_tokenizer_dir, qwen_tokenizer, hf_processor, demo_dir):
    fmt = ChatFormatter.create(qwen_tokenizer_dir)
    for rec, img in _demo_records(demo_dir, "sft"):
        feats = preprocess_image(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        ids, mask = fmt.encode_sft(rec, feats.num_tokens)
        msgs = fmt.messages(rec.question) + [{"role": "assistant", "content": rec.response}]
        text = hf_processor.apply_chat_template(msgs, tokenize=False)
        ref = hf_processor(text=[text], images=[img], return_tensors="np")
        np.testing.assert_array_equal(ids, ref["input_ids"][0])
        # The loss covers exactly the response and the <|im_end|> closing it.
        assert qwen_tokenizer.decode(ids[mask == 1]) == rec.response + "<|im_end|>"
        assert mask.sum() == len(qwen_tokenizer(rec.response + "<|im_end|>")["input_ids"])
        assert np.all(np.diff(np.flatnonzero(mask)) == 1)  # one contiguous span


def test_formatter_without_transformers_equals_hf_rendering(qwen_tokenizer_dir, qwen_tokenizer):
    for sp in ["You are VL-Thinking.", None, ""]:
        assert ChatFormatter.create(qwen_tokenizer_dir, sp) == ChatFormatter.create(qwen_tokenizer_dir, sp,
                                                                                   tokenizer=qwen_tokenizer)
