"""Export a vlaa-jax model directory to an HF directory that transformers loads.

    python tools/export_to_hf.py --ckpt ckpt/qwen3b --out hf_out [--max_shard_size 5GB] [--dtype bfloat16]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import cli  # noqa: E402
from vlaa_jax import convert  # noqa: E402


def main(argv=None) -> int:
    args = convert.main_args(argv, __doc__, [
        ("--ckpt", dict(required=True, help="vlaa-jax model directory (config.json + params/)")),
        ("--out", dict(required=True, help="output HF directory")),
        ("--max_shard_size", dict(default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")),
        ("--dtype", dict(default=None, choices=sorted(convert.DTYPES) + ["keep"],
                         help="cast weights to this dtype (default: keep)")),
    ])
    with cli.user_errors():
        return convert.run_tool(convert.export_to_hf, args.ckpt, args.out, max_shard_size=args.max_shard_size,
                                dtype=args.dtype)


if __name__ == "__main__":
    sys.exit(main())
