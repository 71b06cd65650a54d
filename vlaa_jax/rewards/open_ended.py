"""open-ended reward (DocVQA, VizWiz, ALLaVA-LAION): a reward model compares answer and reference.

Paper sec. 4.1: with S(image, question, answer) the reward model's score,
    R = 1 - exp(-(S(pred) - S(ref)) * beta)   if S(pred) > S(ref)   else 0,
so R in [0, 1): 0 unless the policy's answer beats the reference answer. beta is not given in the
paper (config, default 1.0). The paper's S is InternLM-XComposer2.5-Reward; any scorer works here:
  * CallableScorer: a Python function (tests, in-process models);
  * HTTPScorer: a JSON client for tools/reward_server.py (or anything speaking the same protocol):
      POST <url>  {"items": [{"image": str|null, "question": str, "answer": str}, ...]}
      ->          {"scores": [float, ...]}
    with a per-request timeout, retries with exponential back-off on connection errors, timeouts and
    5xx answers, and an immediate error on 4xx (a bad request will not get better).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    question: str
    answer: str
    image: str | None = None  # image path relative to the images root (text-only scorers ignore it)


class Scorer(Protocol):
    def score(self, items: Sequence[ScoreRequest]) -> list[float]: ...


class ScorerError(RuntimeError):
    """The reward model could not score a batch (after retries)."""


def open_ended_reward(score_pred: float, score_ref: float, beta: float = 1.0) -> float:
    """The paper's R = 1 - exp(-(S(pred) - S(ref)) * beta) if S(pred) > S(ref) else 0."""
    if beta <= 0:
        raise ValueError(f"open-ended reward beta must be > 0, got {beta}")
    diff = float(score_pred) - float(score_ref)
    if not math.isfinite(diff) or diff <= 0:
        return 0.0
    return 1.0 - math.exp(-diff * beta)


class CallableScorer:
    """Wraps fn(image, question, answer) -> float (or, batched=True, fn(list[ScoreRequest]) -> list)."""

    def __init__(self, fn: Callable, batched: bool = False):
        self.fn, self.batched = fn, batched

    def score(self, items: Sequence[ScoreRequest]) -> list[float]:
        if self.batched:
            out = [float(s) for s in self.fn(list(items))]
        else:
            out = [float(self.fn(it.image, it.question, it.answer)) for it in items]
        if len(out) != len(items):
            raise ScorerError(f"scorer returned {len(out)} scores for {len(items)} items")
        return out


class HTTPScorer:
    """Client of the reward-model server protocol (module docstring)."""

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 batch_size: int = 32):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"reward_model_url must be http(s)://host:port[/score], got {url!r}")
        self.url = url if parsed.path not in ("", "/") else url.rstrip("/") + "/score"
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.batch_size = max(1, int(batch_size))

    def score(self, items: Sequence[ScoreRequest]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(items), self.batch_size):
            out.extend(self._post(items[start:start + self.batch_size]))
        return out

    def _post(self, items: Sequence[ScoreRequest]) -> list[float]:
        body = json.dumps({"items": [dataclasses.asdict(it) for it in items]}).encode()
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    scores = json.loads(resp.read())["scores"]
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode(errors="replace")
                if 400 <= e.code < 500:
                    raise ScorerError(f"reward server {self.url} rejected the request: "
                                      f"HTTP {e.code}: {detail}") from e
                last_error = ScorerError(f"HTTP {e.code}: {detail}")
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last_error = e
                continue
            except (ValueError, KeyError, TypeError) as e:
                raise ScorerError(f"reward server {self.url} sent a malformed answer: {e!r}") from e
            if not isinstance(scores, list) or len(scores) != len(items):
                raise ScorerError(f"reward server {self.url} returned {scores!r} for {len(items)} items")
            return [float(s) for s in scores]
        raise ScorerError(f"reward server {self.url} failed after {self.retries + 1} attempts "
                          f"(timeout {self.timeout_s}s): {last_error!r}")


def open_ended_rewards(answers: Sequence[str], references: Sequence[str], questions: Sequence[str],
                       images: Sequence[str | None], scorer: Scorer, beta: float = 1.0) -> list[float]:
    """Rewards for a batch; each distinct (image, question, reference) is scored once (the n rollouts
    of a prompt share it), all in one scorer call."""
    n = len(answers)
    if not (len(references) == len(questions) == len(images) == n):
        raise ValueError("open_ended_rewards: answers, references, questions, images differ in length")
    preds = [ScoreRequest(str(q), str(a), i) for a, q, i in zip(answers, questions, images)]
    refs = list(dict.fromkeys(ScoreRequest(str(q), str(r), i)
                              for r, q, i in zip(references, questions, images)))
    scores = scorer.score(preds + refs) if n else []
    ref_score = dict(zip(refs, scores[n:]))
    return [open_ended_reward(scores[k], ref_score[ScoreRequest(str(q), str(r), i)], beta)
            for k, (r, q, i) in enumerate(zip(references, questions, images))]
