"""tools/generate.py end to end, in a subprocess, on a tiny-width model with the real Qwen2.5 vocabulary.

The model is saved as an HF checkpoint with the real tokenizer files (data_pipeline.tokenizer), converted
to a vlaa-jax model directory, and the tool's greedy tokens are compared with HF `generate` on inputs
built independently with the HF tokenizer's chat template and the HF image processor.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.fixtures.hf_models import build_hf_model, tiny_hf_config_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653)


@pytest.fixture(scope="module")
def real_vocab_ckpt(tmp_path_factory):
    from data_pipeline.tokenizer import build_qwen25vl_tokenizer
    from vlaa_jax import convert
    cfg = tiny_hf_config_dict(tie_word_embeddings=True)
    cfg["text_config"].update(vocab_size=151936, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    cfg.update(QWEN_IDS)
    hf_dir = str(tmp_path_factory.mktemp("real_vocab_hf"))
    model = build_hf_model(cfg, seed=7)
    model.save_pretrained(hf_dir)
    build_qwen25vl_tokenizer(hf_dir)
    vlaa_dir = str(tmp_path_factory.mktemp("real_vocab_vlaa") / "model")
    convert.convert_hf_to_orbax(hf_dir, vlaa_dir)
    return hf_dir, vlaa_dir, model


def _hf_reference(hf_dir, model, image_path, question, max_new_tokens):
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from data_pipeline.chat import VLAA_SYSTEM_PROMPT
    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg = json.load(open(os.path.join(hf_dir, "preprocessor_config.json")))
    proc = Qwen2VLImageProcessorPil(min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])
    img = proc(images=[Image.open(image_path)], return_tensors="np")
    n = int(np.prod(img["image_grid_thw"])) // 4
    msgs = [{"role": "system", "content": VLAA_SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             mm_token_type_ids=(ids == QWEN_IDS["image_token_id"]).long(),
                             pixel_values=torch.from_numpy(img["pixel_values"]),
                             image_grid_thw=torch.from_numpy(img["image_grid_thw"]),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[151645, 151643],
                             pad_token_id=151643)
    new = out[0, ids.shape[1]:].tolist()
    return new, tok.decode(new, skip_special_tokens=True), ids.shape[1]


def test_generate_tool_matches_hf(real_vocab_ckpt, tmp_path):
    from PIL import Image
    hf_dir, vlaa_dir, model = real_vocab_ckpt
    image = str(tmp_path / "img.png")
    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 256, (90, 130, 3), dtype=np.uint8)).save(image)
    question = "Subtract all balls. How many objects are left?"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate.py"), "--ckpt", vlaa_dir,
                           "--image", image, "--question", question, "--max_new_tokens", "12", "--json"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ids, text, prompt_len = _hf_reference(hf_dir, model, image, question, 12)
    assert got["prompt_tokens"] == prompt_len
    assert got["token_ids"] == ids[:got["num_tokens"]]
    assert got["text"] == text
    stops = [k for k, i in enumerate(ids) if i in (151645, 151643)]
    assert got["num_tokens"] == (stops[0] + 1 if stops else 12) and got["stopped"] == bool(stops)


def test_split_response():
    sys.path.insert(0, REPO)
    from tools.generate import split_response
    assert split_response("<think> a b </think> <answer> 3 </answer>") == ("a b", "3")
    assert split_response("<think>unfinished") == ("unfinished", None)
    assert split_response("plain") == (None, None)
