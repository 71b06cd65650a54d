"""Realistic model outputs across the five reward types, each with the reward the paper's rules give.

The expected values are written by hand from the rules (paper sec. 4.1 + the documented decisions in
vlaa_jax/rewards/*), not produced by running our code. All cases go through `compute_rewards` in ONE
batch: math cases through real Math-Verify in the process pool, open-ended ones through a scorer.
"""
import math

import numpy as np
import pytest

from vlaa_jax.rewards import CallableScorer, MathVerifyPool, RewardConfig, compute_rewards


def R(answer, think="Let me look at the image carefully and reason step by step."):
    return f"<think>{think}</think> <answer>{answer}</answer>"


GEO_Q = ("As shown in the figure, AB is parallel to CD. If angle 1 = 50°, what is angle 2?\n"
         "Choices:\nA:30°\nB:40°\nC:50°\nD:130°")
ARXIV_Q = ("Which trend does the plot show?\nOptions:\nA) The error decreases exponentially\n"
           "B) The line increases linearly\nC) The curve is periodic\nD) No clear trend")
HW = dict(original_hw=(480, 640), resized_hw=(476, 644))  # (h, w): smart_resize(480, 640) with factor 28
GT_N = "[0.1, 0.2, 0.5, 0.6]"
GT_PX = "[64, 96, 320, 288]"  # the same box in original pixels (640 x 480)
PRED_PX = "[64.4, 95.2, 322.0, 285.6]"  # the same box in resized pixels (644 x 476)
IMG = "docvqa/doc_0001.png"
REF = "a red bus"  # reference answer, 3 words; the test scorer is S = number of words, beta 0.5


def open_r(n_words_pred, n_words_ref=3, beta=0.5):
    d = n_words_pred - n_words_ref
    return 1 - math.exp(-d * beta) if d > 0 else 0.0


CASES = [
    # ---------------------------------------------------------------- digit (CLEVR-Math), gt 3
    ("digit", R("3"), {"gt": "3"}, 1.0),
    ("digit", "<think>5 objects, remove 2 balls.</think>\n<answer> 3 </answer>", {"gt": "3"}, 1.0),
    ("digit", R("**3**"), {"gt": "3"}, 1.0),
    ("digit", R("3.0"), {"gt": "3"}, 1.0),
    ("digit", R("three"), {"gt": "3"}, 1.0),  # documented decision: number words count
    ("digit", R("There are 3 objects left."), {"gt": "3"}, 1.0),
    ("digit", R("\\boxed{3}"), {"gt": "3"}, 1.0),
    ("digit", R("３"), {"gt": "3"}, 1.0),  # full-width digit (unicode NFKC)
    ("digit", R("4"), {"gt": "3"}, 0.0),
    ("digit", R("3 or 4"), {"gt": "3"}, 0.0),
    ("digit", R("3.5"), {"gt": "3"}, 0.0),
    ("digit", R("-3"), {"gt": "3"}, 0.0),
    ("digit", "<think>Count: 3.</think> The answer is 3.", {"gt": "3"}, 0.0),  # missing tags
    ("digit", R("3") + " <answer>3</answer>", {"gt": "3"}, 0.0),  # two answers
    ("digit", "<think>ok</think> <answer>3", {"gt": "3"}, 0.0),  # unclosed tag
    ("digit", R("   "), {"gt": "3"}, 0.0),  # empty answer
    ("digit", "<think>so</think> \\boxed{3}", {"gt": "3"}, 0.0),  # boxed but no tags, fallback off
    ("digit", R("123456789012345678901234567890"), {"gt": "123456789012345678901234567890"}, 1.0),
    ("digit", R("123456789012345678901234567891"), {"gt": "123456789012345678901234567890"}, 0.0),
    ("digit", R("1,000"), {"gt": "1000"}, 1.0),
    ("digit", R("0"), {"gt": "0"}, 1.0),
    # ---------------------------------------------------------------- mcq (GeoQA / ArxivQA)
    ("mcq", R("A"), {"gt": "D", "question": GEO_Q}, 0.0),  # angle 2 = 130 -> gt D; A is wrong
    ("mcq", R("D"), {"gt": "D", "question": GEO_Q}, 1.0),
    ("mcq", R("(d)"), {"gt": "D", "question": GEO_Q}, 1.0),
    ("mcq", R("D)"), {"gt": "D", "question": GEO_Q}, 1.0),
    ("mcq", R("D. 130°"), {"gt": "D", "question": GEO_Q}, 1.0),
    ("mcq", R("Option D"), {"gt": "D", "question": GEO_Q}, 1.0),
    ("mcq", R("The answer is D"), {"gt": "D", "question": GEO_Q}, 1.0),
    ("mcq", R("130°"), {"gt": "D", "question": GEO_Q}, 1.0),  # quotes the option text
    ("mcq", R("50°"), {"gt": "D", "question": GEO_Q}, 0.0),  # text of option C
    ("mcq", R("C. 130°"), {"gt": "D", "question": GEO_Q}, 0.0),  # the label decides
    ("mcq", R("C or D"), {"gt": "D", "question": GEO_Q}, 0.0),
    ("mcq", R("\\boxed{D}"), {"gt": "D", "question": GEO_Q}, 1.0),
    ("mcq", R("**D**"), {"gt": "D", "question": GEO_Q}, 1.0),
    ("mcq", R("Ｄ"), {"gt": "D", "question": GEO_Q}, 1.0),  # full-width letter
    ("mcq", "<think>angle 2 = 180 - 50</think> D", {"gt": "D", "question": GEO_Q}, 0.0),  # no tags
    ("mcq", R("D") + R("C"), {"gt": "D", "question": GEO_Q}, 0.0),  # two answers
    ("mcq", R("B) The line increases linearly"), {"gt": "B", "question": ARXIV_Q}, 1.0),
    ("mcq", R("The line increases linearly."), {"gt": "(B)", "question": ARXIV_Q}, 1.0),
    ("mcq", R("E"), {"gt": "B", "question": ARXIV_Q}, 0.0),
    # ---------------------------------------------------------------- math (Math PUMA), Math-Verify
    ("math", R("\\frac{1}{2}"), {"gt": "0.5"}, 1.0),
    ("math", R("0.5"), {"gt": "\\frac{1}{2}"}, 1.0),
    ("math", R("\\dfrac{\\sqrt{3}}{2}"), {"gt": "\\frac{\\sqrt{3}}{2}"}, 1.0),
    ("math", R("$2\\sqrt{3}$"), {"gt": "\\sqrt{12}"}, 1.0),
    ("math", R("x = 4"), {"gt": "4"}, 1.0),
    ("math", R("5"), {"gt": "4"}, 0.0),
    ("math", R("\\pi"), {"gt": "\\pi"}, 1.0),
    ("math", R("3\\pi"), {"gt": "\\pi"}, 0.0),
    ("math", R("\\boxed{12}"), {"gt": "12"}, 1.0),
    ("math", R("(x+1)^2"), {"gt": "x^2+2x+1"}, 1.0),
    ("math", R("0.333"), {"gt": "\\frac{1}{3}"}, 0.0),  # not equal at Math-Verify's precision
    ("math", R("[0,1)"), {"gt": "[0,1)"}, 1.0),
    ("math", R("−3"), {"gt": "-3"}, 1.0),  # unicode minus
    ("math", R("10^{21}"), {"gt": "1000000000000000000000"}, 1.0),
    ("math", R("100000000000000000001"), {"gt": "100000000000000000000"}, 0.0),
    ("math", R("y = 2x + 1"), {"gt": "2x+1"}, 1.0),
    ("math", R("The area is 12 cm^2"), {"gt": "12"}, 1.0),  # prose around the number
    ("math", R("The area is 13 square units"), {"gt": "12"}, 0.0),
    ("math", "<think>So the area is 12.</think> The area is $12$.", {"gt": "12"}, 0.0),  # no tags
    ("math", R("12") + " <answer>13</answer>", {"gt": "12"}, 0.0),  # two answers
    # ---------------------------------------------------------------- iou (LLaVA-CoT COCO / VG)
    ("iou", R(GT_N), {"gt": GT_N, **HW}, 1.0),
    ("iou", R(PRED_PX), {"gt": GT_N, **HW}, 1.0),  # resized-image pixels vs normalised gt
    ("iou", R("[64, 95, 322, 286]"), {"gt": GT_N, **HW}, 0.16 / ((0.5 - 64 / 644) * (286 / 476 - 95 / 476))),
    ("iou", R("[0.3, 0.2, 0.7, 0.6]"), {"gt": GT_N, **HW}, 1 / 3),  # half overlap
    ("iou", R("[0.6, 0.7, 0.9, 0.9]"), {"gt": GT_N, **HW}, 0.0),  # disjoint
    ("iou", R("[0.5, 0.6, 0.1, 0.2]"), {"gt": GT_N, **HW}, 0.0),  # corners swapped: invalid
    ("iou", R("[0.1, 0.2, 0.1, 0.6]"), {"gt": GT_N, **HW}, 0.0),  # zero width
    ("iou", R('{"bbox_2d": ' + PRED_PX + ', "label": "dog"}'), {"gt": GT_N, **HW}, 1.0),  # Qwen JSON
    ("iou", R("(0.1, 0.2, 0.5, 0.6)"), {"gt": GT_N, **HW}, 1.0),
    ("iou", R("0.1, 0.2, 0.5, 0.6"), {"gt": GT_N, **HW}, 1.0),
    ("iou", R("[0.1, 0.2, 0.5, 0.6] or [0.3, 0.2, 0.7, 0.6]"), {"gt": GT_N, **HW}, 0.0),  # two boxes
    ("iou", R("the dog on the left"), {"gt": GT_N, **HW}, 0.0),
    ("iou", R("[0.1, 0.2, 0.5]"), {"gt": GT_N, **HW}, 0.0),
    ("iou", "<think>the dog</think> [0.1, 0.2, 0.5, 0.6]", {"gt": GT_N, **HW}, 0.0),  # no tags
    ("iou", R(GT_N), {"gt": GT_PX, **HW}, 1.0),  # gt in original pixels, pred normalised
    ("iou", R(PRED_PX), {"gt": GT_PX, **HW}, 1.0),  # both in pixels, different frames
    ("iou", R("[-10, -10, 322.0, 285.6]"), {"gt": GT_N, **HW}, 0.16 / (0.5 * 0.6)),  # clipped to image
    # ---------------------------------------------------------------- open-ended (S = word count)
    ("open_ended", R("a red double decker bus"), {"gt": REF}, open_r(5)),
    ("open_ended", R("bus"), {"gt": REF}, 0.0),
    ("open_ended", R("the red bus"), {"gt": REF}, 0.0),  # S(pred) == S(ref): not better
    ("open_ended", R("un autobus rouge à deux étages"), {"gt": REF}, open_r(6)),
    ("open_ended", "<think>a bus</think> a big red double decker bus", {"gt": REF}, 0.0),  # no tags
    ("open_ended", R("a red bus") + R("a big red double decker bus"), {"gt": REF}, 0.0),
]


def test_enough_cases_of_every_type():
    kinds = [c[0] for c in CASES]
    assert len(CASES) >= 60
    assert all(kinds.count(k) >= 6 for k in ("digit", "mcq", "math", "iou", "open_ended"))


@pytest.fixture(scope="module")
def math_pool():
    with MathVerifyPool(num_workers=2, timeout_s=10.0) as pool:
        yield pool


def test_realistic_cases_one_batch(math_pool):
    responses = [c[1] for c in CASES]
    aliases = {"iou": "bbox", "open_ended": "general"}  # the accepted alternative names, used half the time
    records = [dict(extra, verifier_type=(aliases.get(kind, kind) if k % 2 else kind), id=f"case{k}",
                    question=extra.get("question", "What is shown?"), image=IMG)
               for k, (kind, _, extra, _) in enumerate(CASES)]
    seen = []

    def word_count(image, question, answer):
        seen.append((image, question, answer))
        return float(len(answer.split()))

    cfg = RewardConfig(open_ended_beta=0.5)
    rewards, stats = compute_rewards(responses, records, cfg, scorer=CallableScorer(word_count),
                                     math_pool=math_pool)
    want = np.array([c[3] for c in CASES])
    bad = [(k, CASES[k][0], CASES[k][1][-60:], float(rewards[k]), want[k])
           for k in range(len(CASES)) if abs(rewards[k] - want[k]) > 1e-5]
    assert not bad, bad
    # stats
    for kind in ("digit", "mcq", "math", "iou", "open_ended"):
        sel = [k for k, c in enumerate(CASES) if c[0] == kind]
        assert stats[f"{kind}/count"] == len(sel)
        np.testing.assert_allclose(stats[f"{kind}/mean"], want[sel].mean(), atol=1e-6)
    n_fail = 12  # responses without exactly one non-empty <answer>, counted by hand: 5 + 2 + 2 + 1 + 2
    assert stats["extract_fail"] == n_fail
    assert (stats["digit/extract_fail"], stats["mcq/extract_fail"], stats["math/extract_fail"],
            stats["iou/extract_fail"], stats["open_ended/extract_fail"]) == (5, 2, 2, 1, 2)
    assert stats["math_timeouts"] == 0 and stats["math_errors"] == 0
    # the reference answer is scored once (shared by all open-ended samples of that prompt)
    assert sum(1 for s in seen if s[2] == REF) == 1
    assert all(s[0] == IMG for s in seen)
