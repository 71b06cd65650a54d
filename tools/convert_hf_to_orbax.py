"""Convert an HF Qwen2.5-VL or Qwen2-VL checkpoint (the family from its config.json) into a vlaa-jax model
directory (Orbax weights + config + tokenizer).

    python tools/convert_hf_to_orbax.py --hf_dir Qwen2.5-VL-3B-Instruct --out ckpt/qwen3b [--dtype bfloat16]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import cli  # noqa: E402
from vlaa_jax import convert  # noqa: E402


def main(argv=None) -> int:
    args = convert.main_args(argv, __doc__, [
        ("--hf_dir", dict(required=True, help="HF directory: config.json + model.safetensors(.index.json)")),
        ("--out", dict(required=True, help="output vlaa-jax model directory (must not hold params/ yet)")),
        ("--dtype", dict(default=None, choices=sorted(convert.DTYPES) + ["keep"],
                         help="cast weights to this dtype (default: keep each tensor's dtype)")),
    ])
    with cli.user_errors():
        return convert.run_tool(convert.convert_hf_to_orbax, args.hf_dir, args.out, dtype=args.dtype)


if __name__ == "__main__":
    sys.exit(main())
