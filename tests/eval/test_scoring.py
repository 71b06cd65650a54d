"""Answer extraction (VLMEvalKit rule) and scoring on a table of realistic model outputs.

Expected values come from the rules (eval_answer: one <answer> pair, else the raw text; the reward
module's verifiers: option letters / texts, numbers, Math-Verify equivalence, IoU; MathVista's
rounding to `precision`), worked out by hand for each row; Math-Verify itself runs for real.
"""
from __future__ import annotations

import math

import pytest

from vlaa_jax.eval.benchmarks import BytesImage, EvalItem
from vlaa_jax.eval.scoring import Judge, eval_answer, tables

EXTRACT = [
    ("<think>The triangle's angles sum to 180.</think>\n<answer>C</answer>", "C"),
    ("<think>Count them.</think> <answer> 42 </answer>", "42"),
    ("The answer is 42.", "The answer is 42."),                                       # no tag: raw text
    ("  B  ", "B"),
    ("<answer>3</answer> Wait, no. <answer>4</answer>", "<answer>3</answer> Wait, no. <answer>4</answer>"),
    ("<think>hmm</think><answer></answer>", "<think>hmm</think><answer></answer>"),  # empty answer
    ("<think>so 5</think><answer>5", "<think>so 5</think><answer>5"),                # unclosed
    ("</answer>5<answer>", "</answer>5<answer>"),                                      # tags reversed
]


@pytest.mark.parametrize("response,expected", EXTRACT)
def test_eval_answer(response, expected):
    assert eval_answer(response) == expected


def _item(i, vtype, answer, source, qtype, options=None, answer_type="", precision=None, question="Q?"):
    return EvalItem(id=str(i), question=question, answer=answer, verifier_type=vtype,
                    image=BytesImage(b"", "x"), source=source, question_type=qtype, options=options,
                    answer_type=answer_type, precision=precision)


OPTS = {"A": "30", "B": "60", "C": "90", "D": "120"}
# (verifier_type, ground truth, response, expected score, expected correct, source, extra item fields)
CASES = [
    # multiple choice (MathVista / GeoQA style); ground truth letter C = "90"
    ("mcq", "C", "<think>180 - 45 - 45 = 90</think><answer>C</answer>", 1.0, True, "geo", {}),
    ("mcq", "C", "<think>...</think><answer>(C) 90</answer>", 1.0, True, "geo", {}),
    ("mcq", "C", "<think>...</think><answer>90</answer>", 1.0, True, "geo", {}),             # option text
    ("mcq", "C", "<think>...</think><answer>The answer is C.</answer>", 1.0, True, "geo", {}),
    ("mcq", "C", "<think>...</think><answer>C or D</answer>", 0.0, False, "geo", {}),       # two labels
    ("mcq", "C", "<think>...</think><answer>B</answer>", 0.0, False, "geo", {}),
    ("mcq", "C", "C", 1.0, True, "geo", {}),                               # raw text, no tags (eval only)
    ("mcq", "C", "<think>the angle is 90 degrees</think>", 0.0, False, "geo", {}),  # raw text names nothing
    # integer free-form (digit verifier), ground truth 4
    ("digit", "4", "<think>2 + 2</think><answer>4</answer>", 1.0, True, "count", {}),
    ("digit", "4", "<think>...</think><answer>four</answer>", 1.0, True, "count", {}),
    ("digit", "4", "<think>...</think><answer>There are 4 objects.</answer>", 1.0, True, "count", {}),
    ("digit", "4", "<think>...</think><answer>4.0</answer>", 1.0, True, "count", {}),
    ("digit", "4", "<think>...</think><answer>3 or 4</answer>", 0.0, False, "count", {}),
    ("digit", "4", "4", 1.0, True, "count", {}),
    ("digit", "4", "<answer>5</answer>", 0.0, False, "count", {}),
    # float free-form with MathVista precision 2, ground truth 1.25 (Math-Verify)
    ("math", "1.25", "<think>rise/run</think><answer>1.25</answer>", 1.0, True, "algebra",
     dict(answer_type="float", precision=2)),
    ("math", "1.25", "<answer>1.2512</answer>", 1.0, True, "algebra", dict(answer_type="float", precision=2)),
    ("math", "1.25", "<answer>\\frac{5}{4}</answer>", 1.0, True, "algebra", dict(answer_type="float", precision=2)),
    ("math", "1.25", "<answer>1.3</answer>", 0.0, False, "algebra", dict(answer_type="float", precision=2)),
    # LaTeX ground truth (Math PUMA style)
    ("math", "\\frac{1}{2}", "<think>half</think><answer>0.5</answer>", 1.0, True, "algebra", {}),
    ("math", "\\frac{1}{2}", "<answer>$\\frac{1}{2}$</answer>", 1.0, True, "algebra", {}),
    ("math", "\\frac{1}{2}", "<answer>1/3</answer>", 0.0, False, "algebra", {}),
    # boxes, normalised [x1, y1, x2, y2]; correct at IoU >= 0.5
    ("iou", "[0.1, 0.2, 0.5, 0.6]", "<answer>[0.1, 0.2, 0.5, 0.6]</answer>", 1.0, True, "ground", {}),
    ("iou", "[0.1, 0.2, 0.5, 0.6]", "<answer>[0.1, 0.2, 0.5, 0.4]</answer>", 0.5, True, "ground", {}),
    ("iou", "[0.1, 0.2, 0.5, 0.6]", "<answer>[0.3, 0.2, 0.7, 0.6]</answer>", 1 / 3, False, "ground", {}),
    # short text answers: normalised exact match
    ("text", "blue", "<answer>Blue</answer>", 1.0, True, "vqa", {}),
    ("text", "blue", "<answer>**blue**.</answer>", 1.0, True, "vqa", {}),
    ("text", "blue", "<answer>light blue</answer>", 0.0, False, "vqa", {}),
    # open-ended without a reward model: unscored
    ("open_ended", "A sunny meadow.", "<answer>A meadow.</answer>", None, None, "caption", {}),
]


@pytest.fixture(scope="module")
def judged():
    items, responses = [], []
    for i, (vtype, gt, resp, _, _, source, extra) in enumerate(CASES):
        items.append(_item(i, vtype, gt, source, "multi_choice" if vtype == "mcq" else "free_form",
                           options=OPTS if vtype == "mcq" else None, **extra))
        responses.append(resp)
    return Judge({"num_workers": 1})(items, responses)


@pytest.mark.parametrize("k", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_score_table(judged, k):
    vtype, gt, resp, score, correct, _, _ = CASES[k]
    row = judged[k]
    if score is None:
        assert row.score is None and row.correct is None
    else:
        assert row.score == pytest.approx(score, abs=1e-6), (resp, row.answer)
        assert row.correct is correct
    assert row.answer_tag_valid == ("<answer>" in resp)  # every tagged row above has one non-empty pair


def test_tables(judged):
    tab = tables(judged)
    want = {}  # source -> (n, scored, correct) from the CASES table
    for vtype, _, _, score, correct, source, _ in CASES:
        n, s, c = want.get(source, (0, 0, 0))
        want[source] = (n + 1, s + (score is not None), c + bool(correct))
    for source, (n, s, c) in want.items():
        cell = tab["by_source"][source]
        assert (cell["n"], cell["scored"]) == (n, s)
        assert cell["accuracy"] == (pytest.approx(c / s) if s else None)
    overall = tab["overall"]
    n_scored = sum(c[3] is not None for c in CASES)
    assert overall["n"] == len(CASES) and overall["scored"] == n_scored
    assert overall["accuracy"] == pytest.approx(sum(bool(c[4]) for c in CASES) / n_scored)
    assert set(tab["by_question_type"]) == {"multi_choice", "free_form"}
    assert tab["by_question_type"]["multi_choice"]["n"] == sum(c[0] == "mcq" for c in CASES)
    assert math.isclose(tab["by_verifier_type"]["iou"]["mean_score"], (1 + 0.5 + 1 / 3) / 3, rel_tol=1e-6)
