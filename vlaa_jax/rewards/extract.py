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


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the balanced {...} opening at text[start] and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` (or `\\fbox{...}`) in text, or None."""
    found = None
    for m in _BOXED.finditer(text):
        got = _braced(text, m.end())
        if got is not None:
            found = got[0]
    return found


def strip_latex_wrappers(text: str) -> str:
    """Removes wrappers that never change an answer's meaning: surrounding $...$, \\(...\\), \\[...\\],
    a single \\boxed{...}, \\text{...}/\\textbf{...}/\\mathrm{...} around the whole answer."""
    prev = None
    text = text.strip()
    while prev != text:
        prev = text
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text = text[len(left):len(text) - len(right)].strip()
        m = re.match(r"\\(?:boxed|fbox|text|textbf|textrm|mathrm|mathbf)\s*(?={)", text)
        if m:
            got = _braced(text, m.end())
            if got is not None and got[1] == len(text):
                text = got[0].strip()
    return text


_MARKDOWN = re.compile(r"(\*\*|__|\*|`)")


def normalize_text(text: str) -> str:
    """NFKC unicode (full-width digits/letters -> ASCII), unicode minus -> '-', no markdown emphasis,
    no LaTeX wrappers, collapsed whitespace."""
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("\u00a0", " ")
    text = _MARKDOWN.sub("", text)
    text = strip_latex_wrappers(text)
    return " ".join(text.split())
