"""open-ended reward (DocVQA, VizWiz, ALLaVA-LAION): a reward model compares answer and reference.

Paper sec. 4.1: with S(image, question, answer) the reward model's score,
    R = 1 - exp(-(S(pred) - S(ref)) * beta)   if S(pred) > S(ref)   else 0,
so R in [0, 1): 0 unless the policy's answer beats the reference answer. beta is not given in the
paper (config, default 1.0). The paper's S is InternLM-XComposer2.5-Reward; any scorer works here:
  * RewardModelScorer (jax_scorer.py): a Qwen2.5-VL reward model in JAX, in this process, reading the
    prompts' image patches (`ScoreRequest.pixels`);
  * CallableScorer: a Python function (tests, in-process models);
  * HTTPScorer: a JSON client for tools/reward_server.py (or anything speaking the same protocol):
      POST <url>  {"items": [{"image": str|null, "question": str, "answer": str}, ...]}
      ->          {"scores": [float, ...]}
    with a deadline per request (connect to last byte: a server that trickles bytes cannot hold a run
    longer), retries with exponential back-off on connection errors, timeouts and 5xx answers, and an
    immediate error on 4xx (a bad request will not get better).
Every score, whoever computed it, must be a finite number: anything else (NaN, inf, a string, a
missing score) is a ScorerError naming the scorer, never a silent reward 0.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import math
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable, NamedTuple, Protocol, Sequence

MAX_ANSWER_BYTES = 1 << 20  # a reply of 32 scores is < 1 KiB; more is not a scores reply


class PromptImage(NamedTuple):
    """A prompt's image as the policy saw it (the loader's patches): what an in-process reward model reads."""
    patches: Any            # float32 [p, patch_dim], normalised like the Qwen2.5-VL processor's
    grid: tuple             # (t, h, w) patches


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    question: str
    answer: str
    image: str | None = None      # image path relative to the images root (text-only scorers ignore it)
    prompt_id: str | None = None  # the prompt's record id: a reference is scored once per prompt
    pixels: PromptImage | None = dataclasses.field(default=None, compare=False, repr=False)  # in-process scorers

    def to_json(self) -> dict:
        """The request as the HTTP protocol sends it."""
        return {"image": self.image, "question": self.question, "answer": self.answer}


class Scorer(Protocol):
    def score(self, items: Sequence[ScoreRequest]) -> list[float]: ...


class ScorerError(RuntimeError):
    """The reward model could not score a batch (after retries), or answered something not a score."""


def check_reward_model_url(url: str, *, allow_empty: bool = False) -> urllib.parse.SplitResult | None:
    """The parts of a reward-server URL; ValueError unless it is http(s)://host[:port][/path]."""
    if allow_empty and url == "":
        return None
    plain = isinstance(url, str) and url.isascii() and url.isprintable() and " " not in url
    parts = urllib.parse.urlsplit(url) if plain else None  # http.client sends the path as ASCII
    try:
        ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname) and (
            parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number in 0..65535
        ok = False
    if not ok:
        raise ValueError(f"must be http(s)://host[:port][/path] (e.g. http://127.0.0.1:8000/score), got {url!r}")
    return parts


def check_scores(scores: Any, n: int, source: str) -> list[float]:
    """`scores` as n finite floats; ScorerError naming `source` (the server URL or the scorer) otherwise."""
    if hasattr(scores, "__iter__") and not isinstance(scores, (str, bytes, dict)):
        try:
            scores = list(scores)  # e.g. a tuple, a generator or an array from a CallableScorer
        except TypeError:  # a 0-d array
            pass
    if not isinstance(scores, list) or len(scores) != n:
        raise ScorerError(f"{source} returned {_short(scores)} for {n} items (expected a list of {n} numbers)")
    out = []
    for k, score in enumerate(scores):
        try:
            if isinstance(score, (bool, str, bytes)) or score is None:
                raise TypeError
            value = float(score)
        except (TypeError, ValueError):
            raise ScorerError(f"{source} returned a non-numeric score {_short(score)} for item {k} of {n}") from None
        except OverflowError:  # an integer beyond float range
            raise ScorerError(f"{source} returned a non-finite score {_short(score)} for item {k} of {n}") from None
        if not math.isfinite(value):
            raise ScorerError(f"{source} returned a non-finite score {value} for item {k} of {n}")
        out.append(value)
    return out


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


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
        self.name = f"scorer {getattr(fn, '__qualname__', None) or type(fn).__name__}"

    def score(self, items: Sequence[ScoreRequest]) -> list[float]:
        if self.batched:
            out = self.fn(list(items))
        else:
            out = [self.fn(it.image, it.question, it.answer) for it in items]
        return check_scores(out, len(items), self.name)


class HTTPScorer:
    """Client of the reward-model server protocol (module docstring)."""

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 batch_size: int = 32):
        """`timeout_s` bounds each attempt as a whole (connect, send, read every byte); one `score` call
        of one batch takes at most (retries + 1) * timeout_s plus the back-off sleeps."""
        try:
            parts = check_reward_model_url(url)
        except ValueError as e:
            raise ValueError(f"reward_model_url {e}") from None
        if not (math.isfinite(float(timeout_s)) and float(timeout_s) > 0):
            raise ValueError(f"reward model timeout must be a finite number of seconds > 0, got {timeout_s!r}")
        self.url = url if parts.path not in ("", "/") else url.rstrip("/") + "/score"
        self._parts = urllib.parse.urlsplit(self.url)
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.batch_size = max(1, int(batch_size))
        self.name = f"reward server {self.url}"

    def score(self, items: Sequence[ScoreRequest]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(items), self.batch_size):
            out.extend(self._post(items[start:start + self.batch_size]))
        return out

    def _post(self, items: Sequence[ScoreRequest]) -> list[float]:
        body = json.dumps({"items": [it.to_json() for it in items]}).encode()
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                status, data = self._request(body)
            except (TimeoutError, OSError, http.client.HTTPException) as e:  # transient: retry
                last_error = e
                continue
            detail = data[:500].decode(errors="replace")
            if 500 <= status < 600:
                last_error = ScorerError(f"HTTP {status}: {detail}")
                continue
            if 400 <= status < 500:
                raise ScorerError(f"{self.name} rejected the request: HTTP {status}: {detail}")
            if not 200 <= status < 300:
                raise ScorerError(f"{self.name} answered HTTP {status} (redirects are not followed): {detail}")
            try:
                answer = json.loads(data)
            except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
                raise ScorerError(f"{self.name} sent a malformed answer (not JSON: {e}): {detail!r}") from e
            if not isinstance(answer, dict) or "scores" not in answer:
                raise ScorerError(f'{self.name} sent a malformed answer (expected {{"scores": [...]}}): '
                                  f"{_short(answer)}")
            return check_scores(answer["scores"], len(items), self.name)
        raise ScorerError(f"{self.name} failed after {self.retries + 1} attempts "
                          f"(timeout {self.timeout_s}s each): {last_error!r}")

    def _request(self, body: bytes) -> tuple[int, bytes]:
        """One POST: (status, body). Connect to last byte within timeout_s: a watchdog timer shuts the
        socket down at the deadline, which ends a read that a trickling server keeps alive."""
        parts = self._parts
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=self.timeout_s)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:  # the plain socket's shutdown (also under TLS): wakes the reading thread
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout_s, expire)
        timer.daemon = True
        timer.start()
        try:
            conn.connect()
            if expired.is_set():  # the deadline passed while connecting (before conn.sock was set)
                raise TimeoutError
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            chunks, size = [], 0
            while chunk := resp.read(65536):
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise ScorerError(f"{self.name} sent more than {MAX_ANSWER_BYTES} bytes: not a scores reply")
                chunks.append(chunk)
            if resp.length:  # the connection ended before Content-Length bytes came
                raise http.client.IncompleteRead(b"".join(chunks), resp.length)
            if expired.is_set():
                raise TimeoutError
        except ScorerError:
            raise
        except Exception as e:
            if expired.is_set():
                raise TimeoutError(f"no complete answer within {self.timeout_s}s") from e
            raise
        finally:
            timer.cancel()
            conn.close()
        return resp.status, b"".join(chunks)


def open_ended_rewards(answers: Sequence[str], references: Sequence[str], questions: Sequence[str],
                       images: Sequence[str | None], scorer: Scorer, beta: float = 1.0, *,
                       prompt_ids: Sequence[str | None] | None = None,
                       pixels: Sequence[PromptImage | None] | None = None) -> list[float]:
    """Rewards for a batch; the reference of each prompt (each distinct (image, question, reference), the
    image named by its path or, without one, by `prompt_ids`) is scored once, not once per sample, all in
    one scorer call. `pixels`: each answer's prompt image for in-process scorers (RewardModelScorer)."""
    n = len(answers)
    # A prompt is its image path where there is one (two records of one image and question share their
    # reference's score), else its record id (the loader's records carry patches, not a path).
    prompt_ids = [None] * n if prompt_ids is None else [p if i is None else None for p, i in zip(prompt_ids, images)]
    pixels = [None] * n if pixels is None else list(pixels)
    if not (len(references) == len(questions) == len(images) == len(prompt_ids) == len(pixels) == n):
        raise ValueError("open_ended_rewards: answers, references, questions, images, prompt ids, pixels differ "
                         "in length")
    preds = [ScoreRequest(str(q), str(a), i, p, x) for a, q, i, p, x in zip(answers, questions, images, prompt_ids,
                                                                             pixels)]
    ref_of = [ScoreRequest(str(q), str(r), i, p, x) for r, q, i, p, x in zip(references, questions, images,
                                                                              prompt_ids, pixels)]
    refs = list(dict.fromkeys(ref_of))
    name = getattr(scorer, "name", None) or f"scorer {type(scorer).__name__}"
    scores = check_scores(scorer.score(preds + refs), n + len(refs), name) if n else []
    ref_score = dict(zip(refs, scores[n:]))
    return [open_ended_reward(scores[k], ref_score[ref], beta) for k, ref in enumerate(ref_of)]
