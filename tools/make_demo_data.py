"""Write a small VLAA-Thinking-shaped demo dataset (released layout, five reward types).

    python tools/make_demo_data.py --out DIR [--n 200] [--seed 0] [--tasks visual|reasoning]

See data_pipeline/demo.py for the layout and the tasks; `DIR/heldout_ids.txt` lists the held-out ids.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
import json

from data_pipeline.demo import TASK_SETS, make_demo_data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (a local 'dataset repository')")
    p.add_argument("--n", type=int, default=200, help="records per split (SFT and GRPO)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="visual", choices=sorted(TASK_SETS),
                   help="visual: colours, counts, positions (the demo presets'); reasoning: VLAA-Thinking-like")
    p.add_argument("--heldout_every", type=int, default=10, help="hold out every k-th record (0: none)")
    a = p.parse_args(argv)
    print(json.dumps(make_demo_data(a.out, n=a.n, seed=a.seed, heldout_every=a.heldout_every,
                                     tasks=a.tasks)))


if __name__ == "__main__":
    main()
