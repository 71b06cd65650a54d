"""TFDS dataset `vlaa_thinking` (configs `sft`, `grpo`) and the image lookup it uses."""
from data_pipeline.vlaa_thinking.images import ImageStore
from data_pipeline.vlaa_thinking.vlaa_thinking import VlaaThinking, VlaaThinkingConfig, build_vlaa_thinking

__all__ = ["ImageStore", "VlaaThinking", "VlaaThinkingConfig", "build_vlaa_thinking"]
