"""tools/plot_run.py on the logs of a real short GRPO run (and a second, shorter run overlaid)."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from tools import plot_run
from vlaa_jax.eval import plots
from vlaa_jax.eval.behaviour import behaviour_metrics
from vlaa_jax.train.metrics import MetricsWriter


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_panels_from_real_grpo_run(grpo_demo_run, tmp_path):
    rows = _rows(os.path.join(grpo_demo_run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    keys = set().union(*rows)
    types = sorted(k.split("/", 1)[1] for k in keys if k.startswith("reward/"))
    assert types and {"reward", "response_length", "kl"} <= keys  # what the trainer logs
    assert os.path.getsize(os.path.join(grpo_demo_run, "samples.jsonl")) > 0
    # A second, shorter run: the first logged step of the same run.
    short = tmp_path / "short_run"
    short.mkdir()
    with open(os.path.join(grpo_demo_run, "metrics.jsonl")) as f:
        (short / "metrics.jsonl").write_text(f.readline())
    png = tmp_path / "cmp.png"
    out = plot_run.main(["--workdir", grpo_demo_run, "--workdir", str(short), "--label", "sft-init",
                         "--label", "base-init", "--out", str(png)])
    expected = (["reward (all)"] + [f"reward: {t}" for t in types]
                + ["response length (tokens)", "KL", "reflection-word rate"])
    assert out["panels"] == expected
    rows_of_panels = -(-len(expected) // 3)
    assert out["grid"] == [rows_of_panels, 3]
    with Image.open(png) as im:  # 4.2 x 3.0 inches per panel at 100 dpi
        assert im.size == (1260, 300 * rows_of_panels)
    # both runs drawn where both logged the metric (the trainer logs the rollouts' reflection rate)
    first = rows[0]
    assert "behaviour/reflection_rate" in first
    for title in expected:
        key = {"reward (all)": "reward", "response length (tokens)": "response_length", "KL": "kl",
               "reflection-word rate": "behaviour/reflection_rate"}.get(title, "reward/" + title.split(": ", 1)[-1])
        want = 1 + (key in first)
        assert out["lines"][title] == want, title


def test_logged_reflection_rate_wins_and_bad_workdir(tmp_path):
    w = MetricsWriter(str(tmp_path / "run"), total_steps=2, progress_bar=False)
    for step, texts in ((1, ["<answer>1</answer>", "Wait, <answer>2</answer>"]), (2, ["hmm", "again"])):
        w.write_scalars(step, {"reward": 0.5, "kl": float("nan"), **behaviour_metrics(texts)})
    w.close()
    series = plots.read_metrics(str(tmp_path / "run"))
    assert series["behaviour/reflection_rate"] == [(1, 0.5), (2, 1.0)]
    assert "kl" not in series  # non-finite values (logged as strings) are skipped
    out = plots.plot([str(tmp_path / "run")], str(tmp_path / "p.png"))
    assert out["panels"] == ["reward (all)", "response length (tokens)", "reflection-word rate"]
    with pytest.raises(FileNotFoundError, match="nowhere/metrics.jsonl"):
        plots.read_metrics(str(tmp_path / "nowhere"))


def test_reflection_rate_from_samples_when_not_logged(tmp_path):
    """Runs from before the trainer logged behaviour metrics: the rate comes from samples.jsonl."""
    run = tmp_path / "old_run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.1 * s}) + "\n" for s in (1, 2)))
    samples = [(1, "Wait, let me check. <answer>3</answer>"), (1, "<answer>4</answer>"),
               (2, "Hmm. <answer>5</answer>"), (2, "Alternatively <answer>6</answer>")]
    (run / "samples.jsonl").write_text("".join(json.dumps({"step": s, "response": r}) + "\n" for s, r in samples))
    assert plots.reflection_from_samples(str(run)) == [(1, 0.5), (2, 1.0)]
    out = plots.plot([str(run)], str(tmp_path / "p.png"))
    assert out["panels"] == ["reward (all)", "reflection-word rate"] and out["lines"]["reflection-word rate"] == 1
