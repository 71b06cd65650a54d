"""Plots of training runs over steps, several runs overlaid (tools/plot_run.py is the command line; the
main job draws its own run into WORKDIR/runs.png). Panels and the metrics they read: tools/plot_run.py."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any, Sequence

LENGTH_KEYS = ("response_length", "behaviour/length_mean")
KL_KEYS = ("kl", "kl_rollout", "approx_kl")
REFLECTION_KEY = "behaviour/reflection_rate"


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def read_metrics(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(step, value)] of a workdir's metrics.jsonl (finite values only)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (is {workdir} a training workdir?)")
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None
            if "step" not in row:
                raise ValueError(f"{path}: line {n} has no 'step'")
            for k, v in row.items():
                x = _float(v)
                if k != "step" and math.isfinite(x):
                    series[k].append((int(row["step"]), x))
    return dict(series)


def reflection_from_samples(workdir: str) -> list[tuple[int, float]]:
    """Per-step share of logged rollouts (samples.jsonl) with a reflection word."""
    from vlaa_jax.eval.behaviour import has_reflection
    path = os.path.join(workdir, "samples.jsonl")
    if not os.path.isfile(path):
        return []
    per_step: dict[int, list[bool]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if "response" in row and "step" in row:
                    per_step[int(row["step"])].append(has_reflection(str(row["response"])))
    return [(s, sum(v) / len(v)) for s, v in sorted(per_step.items())]


def panels_for(runs: Sequence[dict[str, list]], extra_reflection: Sequence[list]) -> list[tuple[str, list]]:
    """[(title, [series of each run or None])] of the panels to draw (see the module docstring)."""
    first = lambda m, keys: next((m[k] for k in keys if m.get(k)), None)  # noqa: E731
    out = []
    if any(m.get("reward") for m in runs):
        out.append(("reward (all)", [m.get("reward") for m in runs]))
    types = sorted({k.split("/", 1)[1] for m in runs for k in m if k.startswith("reward/") and k != "reward/all"})
    for t in types:
        out.append((f"reward: {t}", [m.get(f"reward/{t}") for m in runs]))
    for title, keys in (("response length (tokens)", LENGTH_KEYS), ("KL", KL_KEYS)):
        series = [first(m, keys) for m in runs]
        if any(series):
            out.append((title, series))
    refl = [m.get(REFLECTION_KEY) or extra or None for m, extra in zip(runs, extra_reflection)]
    if any(refl):
        out.append(("reflection-word rate", refl))
    return out


def _smooth(ys: list[float], alpha: float) -> list[float]:
    if not alpha:
        return ys
    out, acc = [], None
    for y in ys:
        acc = y if acc is None else alpha * acc + (1 - alpha) * y
        out.append(acc)
    return out


def plot(workdirs: Sequence[str], out: str, labels: Sequence[str] | None = None, smooth: float = 0.0,
         ncols: int = 3) -> dict[str, Any]:
    """Draws the panels of `workdirs` into the PNG `out`; returns {"png", "panels", "runs"}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(labels) != len(workdirs):
        raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
    runs = [read_metrics(w) for w in workdirs]
    extra = [[] if m.get(REFLECTION_KEY) else reflection_from_samples(w) for m, w in zip(runs, workdirs)]
    panels = panels_for(runs, extra)
    if not panels:
        raise ValueError(f"no plottable metrics (reward, reward/<type>, {LENGTH_KEYS[0]}, kl, "
                         f"{REFLECTION_KEY}) in {list(workdirs)}")
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    lines = {}
    all_steps = [st for _, series in panels for s in series if s for st, _ in s]
    lo, hi = min(all_steps), max(all_steps)
    pad = max(0.5, 0.02 * (hi - lo))  # one step axis for every panel
    for ax, (title, series) in zip(axes.flat, panels):
        for label, s in zip(labels, series):
            if s:
                steps, ys = zip(*sorted(s))
                ax.plot(steps, _smooth(list(ys), smooth), label=label, marker="." if len(steps) < 30 else None)
        lines[title] = len(ax.get_lines())
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_xlim(lo - pad, hi + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"png": os.path.abspath(out), "panels": [t for t, _ in panels], "runs": labels, "lines": lines,
            "grid": [nrows, ncols]}
