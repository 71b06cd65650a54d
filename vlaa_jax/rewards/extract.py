"""Answer extraction shared by every reward type (the paper's implicit format reward).

Rule (as the authors' evaluation script): the answer is the content of exactly one
`<answer>...</answer>` pair. Two or more answer tags, an unclosed or stray tag, or an empty answer
give None (reward 0). Only when the response contains no answer tag at all, and `fallback_boxed` is
on, the content of the last `\\boxed{...}` in the response is used instead.

Also home of the small text normalisations the verifiers share (unicode, markdown emphasis, LaTeX
wrappers such as `$...$`, `\\boxed{}`, `\\text{}`).
"""
from __future__ import annotations

import re
import unicodedata

_OPEN = re.compile(r"<answer>")  # exact tags, as the system prompt asks for them
_CLOSE = re.compile(r"</answer>")
_PAIR = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str, fallback_boxed: bool = False) -> str | None:
    """The stripped content of the single <answer>...</answer> in `response`, or None."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    n_open, n_close = len(_OPEN.findall(response)), len(_CLOSE.findall(response))
    if n_open == 0 and n_close == 0:
        return _nonempty(last_boxed(response)) if fallback_boxed else None
    if n_open != 1 or n_close != 1:
        return None
    match = _PAIR.search(response)
    return _nonempty(match.group(1)) if match else None  # None: "</answer> ... <answer>"


def _nonempty(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return text or None


_BRACE = re.compile(r"[{}]")


def brace_pairs(text: str) -> dict[int, int]:
    """Index of each balanced unescaped "{" -> index of its "}", in one pass (linear in len(text)).

    A brace preceded by a backslash (`\\{`) is literal and not counted. An unmatched "}" is ignored,
    an unclosed "{" has no entry."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text):
        i = m.start()
        if i and text[i - 1] == "\\":
            continue
        if text[i] == "{":
            stack.append(i)
        elif stack:
            pairs[stack.pop()] = i
    return pairs


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` (or `\\fbox{...}`) in text, or None."""
    pairs = None
    found = None
    for m in _BOXED.finditer(text):
        if m.end() < len(text) and text[m.end()] == "{":
            pairs = brace_pairs(text) if pairs is None else pairs
            close = pairs.get(m.end())
            if close is not None:
                found = text[m.end() + 1:close]
    return found


_DOLLAR_LIKE = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_COMMAND = re.compile(r"\\(?:boxed|fbox|text|textbf|textrm|mathrm|mathbf)\s*(?={)")


def strip_latex_wrappers(text: str) -> str:
    """Removes wrappers that never change an answer's meaning: surrounding $...$, \\(...\\), \\[...\\],
    a single \\boxed{...}, \\text{...}/\\textbf{...}/\\mathrm{...} around the whole answer.

    Works on a window [lo, hi) of the text, so peeling k nested wrappers costs O(len + k), not
    O(len * k) (a model can emit thousands of nested wrappers)."""
    lo, hi = 0, len(text)
    pairs = None

    def strip(lo: int, hi: int) -> tuple[int, int]:
        while lo < hi and text[lo].isspace():
            lo += 1
        while hi > lo and text[hi - 1].isspace():
            hi -= 1
        return lo, hi

    lo, hi = strip(lo, hi)
    prev = None
    while prev != (lo, hi):
        prev = (lo, hi)
        for left, right in _DOLLAR_LIKE:
            if (hi - lo >= len(left) + len(right) and text.startswith(left, lo)
                    and text.endswith(right, lo, hi)):
                lo, hi = strip(lo + len(left), hi - len(right))
        m = _COMMAND.match(text, lo, hi)
        if m:
            pairs = brace_pairs(text) if pairs is None else pairs
            if pairs.get(m.end()) == hi - 1:
                lo, hi = strip(m.end() + 1, hi - 1)
    return text[lo:hi]


_MARKDOWN = re.compile(r"(\*\*|__|\*|`)")


def normalize_text(text: str) -> str:
    """NFKC unicode (full-width digits/letters -> ASCII), unicode minus -> '-', no markdown emphasis,
    no LaTeX wrappers, collapsed whitespace."""
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("\u00a0", " ")
    text = _MARKDOWN.sub("", text)
    text = strip_latex_wrappers(text)
    return " ".join(text.split())
