"""Reasoning-behaviour metrics the paper uses to compare SFT and RL models (arXiv 2504.11468 sec. 5).

Over a list of responses (eval outputs or GRPO rollouts):
- response length (tokens when the caller gives them, else whitespace words);
- reflection: the paper's "aha" words `wait, again, double-check, hmm, mistake, alternatively, check,
  i should confirm` (its split criterion between reflective and non-reflective responses). A word
  counts as a whole word or phrase, case-insensitive; "double-check" also as "double check"; a
  "double-check" is not also a "check". Inflected forms ("checked", "mistakes") do not count: the
  list is the paper's, taken literally. Reported: the share of responses with at least one, the mean
  count per response, and the mean count of each word;
- answer-tag validity (exactly one non-empty `<answer>...</answer>`, the reward module's rule) and the
  strict format `<think>...</think>` then `<answer>...</answer>`, each once;
- accuracy vs length (given per-response correctness): accuracy in length quantile bins, and the
  accuracy of reflective vs non-reflective responses.

`behaviour_metrics(...)` returns a flat dict of float scalars for the trainer's metrics writer
(GRPO rollouts) and for the eval report.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from vlaa_jax.rewards.extract import extract_answer

REFLECTION_WORDS = ("wait", "again", "double-check", "hmm", "mistake", "alternatively", "check",
                    "i should confirm")
_PATTERNS = {"double-check": r"double[-\s]check", "i should confirm": r"i\s+should\s+confirm"}
# Longest alternatives first so "double-check" wins over "check" at the same place.
_REFLECT = re.compile(r"\b(" + "|".join(_PATTERNS.get(w, re.escape(w)) for w in sorted(
    REFLECTION_WORDS, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_FORMAT = re.compile(r"^\s*<think>(?:(?!</?think>|</?answer>).)+</think>\s*<answer>(?:(?!</?think>|</?answer>).)+"
                     r"</answer>\s*$", re.DOTALL)


def _word_of(match: str) -> str:
    m = " ".join(match.lower().split())
    if m.startswith("double"):
        return "double-check"
    return m


def reflection_counts(text: str) -> dict[str, int]:
    """Occurrences of each reflection word in `text` (all words present as keys)."""
    counts = dict.fromkeys(REFLECTION_WORDS, 0)
    for m in _REFLECT.finditer(text):
        counts[_word_of(m.group(1))] += 1
    return counts


def has_reflection(text: str) -> bool:
    """The paper's split: does the response use any reflection word?"""
    return _REFLECT.search(text) is not None


def answer_tag_valid(text: str) -> bool:
    """Exactly one non-empty <answer>...</answer> (vlaa_jax.rewards.extract_answer's rule)."""
    return extract_answer(text) is not None


def format_valid(text: str) -> bool:
    """`<think>...</think>` then `<answer>...</answer>`, each exactly once and non-empty, nothing else."""
    return _FORMAT.match(text) is not None


def length_bins(lengths: np.ndarray, num_bins: int) -> np.ndarray:
    """Quantile bin (0 .. num_bins-1) of each length; a length equal to an edge goes to the lower bin,
    so equal lengths share one bin."""
    if len(lengths) == 0:
        return np.zeros(0, int)
    edges = np.quantile(lengths, np.linspace(0, 1, num_bins + 1)[1:-1])
    return np.searchsorted(edges, lengths, side="left")


def accuracy_by_length(lengths: Sequence[float], correct: Sequence[bool], num_bins: int = 4) -> list[dict]:
    """Rows {bin, min_length, max_length, n, accuracy} over length quantile bins (empty bins left out)."""
    lengths = np.asarray(lengths, np.float64)
    correct = np.asarray(correct, np.float64)
    bins = length_bins(lengths, num_bins)
    rows = []
    for b in range(num_bins):
        sel = bins == b
        if sel.any():
            rows.append({"bin": b, "min_length": float(lengths[sel].min()), "max_length": float(lengths[sel].max()),
                         "n": int(sel.sum()), "accuracy": float(correct[sel].mean())})
    return rows


def behaviour_metrics(responses: Sequence[str], *, lengths: Sequence[int] | None = None,
                      correct: Sequence[bool] | None = None, num_bins: int = 4,
                      prefix: str = "behaviour/") -> dict[str, float]:
    """Flat scalars over `responses` (keys below, each prefixed):
    length_mean, length_median, length_max (tokens if `lengths` is given, else words),
    reflection_rate (share with >= 1 reflection word), reflections_per_response,
    reflect/<word> (mean count per response), answer_tag_valid, format_valid; with `correct`:
    accuracy, accuracy_reflective / accuracy_nonreflective (NaN when a group is empty),
    accuracy_len_q<k> (accuracy in length quantile bin k), length_correct / length_incorrect (means)."""
    n = len(responses)
    if n == 0:
        return {}
    if lengths is None:
        lengths = [len(r.split()) for r in responses]
    if len(lengths) != n or (correct is not None and len(correct) != n):
        raise ValueError(f"behaviour_metrics: {n} responses, {len(lengths)} lengths, "
                         f"{None if correct is None else len(correct)} correctness flags")
    lens = np.asarray(lengths, np.float64)
    counts = [reflection_counts(r) for r in responses]
    totals = np.array([sum(c.values()) for c in counts], np.float64)
    out = {"length_mean": float(lens.mean()), "length_median": float(np.median(lens)),
           "length_max": float(lens.max()), "reflection_rate": float((totals > 0).mean()),
           "reflections_per_response": float(totals.mean()),
           "answer_tag_valid": float(np.mean([answer_tag_valid(r) for r in responses])),
           "format_valid": float(np.mean([format_valid(r) for r in responses]))}
    for w in REFLECTION_WORDS:
        out[f"reflect/{w}"] = float(np.mean([c[w] for c in counts]))
    if correct is not None:
        ok = np.asarray(correct, np.float64)
        refl = totals > 0
        out["accuracy"] = float(ok.mean())
        out["accuracy_reflective"] = float(ok[refl].mean()) if refl.any() else float("nan")
        out["accuracy_nonreflective"] = float(ok[~refl].mean()) if (~refl).any() else float("nan")
        out["length_correct"] = float(lens[ok > 0].mean()) if (ok > 0).any() else float("nan")
        out["length_incorrect"] = float(lens[ok == 0].mean()) if (ok == 0).any() else float("nan")
        for row in accuracy_by_length(lens, ok, num_bins):
            out[f"accuracy_len_q{row['bin']}"] = row["accuracy"]
    return {prefix + k: v for k, v in out.items()}
