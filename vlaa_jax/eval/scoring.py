"""Scoring benchmark answers with the reward module's verifiers, and the result tables.

Answer extraction follows the authors' VLMEvalKit integration, which differs from the training
reward on one point: the answer is the content of exactly one `<answer>...</answer>`, and *otherwise
the raw response* (training gives 0 instead: the implicit format reward). `eval_answer` is that rule,
built on `vlaa_jax.rewards.extract_answer`.

The extracted answer is then judged by the reward module's verifier for the item's type (digit, mcq,
math through Math-Verify, iou, open-ended through a reward model): it is handed to
`vlaa_jax.rewards.MixedReward` as the single `<answer>` of a response, so the dispatch, the Math-Verify
process pool and the IoU box frames are the training ones. Items of type `text` (free-form answers
that are neither numbers, LaTeX nor boxes) are an exact match after the reward module's text
normalisation, case-insensitive. MathVista float answers with a `precision` are rounded to it first
(MathVista's own rule).

An item is *correct* when its score reaches 1 (0.5 IoU for boxes, any positive reward for open-ended
answers, which beat the reference then). Open-ended items without a reward model are *unscored*: they
are listed in the predictions but left out of accuracies (counted in `unscored`).
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from vlaa_jax.eval.benchmarks import EvalItem
from vlaa_jax.rewards.extract import extract_answer, normalize_text
from vlaa_jax.rewards.mixed import MixedReward, RewardConfig

CORRECT_THRESHOLD = {"digit": 1.0, "mcq": 1.0, "math": 1.0, "text": 1.0, "iou": 0.5}
_TAG = re.compile(r"</?answer>")


def eval_answer(response: str) -> str:
    """The content of exactly one `<answer>...</answer>` in `response`, otherwise the raw response."""
    got = extract_answer(response)
    return got if got is not None else response.strip()


def round_to_precision(answer: str, precision: int | None) -> str:
    """MathVista: a float answer is compared after rounding to the item's `precision` decimals."""
    if precision is None:
        return answer
    try:
        return str(round(float(normalize_text(answer).replace(",", "")), int(precision)))
    except ValueError:
        return answer


def text_match(answer: str, gt: str) -> float:
    """1.0 when the normalised answer equals the normalised ground truth (case-insensitive)."""
    canon = lambda s: normalize_text(str(s)).rstrip(".").strip().lower()
    return 1.0 if canon(answer) and canon(answer) == canon(gt) else 0.0


@dataclasses.dataclass
class Scored:
    """One judged prediction (a row of predictions.jsonl)."""
    id: str
    source: str
    question_type: str
    verifier_type: str
    question: str
    ground_truth: str
    response: str
    answer: str          # what was judged (eval_answer, precision-rounded)
    answer_tag_valid: bool
    score: float | None  # None: unscored (open-ended without a reward model)
    correct: bool | None
    num_tokens: int | None = None
    truncated: bool | None = None  # hit max_new_tokens without an end token

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Judge:
    """Scores (item, response) pairs; keeps the reward module's Math-Verify pool and scorer alive."""

    def __init__(self, reward_config: Mapping[str, Any] | None = None, *, scorer: Any = None):
        cfg = dict(reward_config or {})
        cfg["answer_fallback_boxed"] = False  # the answer is already extracted (eval_answer)
        self.reward = MixedReward(RewardConfig.from_config(cfg), scorer=scorer)

    def __call__(self, items: Sequence[EvalItem], responses: Sequence[str], *,
                 image_hw: Sequence[tuple | None] | None = None, num_tokens: Sequence[int] | None = None,
                 truncated: Sequence[bool] | None = None) -> list[Scored]:
        if len(items) != len(responses):
            raise ValueError(f"{len(items)} items but {len(responses)} responses")
        answers = []
        for it, resp in zip(items, responses):
            ans = eval_answer(resp)
            if it.answer_type.lower() == "float":
                ans = round_to_precision(ans, it.precision)
            answers.append(ans)
        scores: list[float | None] = [None] * len(items)
        idx = [i for i, it in enumerate(items) if it.verifier_type != "text"]
        for i, it in enumerate(items):
            if it.verifier_type == "text":
                scores[i] = text_match(answers[i], it.answer)
        if idx:
            # The extracted answer becomes the one <answer> the reward module extracts again.
            wrapped = [f"<answer>{_TAG.sub(' ', answers[i])}</answer>" for i in idx]
            hw = None if image_hw is None else [image_hw[i] for i in idx]
            rewards, stats = self.reward(wrapped, [items[i].record() for i in idx], hw)
            unscored = self.reward.scorer is None
            for k, i in enumerate(idx):
                scores[i] = None if (unscored and items[i].verifier_type == "open_ended") else float(rewards[k])
        out = []
        for i, (it, resp) in enumerate(zip(items, responses)):
            s = scores[i]
            thr = CORRECT_THRESHOLD.get(it.verifier_type)
            correct = None if s is None else bool(s >= thr if thr is not None else s > 0)
            out.append(Scored(id=it.id, source=it.source, question_type=it.question_type,
                              verifier_type=it.verifier_type, question=it.question, ground_truth=it.answer,
                              response=resp, answer=answers[i], answer_tag_valid=extract_answer(resp) is not None,
                              score=s, correct=correct,
                              num_tokens=None if num_tokens is None else int(num_tokens[i]),
                              truncated=None if truncated is None else bool(truncated[i])))
        return out


def _cell(rows: Sequence[Scored]) -> dict[str, Any]:
    scored = [r for r in rows if r.score is not None]
    return {"n": len(rows), "scored": len(scored),
            "accuracy": float(np.mean([r.correct for r in scored])) if scored else None,
            "mean_score": float(np.mean([r.score for r in scored])) if scored else None,
            "answer_tag_valid": float(np.mean([r.answer_tag_valid for r in rows])) if rows else None}


def tables(rows: Sequence[Scored]) -> dict[str, Any]:
    """Accuracy overall and per source / question type / verifier type (each a dict of cells)."""
    out: dict[str, Any] = {"overall": _cell(rows)}
    for key in ("source", "question_type", "verifier_type"):
        groups: dict[str, list[Scored]] = defaultdict(list)
        for r in rows:
            groups[getattr(r, key)].append(r)
        out[f"by_{key}"] = {k: _cell(v) for k, v in sorted(groups.items())}
    return out


def format_table(tab: Mapping[str, Any], title: str = "") -> str:
    """Plain-text accuracy table (per source, per question type, overall)."""
    lines = [title] if title else []
    head = f"{'':<28}{'n':>6}{'acc %':>8}{'score':>8}{'<answer> ok':>12}"
    pct = lambda v: f"{100 * v:.1f}" if v is not None else "-"
    num = lambda v: f"{v:.3f}" if v is not None else "-"
    for key, name in (("by_source", "source"), ("by_question_type", "question type")):
        lines += [f"{name:<28}" + head[28:], "-" * len(head)]
        for k, c in tab[key].items():
            lines.append(f"  {k[:26]:<26}{c['n']:>6}{pct(c['accuracy']):>8}{num(c['mean_score']):>8}"
                         f"{pct(c['answer_tag_valid']):>12}")
    c = tab["overall"]
    lines += ["-" * len(head), f"{'overall':<28}{c['n']:>6}{pct(c['accuracy']):>8}{num(c['mean_score']):>8}"
                                f"{pct(c['answer_tag_valid']):>12}"]
    if c["scored"] < c["n"]:
        lines.append(f"({c['n'] - c['scored']} open-ended items unscored: no reward model configured)")
    return "\n".join(lines)
