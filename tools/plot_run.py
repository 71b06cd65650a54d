"""PNG plots of training runs over steps, several runs overlaid (e.g. SFT-initialised vs base GRPO).

    python tools/plot_run.py --workdir RUN_A [--workdir RUN_B ...] [--label A --label B] [--out FILE.png]

Reads each workdir's `metrics.jsonl` (vlaa_jax/train/metrics.py: one JSON object per logged step).
Panels, in this order, each drawn when at least one run logged it:
  reward (all)                 `reward`
  reward: <type>               `reward/<type>` for every verifier type any run logged
  response length              `response_length` (tokens), else `behaviour/length_mean`
  KL                           `kl` (policy vs reference, per token), else `kl_rollout`, else `approx_kl`
  reflection-word rate         `behaviour/reflection_rate` (vlaa_jax.eval.behaviour); when a run did not
                               log it, computed from its `samples.jsonl` (the few rollouts logged per step)
Non-finite values (written as strings) are skipped. Panels sit `--ncols` to a row. Prints one JSON
line: {"png", "panels" (titles in order), "runs" (labels), "lines" (curves per panel), "grid" [rows, cols]}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from vlaa_jax.eval.plots import plot  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", action="append", required=True, help="training workdir (repeat to overlay runs)")
    p.add_argument("--label", action="append", default=None, help="legend label per workdir (default: dir name)")
    p.add_argument("--out", default="", help="PNG path (default: FIRST_WORKDIR/plots/run.png)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA factor in [0, 1) applied to every curve")
    p.add_argument("--ncols", type=int, default=3, help="panels per row")
    a = p.parse_args(argv)
    if not 0.0 <= a.smooth < 1.0:
        p.error("--smooth must lie in [0, 1)")
    out = a.out or os.path.join(a.workdir[0], "plots", "run.png")
    result = plot(a.workdir, out, a.label, a.smooth, a.ncols)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
