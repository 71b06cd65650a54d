"""Every unambiguous form models write an option label or a box in is read; the ambiguous ones are rejected
(docs/rewards.md lists both). Also: the open-ended reference is scored once per prompt, not per sample."""
import numpy as np
import pytest

from vlaa_jax.rewards import CallableScorer, RewardConfig, compute_rewards, parse_box, read_choice
from vlaa_jax.rewards.iou import iou_reward

OPTIONS = {"A": "30°", "B": "45°", "C": "60°", "D": "90°"}
MCQ_ACCEPTED = [  # (answer, label)
    ("B", "B"), ("b", "B"), ("(b)", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("B:", "B"), ("[C]", "C"),
    ("b) 45°", "B"), ("b)45°", "B"), ("b. 45°", "B"), ("b: 45°", "B"), ("B. 45°", "B"), ("(B) 45°", "B"),
    ("B) 45°", "B"), ("Answer: C", "C"), ("answer: (c)", "C"), ("The answer is C.", "C"), ("Option b", "B"),
    ("The correct option is (D)", "D"), ("**C**", "C"), ("**B.** 45°", "B"), ("\\boxed{C}", "C"), ("$C$", "C"),
    ("60°", "C"),
]
MCQ_REJECTED = ["a cat", "e.g. B", "i.e. C", "A or B", "A, C", "C is correct", "a.b", "", "E"]


@pytest.mark.parametrize("answer,label", MCQ_ACCEPTED)
def test_mcq_label_forms(answer, label):
    assert read_choice(answer, OPTIONS) == label


@pytest.mark.parametrize("answer", MCQ_REJECTED)
def test_mcq_ambiguous_forms_rejected(answer):
    assert read_choice(answer, OPTIONS) is None


BOX = (10.0, 20.0, 30.0, 40.0)
BOX_ACCEPTED = [
    "[10, 20, 30, 40]", "(10, 20, 30, 40)", "10, 20, 30, 40", "10 20 30 40", "[10.0, 20.0, 30.0, 40.0].",
    "(10, 20), (30, 40)", "(10,20),(30,40)", "(10, 20) to (30, 40)", "[10, 20], [30, 40]",
    "[[10, 20], [30, 40]]", "[(10, 20), (30, 40)]", "<|box_start|>(10,20),(30,40)<|box_end|>",
    '{"bbox_2d": [10, 20, 30, 40], "label": "cat"}',
    '```json\n[\n\t{"bbox_2d": [10, 20, 30, 40], "label": "cat"}\n]\n```',
    '{"x1": 10, "y1": 20, "x2": 30, "y2": 40}', "x1=10, y1=20, x2=30, y2=40",
    "The box is [10, 20, 30, 40] (the cat).",
]
BOX_REJECTED = [
    "[10, 20, 30, 40] and [50, 60, 70, 80]",                     # two objects
    '[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]',
    "(1, 2), (3, 4), (5, 6)",                                      # which two points are the corners?
    "(10, 20)", "[10, 20, 30]", "x1=10, x1=20, x2=30, y2=40", "the cat", "[nan, 1, 2, 3]",
]


@pytest.mark.parametrize("answer", BOX_ACCEPTED)
def test_box_forms(answer):
    assert parse_box(answer) == BOX


@pytest.mark.parametrize("answer", BOX_REJECTED)
def test_ambiguous_boxes_rejected(answer):
    assert parse_box(answer) is None


@pytest.mark.parametrize("answer,frame", [("[0.1, 0.2, 0.5, 0.6]", "auto"), ("[20, 40, 100, 120]", "auto"),
                                          ("(100, 200), (500, 600)", "normalized_1000")])
def test_box_frames(answer, frame):
    """Normalised, resized-image pixels (200 x 200) and Qwen2-VL's 0..1000 frame give one IoU."""
    got = iou_reward(answer, [0.1, 0.2, 0.5, 0.6], resized_hw=(200, 200), pred_frame=frame)
    assert got == pytest.approx(1.0)


def test_reference_scored_once_per_prompt():
    """Three prompts x four samples, records without an image path (the GRPO loader's, carrying patches):
    one scorer call of 12 answers + 3 references, although two prompts share question and reference."""
    calls = []

    def scorer(items):
        calls.append(list(items))
        return [float(len(it.answer)) for it in items]

    records = []
    for p, gt in enumerate(["a red square", "a red square", "two circles"]):
        records += [{"id": f"p{p}", "verifier_type": "open_ended", "gt": gt, "question": "Describe it.",
                     "image_patches": np.zeros((4, 8), np.float32), "image_grid": (1, 2, 2)}] * 4
    responses = [f"<answer>{'x' * (k + 1)}</answer>" for k in range(12)]
    rewards, stats = compute_rewards(responses, records, RewardConfig(open_ended="jax_rm", reward_model_path="rm"),
                                     scorer=CallableScorer(scorer, batched=True))
    assert len(calls) == 1 and len(calls[0]) == 12 + 3
    refs = calls[0][12:]
    assert [r.prompt_id for r in refs] == ["p0", "p1", "p2"] and all(r.pixels is not None for r in refs)
    assert stats["open_ended_unscored"] == 0 and rewards.shape == (12,)


def test_none_is_explicit_zero_and_counted():
    rec = {"id": "p", "verifier_type": "open_ended", "gt": "a cat", "question": "q"}
    rewards, stats = compute_rewards(["<answer>a dog</answer>"], [rec], RewardConfig(open_ended="none"))
    assert rewards.tolist() == [0.0] and stats["open_ended_unscored"] == 1


@pytest.mark.parametrize("fields,message", [
    (dict(open_ended="jax"), "reward.open_ended must be one of"),
    (dict(open_ended="jax_rm"), "reward.reward_model_path must be an HF reward-model directory"),
    (dict(open_ended="http"), "reward.reward_model_url must be a server URL"),
    (dict(open_ended="jax_rm", reward_model_path="rm", reward_model_url="http://127.0.0.1:8000"),
     "reward.reward_model_url must be empty"),
    (dict(reward_model_path="rm"), "reward.reward_model_path must be empty"),
    (dict(open_ended="jax_rm", reward_model_path="rm", reward_model_dtype="int8"), "reward_model_dtype"),
])
def test_open_ended_config_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**fields)


def test_reward_model_url_alone_still_means_http():
    assert RewardConfig(reward_model_url="http://127.0.0.1:8000/score").open_ended_scorer == "http"
    assert RewardConfig().open_ended_scorer == ""
    assert RewardConfig(open_ended="none", reward_model_url="http://h:1/score").open_ended_scorer == "http"
