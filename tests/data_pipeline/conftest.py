"""Data-pipeline fixtures: the demo dataset (TFDS-built once per session) and the HF reference processor."""
import os
import types

import numpy as np
import pytest
import transformers  # a lazy module: the HF model class (and torch) load on first use

from data_pipeline.demo import make_demo_data
from data_pipeline.tokenizer import load_hf_processor

DEMO_N = 60  # records per split: enough for every reward type, several batches and a hold-out
MIN_PIXELS, MAX_PIXELS = 56 * 56, 128 * 28 * 28


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("demo_data")
    make_demo_data(d, n=DEMO_N, seed=1)
    return os.fspath(d)


@pytest.fixture(scope="session")
def hf_processor(qwen_tokenizer_dir, qwen_tokenizer):
    return load_hf_processor(qwen_tokenizer_dir, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                             tokenizer=qwen_tokenizer)


@pytest.fixture(scope="session")
def demo_cfg(demo_dir) -> dict:
    """Loader config fields for the demo data (TFDS built under demo_dir/tfds on first use)."""
    return dict(source="demo", dir=demo_dir, batch_size=4, max_length=512, max_prompt_length=384,
                min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, seed=3, process_index=0, process_count=1)


@pytest.fixture(scope="session")
def hf_rope_index():
    """HF `Qwen2_5_VLModel.get_rope_index` without building a model (it only reads two config values)."""
    import torch  # test extra, seconds to import: only this HF reference needs it

    Qwen2_5_VLModel = transformers.Qwen2_5_VLModel
    fake = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2)))
    fake.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, fake)

    def rope_index(input_ids, mm_token_type_ids, image_grid_thw, attention_mask):
        pos, deltas = Qwen2_5_VLModel.get_rope_index(
            fake, torch.as_tensor(np.asarray(input_ids, np.int64)), torch.as_tensor(np.asarray(mm_token_type_ids)),
            image_grid_thw=torch.as_tensor(np.asarray(image_grid_thw, np.int64)),
            attention_mask=torch.as_tensor(np.asarray(attention_mask, np.int64)))
        return pos.numpy(), deltas.numpy()

    return rope_index
