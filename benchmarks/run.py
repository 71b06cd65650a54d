"""The side-by-side performance suite: every pair, ours vs the stack a user would take instead.

    python benchmarks/run.py [--quick] [--only sft_train_step,generation] [--repeats N]
                             [--out results.json] [--markdown benchmarks/RESULTS.md]

Pairs (each a script in benchmarks/ with `run_pair(quick, repeats)`, run here as a child process so
that JAX's and torch's thread pools and memory do not leak from one pair into the next; inside a
pair, ours and theirs alternate in one process after a warm-up of each, and medians are reported):

  sft_train_step   train_step.py     SFT step (fwd + bwd + AdamW), 3B-shaped shallow model, frozen vision
                                     tower, loss on response tokens, vs HF transformers + torch; plus our
                                     model FLOPs/s against the measured fp32 matmul peak
  generation       generation.py     greedy generation of 64 tokens at batch 8, vs HF `generate`
  grpo_step        grpo_step.py      one GRPO step (rollout n=4, reward, update), tiny model, vs TRL
                                     `GRPOTrainer` (`pip install -e '.[bench]'`)
  rollout          rollout.py        a rollout of long-tailed response lengths: the continuous-batching
                                     engine vs our static sampler (useful tokens/s, slot utilisation)
  data_pipeline    data_pipeline.py  SFT loader examples/s vs the HF processor loop

Prints one JSON object (machine, versions, one row per pair with ours / theirs / ratio / target / met,
and each pair's full details) on stdout, and a plain table on stderr. Exit status 1 if a pair failed
to run (its row then carries the error); a missed target is reported, not an error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAIRS = {"sft_train_step": "train_step.py", "generation": "generation.py", "grpo_step": "grpo_step.py",
         "rollout": "rollout.py", "data_pipeline": "data_pipeline.py"}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version()}


def versions() -> dict:
    from importlib import metadata
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl", "grain"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_one(name: str, quick: bool, repeats: int | None, timeout_s: float) -> dict:
    """Runs one pair script as a child process; its last stdout line is the pair's JSON."""
    cmd = [sys.executable, os.path.join(HERE, PAIRS[name])] + (["--quick"] if quick else [])
    if repeats:
        cmd += ["--repeats", str(repeats)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"pair": name, "error": f"timed out after {timeout_s:.0f} s", "wall_s": round(time.time() - t0, 1)}
    wall = round(time.time() - t0, 1)
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"pair": name, "error": f"exit status {proc.returncode}: {tail}", "wall_s": wall}
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"pair": name, "error": f"last stdout line is not JSON: {lines[-1][:200]}", "wall_s": wall}
    result["wall_s"] = wall
    return result


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def table(rows: list[dict]) -> str:
    head = ["pair", "metric", "ours", "theirs", "ratio", "target", "met", "wall_s"]
    body = [[r["pair"], r.get("metric", r.get("error", "")[:60]), r.get("ours"), r.get("theirs"), r.get("ratio"),
             r.get("target"), r.get("met", "ERROR" if "error" in r else None), r.get("wall_s")] for r in rows]
    cells = [head] + [[_fmt(c) for c in row] for row in body]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"## CPU pairs, {report['date']} ({'quick' if report['quick'] else 'full'} run)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, load average at start {m['loadavg_at_start']}. "
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".", "",
             "| pair | metric | ours | theirs | ratio ours/theirs | target | met |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["pairs"]:
        if "error" in r:
            lines.append(f"| {r['pair']} | ERROR: {r['error'].splitlines()[0][:100]} | | | | | |")
        else:
            lines.append(f"| {r['pair']} | {r['metric']} | {_fmt(r['ours'])} | {_fmt(r['theirs'])} | "
                         f"{_fmt(r['ratio'])} | {r['target']} | {'yes' if r['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats / smaller runs per pair")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(PAIRS)}")
    p.add_argument("--repeats", type=int, default=None, help="repetitions per pair (default: the pair's own)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per pair before it is killed")
    p.add_argument("--out", default="", help="also write the JSON report to this file")
    p.add_argument("--markdown", default="", help="append a dated markdown table to this file (RESULTS.md)")
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(PAIRS)
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        p.error(f"unknown pair(s) {unknown}; known: {list(PAIRS)}")
    report = {"date": datetime.date.today().isoformat(), "quick": a.quick, "machine": machine(),
              "versions": versions(), "pairs": []}
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ({PAIRS[name]}) ...", file=sys.stderr, flush=True)
        r = run_one(name, a.quick, a.repeats, a.timeout)
        report["pairs"].append(r)
        print(f"    {name}: " + (f"ERROR {r['error']}" if "error" in r else
                                 f"ours {_fmt(r['ours'])} theirs {_fmt(r['theirs'])} ratio {_fmt(r['ratio'])} "
                                 f"(target {r['target']}, {'met' if r['met'] else 'missed'})") + f" [{r['wall_s']} s]",
              file=sys.stderr, flush=True)
    report["table"] = [{k: r.get(k) for k in ("pair", "metric", "ours", "theirs", "ratio", "target", "met", "error")}
                       for r in report["pairs"]]
    print(table(report["pairs"]), file=sys.stderr)
    text = json.dumps(report, indent=1, default=str)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if a.markdown:
        with open(a.markdown, "a") as f:
            f.write("\n" + markdown(report))
    print(text)
    if any("error" in r for r in report["pairs"]):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
