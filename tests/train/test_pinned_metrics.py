"""The GRPO step's numbers are pinned: the first 3 steps of two seeded runs give the metrics.jsonl values
recorded in tests/train/pinned/ by the code before the GRPO step was redesigned as typed hand-offs
(commit a51a028). A refactor of the step must not change what it computes.

- grpo_demo.jsonl: `python -m vlaa_jax.main --config configs/grpo.py:demo`, shortened (2 SFT warm-start
  steps, 32 new tokens, no before/after table). Two updates per rollout batch: old-policy log-probs
  recomputed, reference log-probs, adaptive KL controller, the mixed reward (all 0 this early).
- grpo_toy_reward.jsonl: the test trainer (tests/train/runner.py) with a dense toy reward, so advantages,
  the clipped policy-gradient loss and gradient accumulation carry non-zero numbers. Re-recorded on 2 cores
  with the fused log-prob head (dd529bb, which sums the vocabulary in blocks): steps 1-2 equal the old pin
  to 1e-4 in every metric; at step 3 one sampled token flips (reward 0.6227 -> 0.6369), as a change of
  float32 summation order can do to a sample drawn after two updates.
Timing metrics (time/*, tokens_per_s) and the rollout engine's accounting (rollout/*: slot utilisation,
prefill / decode time, added with the continuous engine) are not pinned; the tokens it samples are.
"""
import json
import os

import pytest

from tests.train.helpers import metrics
from tests.train.test_demo import _main

PINNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pinned")
TIMING = ("time/", "tokens_per_s", "rollout/")


def _pinned(name: str) -> list[dict]:
    with open(os.path.join(PINNED, name)) as f:
        return [json.loads(l) for l in f if l.strip()]


def _compare(rows: list[dict], pinned: list[dict], abs_tol: dict[str, float] | None = None) -> None:
    """Every pinned metric to rel 1e-4 / abs 1e-7; `abs_tol` widens the absolute tolerance of named keys."""
    assert [r["step"] for r in rows] == [p["step"] for p in pinned]
    for row, pin in zip(rows, pinned):
        got = {k: v for k, v in row.items() if not k.startswith(TIMING)}
        assert sorted(got) == sorted(pin), f"step {pin['step']}: metric keys differ"
        for key, want in pin.items():
            tol = (abs_tol or {}).get(key, 1e-7)
            assert got[key] == pytest.approx(want, rel=1e-4, abs=tol), f"step {pin['step']} {key}"


# The demo run's rewards are all 0, so its update is the KL term alone: the KL between the policy and its
# bfloat16 reference copy after one or two updates, ~1e-6, where bfloat16 rounding is the signal. XLA CPU
# splits its reductions by thread count: one core gives 2.98e-6 where two give 3.16e-6 (step 2's
# kl_rollout). These keys are pinned to their magnitude; every other metric (tokens, entropy, reward
# counts, loss, gradient norm) stays pinned to 1e-4.
BF16_ROUNDING_LEVEL = {k: 5e-7 for k in ("kl_rollout", "kl", "kl_loss", "approx_kl")}


def test_grpo_demo_first_steps_pinned(demo_data_dir, jax_cache_dir, tmp_path):
    _main("configs/grpo.py:demo", tmp_path, f"--config.data.dir={demo_data_dir}",
          "--config.train.num_steps=3", "--config.warm_start.train.num_steps=2", "--config.grpo.eval_prompts=0",
          "--config.grpo.max_new_tokens=32", "--config.train.export_hf=False",
          "--config.train.progress_bar=False", cache_dir=jax_cache_dir)
    _compare(metrics(tmp_path), _pinned("grpo_demo.jsonl"), abs_tol=BF16_ROUNDING_LEVEL)


# The toy run's policy-gradient loss is a mean of advantage-weighted ratios whose advantages sum to zero per
# group: O(1) terms cancelling to ~5e-4, so float32 summation order shows at ~1e-7 absolute (the fused
# log-prob head, dd529bb, sums the vocabulary in blocks: step 3's 5.5034e-4 -> 5.5024e-4). Pinned to
# that level; tokens, rewards, KL, entropy and gradient norms stay pinned to 1e-4.
CANCELLATION_LEVEL = {k: 5e-7 for k in ("pg_loss", "loss")}


def test_grpo_toy_reward_first_steps_pinned(grpo_toy_run):
    workdir, _ = grpo_toy_run  # `--steps 3 --checkpoint_every 3 --toy_reward` (tests/fixtures/train.py)
    _compare(metrics(workdir), _pinned("grpo_toy_reward.jsonl"), abs_tol=CANCELLATION_LEVEL)
