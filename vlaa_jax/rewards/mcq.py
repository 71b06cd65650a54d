"""mcq reward (GeoQA, ArxivQA): does the extracted answer pick the ground-truth option?

The chosen letter is read from the answer after normalisation (unicode, markdown, `$`, `\\boxed{}`):
  "A", "a", "(a)", "A)", "A.", "A:"                       -> the whole answer is one option label
  "Option A", "Answer: (B)", "The answer is C"           -> a label after answer/option/choice words
  "A. text", "A) text", "(A) text", "A: text"            -> a label followed by the option text
  "b) text", "b. text", "b: text", "[C]"                 -> lower case before text after ")", ".", ":";
                                                           a bracketed label ("e.g. ..." is no label)
  "30°" (the text of option A)                           -> matched against the options' texts
Labels win over text; an answer naming several labels ("A or B", "A, C") or none gives 0.
Options come from `options` (a list, in label order, or a dict label -> text) or are parsed from
the question's lines ("A. ...", "A: ...", "(A) ...", "A) ..."). The ground truth goes through the same
reading (it may be "A", "(A)", "A. 30°" or the option text).
"""
from __future__ import annotations

import re
import string
from typing import Mapping, Sequence

from vlaa_jax.rewards.extract import normalize_text

_WHOLE = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_PREFIXED = re.compile(
    r"^(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*"
    r"\(?([A-Za-z])\)?(?=$|[\s.:),;])", re.IGNORECASE)
_PAREN = re.compile(r"^\(([A-Za-z])\)")
_LABEL_TEXT = re.compile(r"^([A-Z])\s*[.:)：]")
# lower case followed by text only after ")", "." or ":" (not "e.g." / "i.e."): "b) text", "c. text"
_LOWER_LABEL_TEXT = re.compile(r"^([a-z])(?:\)\s*|\s*[.:：]\s+)(?![a-z]\.)\S")
_BRACKET_LABEL = re.compile(r"^\[([A-Za-z])\][.:)]?(?=$|\s)")
_OPTION_LINE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])\s*[.:)：])\s*(.+?)\s*$")


def _canon(text: str) -> str:
    return normalize_text(text).rstrip(".").strip().lower()


def parse_options(question: str) -> dict[str, str]:
    """Option label -> text from the question's lines (needs labels in A, B, C... order from A)."""
    found: dict[str, str] = {}
    for line in str(question).splitlines():
        m = _OPTION_LINE.match(line)
        if m:
            label = m.group(1) or m.group(2)
            found.setdefault(label, m.group(3))
    labels = list(string.ascii_uppercase[:len(found)])
    return found if sorted(found) == labels else {}


def _options_dict(options) -> dict[str, str]:
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return {str(k).strip("() .").upper(): str(v) for k, v in options.items()}
    if isinstance(options, Sequence) and not isinstance(options, str):
        out = {}
        for i, text in enumerate(options):  # entries may carry their own label: "A. 30°"
            text = str(text)
            m = _OPTION_LINE.match(text)
            out[m.group(1) or m.group(2) if m else string.ascii_uppercase[i]] = m.group(3) if m else text
        return out
    raise TypeError(f"mcq options must be a list or a dict, got {type(options).__name__}")


def read_choice(text: str, options: Mapping[str, str] | None = None) -> str | None:
    """The option label an answer (or ground truth) names, upper-case, or None."""
    norm = normalize_text(str(text))
    for pattern in (_WHOLE, _PREFIXED, _PAREN, _LABEL_TEXT, _LOWER_LABEL_TEXT, _BRACKET_LABEL):
        m = pattern.match(norm)
        if m:
            label = m.group(1).upper()
            return label if not options or label in options else None
    if options:
        canon = _canon(norm)
        hits = [label for label, opt in options.items() if _canon(opt) == canon]
        if len(hits) == 1:
            return hits[0]
    return None


def mcq_reward(answer: str | None, gt, question: str | None = None, options=None) -> float:
    """1.0 if the answer picks the ground-truth option, else 0.0."""
    if answer is None:
        return 0.0
    opts = _options_dict(options) or (parse_options(question) if question else {})
    want = read_choice(str(gt), opts)
    if want is None:  # free-text ground truth without recognisable options: compare texts
        return 1.0 if _canon(answer) == _canon(str(gt)) and _canon(answer) else 0.0
    return 1.0 if read_choice(answer, opts) == want else 0.0
