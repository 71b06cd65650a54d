"""Data-pipeline fixtures: the demo dataset (TFDS-built once per session) and the HF reference processor."""
import os

import pytest

DEMO_N = 60  # records per split: enough for every reward type, several batches and a hold-out
MIN_PIXELS, MAX_PIXELS = 56 * 56, 128 * 28 * 28


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    from data_pipeline.demo import make_demo_data

    d = tmp_path_factory.mktemp("demo_data")
    make_demo_data(d, n=DEMO_N, seed=1)
    return os.fspath(d)


@pytest.fixture(scope="session")
def hf_processor(qwen_tokenizer_dir):
    from data_pipeline.tokenizer import load_hf_processor

    return load_hf_processor(qwen_tokenizer_dir, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="session")
def demo_cfg(demo_dir) -> dict:
    """Loader config fields for the demo data (TFDS built under demo_dir/tfds on first use)."""
    return dict(source="demo", dir=demo_dir, batch_size=4, max_length=512, max_prompt_length=384,
                min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, seed=3, process_index=0, process_count=1)
