"""Reasoning-behaviour metrics on hand-counted responses (the paper's reflection words, tag validity,
accuracy vs length). Every expected number below is counted by hand from the texts."""
from __future__ import annotations

import math

import pytest

from vlaa_jax.eval.behaviour import (REFLECTION_WORDS, accuracy_by_length, answer_tag_valid, behaviour_metrics,
                                     format_valid, reflection_counts)

# (response, {word: count}, answer_tag_valid, format_valid)
RESPONSES = [
    ("<think>Let me count. Wait, I should confirm the red ones. Hmm, 3 red. Let me double-check: yes.</think>"
     "<answer>3</answer>", {"wait": 1, "i should confirm": 1, "hmm": 1, "double-check": 1}, True, True),
    ("<think>The angle is 90. Checking again: 180-45-45 = 90. Check.</think>\n<answer>C</answer>",
     {"again": 1, "check": 1}, True, True),                     # "Checking" is not the word "check"
    ("<think>I made a mistake earlier. Alternatively, use the Pythagorean theorem.</think> <answer>5</answer>",
     {"mistake": 1, "alternatively": 1}, True, True),
    ("The answer is B.", {}, False, False),
    ("<answer>2</answer>", {}, True, False),                    # no thinking: tag valid, format not
    ("<think>awaiting the checkmate; hmmm</think><answer>x</answer><answer>y</answer>", {}, False, False),
    ("WAIT. Double check AGAIN.", {"wait": 1, "double-check": 1, "again": 1}, False, False),
]
LENGTHS = [10, 20, 30, 40, 50, 60, 70]
CORRECT = [True, True, False, False, True, False, True]


@pytest.mark.parametrize("k", range(len(RESPONSES)))
def test_per_response(k):
    text, words, tag_ok, fmt_ok = RESPONSES[k]
    assert reflection_counts(text) == {w: words.get(w, 0) for w in REFLECTION_WORDS}
    assert answer_tag_valid(text) is tag_ok
    assert format_valid(text) is fmt_ok


def test_behaviour_metrics_flat_scalars():
    m = behaviour_metrics([r[0] for r in RESPONSES], lengths=LENGTHS, correct=CORRECT)
    p = "behaviour/"
    assert m[p + "length_mean"] == 40 and m[p + "length_median"] == 40 and m[p + "length_max"] == 70
    assert m[p + "reflection_rate"] == pytest.approx(4 / 7)          # responses 1, 2, 3, 7
    assert m[p + "reflections_per_response"] == pytest.approx((4 + 2 + 2 + 3) / 7)
    assert m[p + "reflect/wait"] == pytest.approx(2 / 7) and m[p + "reflect/check"] == pytest.approx(1 / 7)
    assert m[p + "answer_tag_valid"] == pytest.approx(4 / 7) and m[p + "format_valid"] == pytest.approx(3 / 7)
    assert m[p + "accuracy"] == pytest.approx(4 / 7)
    assert m[p + "accuracy_reflective"] == pytest.approx(3 / 4)      # 1, 2, 7 right; 3 wrong
    assert m[p + "accuracy_nonreflective"] == pytest.approx(1 / 3)   # 5 right; 4, 6 wrong
    assert m[p + "length_correct"] == pytest.approx((10 + 20 + 50 + 70) / 4)
    # quartile edges of 10..70: 25, 40, 55; an edge value goes to the lower bin:
    # q0 {10, 20}: 2/2, q1 {30, 40}: 0/2, q2 {50}: 1/1, q3 {60, 70}: 1/2
    assert [m[p + f"accuracy_len_q{k}"] for k in range(4)] == [1.0, 0.0, 1.0, 0.5]
    assert all(isinstance(v, float) for v in m.values())


def test_words_when_no_lengths_and_empty_groups():
    m = behaviour_metrics(["one two three", "<think>a</think><answer>b</answer>"], correct=[True, True], prefix="")
    assert m["length_mean"] == 2.0                      # 3 and 1 whitespace words
    assert math.isnan(m["accuracy_reflective"]) and m["accuracy_nonreflective"] == 1.0
    assert behaviour_metrics([]) == {}
    with pytest.raises(ValueError, match="3 responses, 2 lengths"):
        behaviour_metrics(["a", "b", "c"], lengths=[1, 2])


def test_accuracy_by_length_rows():
    rows = accuracy_by_length([5, 5, 5, 5], [1, 0, 1, 1], num_bins=4)
    assert rows == [{"bin": 0, "min_length": 5.0, "max_length": 5.0, "n": 4, "accuracy": 0.75}]
