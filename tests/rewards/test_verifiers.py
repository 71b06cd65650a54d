"""Extraction rules, per-verifier edge cases, frames, errors, and the Math-Verify timeout."""
import time

import numpy as np
import pytest

from vlaa_jax.rewards import (MathVerifyPool, RewardConfig, compute_rewards, extract_answer, iou_reward,
                              last_boxed, mcq_reward, open_ended_reward, parse_box, parse_options)


def test_extract_answer_rules():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    assert extract_answer("<answer>a</answer><answer>b</answer>") is None  # two answers
    assert extract_answer("<answer>a</answer> then <answer>") is None     # stray tag
    assert extract_answer("</answer>a<answer>") is None                   # reversed
    assert extract_answer("<answer></answer>") is None                    # empty
    assert extract_answer("no tags \\boxed{7}") is None                   # fallback off by default
    assert extract_answer("no tags \\boxed{7} then \\boxed{\\frac{1}{2}}", fallback_boxed=True) == "\\frac{1}{2}"
    # the fallback applies only when there is no tag at all
    assert extract_answer("<answer>1</answer><answer>2</answer> \\boxed{3}", fallback_boxed=True) is None
    assert extract_answer("<answer>\n line1\n line2 </answer>") == "line1\n line2"
    assert last_boxed("\\boxed{a{b}c} and \\boxed{unclosed") == "a{b}c"
    with pytest.raises(TypeError):
        extract_answer(None)


def test_fallback_boxed_through_compute_rewards():
    rec = [{"verifier_type": "digit", "gt": "7"}]
    resp = ["<think>...</think> so the count is \\boxed{7}"]
    assert compute_rewards(resp, rec, RewardConfig())[0][0] == 0.0
    r, stats = compute_rewards(resp, rec, RewardConfig(answer_fallback_boxed=True))
    assert r[0] == 1.0 and stats["extract_fail"] == 0


def test_mcq_options_from_field_and_lowercase():
    assert parse_options("Q?\n(A) cat\n(B) dog") == {"A": "cat", "B": "dog"}
    assert parse_options("no options here") == {}
    assert mcq_reward("dog", "B", options=["cat", "dog", "bird"]) == 1.0
    assert mcq_reward("b", "B", options={"A": "cat", "B": "dog"}) == 1.0
    assert mcq_reward("Answer: (B)", "B") == 1.0  # no options known: the label alone
    assert mcq_reward("A, C", "A") == 0.0


def test_iou_frames_and_errors():
    gt = [0.1, 0.2, 0.5, 0.6]
    # forcing the prediction frame: the same numbers mean different boxes
    assert iou_reward("[0.1, 0.2, 0.5, 0.6]", gt, pred_frame="normalized") == 1.0
    hw = dict(original_hw=(100, 200), resized_hw=(112, 196))
    assert iou_reward("[20, 20, 100, 60]", gt, pred_frame="original_pixels", **hw) == pytest.approx(1.0)
    assert iou_reward("[19.6, 22.4, 98, 67.2]", gt, **hw) == pytest.approx(1.0)  # auto -> resized pixels
    assert iou_reward("[1, 1, 1, 1]", gt, **hw) == 0.0  # all in [0, 1] -> normalised, zero-area
    with pytest.raises(ValueError, match="image size is unknown"):
        iou_reward("[20, 20, 100, 60]", gt)  # pixel box without sizes
    with pytest.raises(ValueError, match="not a box"):
        iou_reward("[0.1, 0.2, 0.5, 0.6]", "the cat")
    assert parse_box("[nan, 1, 2, 3]") is None
    assert parse_box("[1e1, 2e1, 3e1, 4e1]") == (10.0, 20.0, 30.0, 40.0)


def test_open_ended_formula():
    assert open_ended_reward(2.0, 1.0, beta=1.0) == pytest.approx(1 - np.exp(-1.0))
    assert open_ended_reward(1.0, 2.0) == 0.0 and open_ended_reward(1.0, 1.0) == 0.0
    assert open_ended_reward(float("nan"), 0.0) == 0.0
    with pytest.raises(ValueError, match="beta"):
        open_ended_reward(1.0, 0.0, beta=0.0)


def test_open_ended_without_scorer_is_zero_and_counted():
    r, stats = compute_rewards(["<answer>a long answer</answer>"],
                               [{"verifier_type": "open", "gt": "ref", "question": "q"}])
    assert r[0] == 0.0 and stats["open_ended_unscored"] == 1


def test_errors_name_the_record():
    with pytest.raises(ValueError, match=r"record 1 \(id='r-7'\).*unknown verifier_type 'ocr'"):
        compute_rewards(["<answer>1</answer>"] * 2,
                        [{"verifier_type": "digit", "gt": "1"}, {"id": "r-7", "verifier_type": "ocr", "gt": "1"}])
    with pytest.raises(ValueError, match=r"record 0.*missing ground truth"):
        compute_rewards(["<answer>1</answer>"], [{"verifier_type": "digit", "gt": " "}])
    with pytest.raises(ValueError, match=r"record 0 \(id='x'\) \(digit\).*one number"):
        compute_rewards(["<answer>1</answer>"], [{"id": "x", "verifier_type": "digit", "gt": "1 or 2"}])
    with pytest.raises(ValueError, match=r"record 0 \(id='b'\) \(iou\).*image size"):
        compute_rewards(["<answer>[10, 10, 50, 50]</answer>"], [{"id": "b", "verifier_type": "iou", "gt": "[0, 0, 1, 1]"}])
    with pytest.raises(ValueError, match="2 responses but 1 records"):
        compute_rewards(["a", "b"], [{"verifier_type": "digit", "gt": "1"}])
    with pytest.raises(ValueError, match="unknown reward config keys"):
        RewardConfig.from_config({"math_timeout": 3})


def test_records_as_objects_and_image_hw_argument():
    from data_pipeline.records import parse_record
    rec = parse_record({"id": "v1", "image": "vg/VG_100K/1.jpg", "question": "Where is the dog?",
                        "gt": [0.1, 0.2, 0.5, 0.6], "verifier_type": "bbox"})
    r, _ = compute_rewards(["<answer>[64.4, 95.2, 322.0, 285.6]</answer>"], [rec],
                           image_hw=[((480, 640), (476, 644))])
    assert r[0] == pytest.approx(1.0)


def test_math_timeout_cuts_off_a_hanging_input():
    """9^{9^{9^{9}}} makes sympy compute a number with ~10^8 digits-of-digits: without a hard limit
    verify() never returns. With a 1 s limit the item scores 0, is counted, and the pool keeps working."""
    with MathVerifyPool(num_workers=2, timeout_s=1.0) as pool:
        pool.verify([("1", "1")])  # start the workers outside the timed part
        t0 = time.monotonic()
        res = pool.verify([("9^{9^{9^{9}}}", "1"), ("\\frac{1}{2}", "0.5"), ("2", "3")])
        wall = time.monotonic() - t0
        assert res[0].timed_out and res[0].score == 0.0
        assert res[1].score == 1.0 and not res[1].timed_out
        assert res[2].score == 0.0 and not res[2].timed_out
        assert wall < 4.0, wall
        # the killed worker was replaced
        assert [r.score for r in pool.verify([("3", "3"), ("4", "4"), ("5", "6")])] == [1.0, 1.0, 0.0]

        r, stats = compute_rewards(["<answer>9^{9^{9^{9}}}</answer>", "<answer>4</answer>"],
                                   [{"verifier_type": "math", "gt": "1"}, {"verifier_type": "math", "gt": "4"}],
                                   math_pool=pool)
        assert list(r) == [0.0, 1.0] and stats["math_timeouts"] == 1


def test_math_unparseable_ground_truth_is_an_error_not_a_crash():
    with MathVerifyPool(num_workers=1, timeout_s=5.0) as pool:
        res = pool.verify([("1", "")])
        assert res[0].score == 0.0 and res[0].error and "ground truth" in res[0].error
