"""benchmarks/grpo_step.py: which model cases a run takes, the headline row and every case's own row (the
cases themselves run TRL and the 3B-shaped model: minutes, so `run_case` is replaced here)."""
from __future__ import annotations

import pytest

from benchmarks import grpo_step


def _fake_case(calls):
    def run_case(name, quick, repeats, prompts, new_tokens, reward_model=False):
        calls.append((name, quick, repeats, prompts, new_tokens))
        ratio = {"tiny": 0.2, "qwen3b_shaped": 0.5}[name]
        return {"model": name, "ours": ratio, "theirs": 1.0, "ratio": ratio, "target": "<= 0.33",
                "met": ratio <= 0.33, "peer": "TRL", "new_tokens": new_tokens or 64, "repeats": repeats or 3,
                "wall_s": 1.0}
    return run_case


def test_cases_headline_and_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(grpo_step, "run_case", _fake_case(calls))
    full = grpo_step.run_pair()
    # The full run: both cases, the one with a child process per side first (this process holds no model yet).
    assert [c[0] for c in calls] == ["qwen3b_shaped", "tiny"]
    assert full["ratio"] == 0.2 and full["met"] is True and full["details"]["headline"] == "tiny"
    assert [(r["model"], r["ratio"], r["met"]) for r in full["details"]["summary"]] == [
        ("tiny", 0.2, True), ("qwen3b_shaped", 0.5, False)]
    assert full["details"]["all_met"] is False and "tiny model" in full["metric"]
    calls.clear()
    quick = grpo_step.run_pair(quick=True)
    assert [c[0] for c in calls] == ["tiny"] and quick["details"]["quick"] is True   # --quick stays quick
    calls.clear()
    grpo_step.run_pair(quick=True, models=("qwen3b_shaped",), repeats=2, new_tokens=16)
    assert calls == [("qwen3b_shaped", True, 2, 2, 16)]
    with pytest.raises(ValueError, match="unknown model case"):
        grpo_step.run_pair(models=("tiny", "qwen7b"))


def test_step_counts_line_up():
    """Ours: the compiling steps, then one step beside each TRL step (its warm-up included)."""
    s = grpo_step.Setup("/x", prompts=2, new_tokens=64, repeats=3)
    assert s.trl_steps == 4 and s.ours_steps == grpo_step.OURS_WARMUP + 4
    assert grpo_step.CASES["qwen3b_shaped"].sequential and not grpo_step.CASES["tiny"].sequential
