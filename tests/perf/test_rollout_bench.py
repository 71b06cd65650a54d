"""benchmarks/rollout.py draws the issue's length distribution (median ~350, ~10% at the 1,024 cap, mean
~437) and the static sampler's expected utilisation from it is the issue's ~43%."""
import numpy as np

from benchmarks.rollout import response_lengths


def test_lengths_follow_the_issue_fit():
    x = response_lengths(20000, median=350, cap=1024, cap_fraction=0.10, scale=1.0, seed=0)
    assert abs(np.median(x) - 350) < 10
    assert abs(np.mean(x >= 1024) - 0.10) < 0.01
    assert abs(x.mean() - 437) < 10
    assert abs(x.mean() / 1024 - 0.427) < 0.01     # static decode slots doing real work: mean / cap
    small = response_lengths(20000, median=350, cap=1024, cap_fraction=0.10, scale=0.125, seed=0)
    assert small.max() == 128 and abs(np.mean(small == 128) - 0.10) < 0.01
