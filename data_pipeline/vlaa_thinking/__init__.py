"""TFDS dataset `vlaa_thinking` (configs `sft`, `grpo`) and the image lookup it uses."""
from data_pipeline.vlaa_thinking.images import ImageStore
from data_pipeline.vlaa_thinking.vlaa_thinking import (
    HELDOUT_IDS_FILE,
    VlaaThinking,
    VlaaThinkingConfig,
    build_vlaa_thinking,
)

__all__ = ["HELDOUT_IDS_FILE", "ImageStore", "VlaaThinking", "VlaaThinkingConfig", "build_vlaa_thinking"]
