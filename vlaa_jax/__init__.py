"""vlaa-jax: JAX/Flax training of R1-like reasoning VLMs (VLAA-Thinker SFT and GRPO on Qwen2.5-VL)."""

__version__ = "0.1.0"

from vlaa_jax import quiet as _quiet

_quiet.install()
