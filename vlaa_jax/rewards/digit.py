"""digit reward (CLEVR-Math counting): does the extracted answer state the ground-truth number?

Decision ("three" vs "3"): English number words zero..twenty count as numbers, because a counting
answer "three" is as correct as "3" and the paper's rule is a numeric match, not a string match.
The rule: after normalisation (unicode NFKC, markdown, `$...$`, `\\boxed{}`, `\\text{}`, thousands
commas), the answer must name exactly one distinct number: the numerals in it, or, when it has no
numerals, its number words. "3", " 3 ", "**3**", "3.0", "\\boxed{3}", "There are 3 objects left." and
"three" all match gt 3; "3 or 4", "2 + 1 = 3" (several numbers) and "3.5" do not. Values compare
exactly as decimals (no float rounding), so huge integers are compared digit for digit.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from vlaa_jax.rewards.extract import normalize_text

_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])|(?<![\w.])[-+]?\.\d+")
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen twenty").split()
_WORD = re.compile(r"\b(" + "|".join(_WORDS) + r")\b", re.IGNORECASE)


def parse_numbers(text: str) -> set[Decimal]:
    """Distinct numeric values named in text (numerals first; number words only if no numerals)."""
    text = normalize_text(str(text))
    values = set()
    for m in _NUMBER.finditer(text):
        try:
            values.add(Decimal(m.group(0).replace(",", "")))  # exact: no context rounding
        except InvalidOperation:
            continue
    if not values:
        values = {Decimal(_WORDS.index(w.lower())) for w in _WORD.findall(text)}
    return values


def parse_ground_truth_number(gt) -> Decimal:
    """The single number of a digit ground truth; ValueError otherwise."""
    values = parse_numbers(str(gt))
    if len(values) != 1:
        raise ValueError(f"digit ground truth must be one number, got {gt!r}")
    return next(iter(values))


def digit_reward(answer: str | None, gt) -> float:
    """1.0 if the extracted answer names exactly the ground-truth number, else 0.0."""
    if answer is None:
        return 0.0
    want = parse_ground_truth_number(gt)
    got = parse_numbers(answer)
    return 1.0 if got == {want} else 0.0
