"""An OpenAI-compatible chat-completions client for the construction stages: bounded concurrency,
retries with back-off, an on-disk cache of replies, token accounting.

Any server that speaks `POST {base_url}/chat/completions` works (vLLM, SGLang, hosted APIs,
tools/serve.py). What is retried: HTTP 429 and 5xx (a `Retry-After` header is honoured, capped at
`backoff_max_s`), timeouts, refused / dropped connections, and a 200 whose body is not a chat
completion (malformed JSON, no `choices[0].message.content`). 401, 403 and 404 are the endpoint's
fault (a missing or wrong API key, a wrong base_url or model), the same for every record: the run stops
with an `EndpointError` naming the stage's endpoint, rather than dropping every record. Other 4xx
answers are the request's fault and fail at once. A request that still fails after `retries` retries is
a `RequestError` whose `kind` (`http_500`, `timeout`, `connection`, `malformed_reply`, ...) the stage
report counts.

The cache (`Cache`, one sqlite file in the output directory) keys a reply by (stage, record id, prompt
hash, model); the prompt hash covers the messages and the sampling settings, so an edited template or
a new model re-asks only what it changes, and a killed run resumes without paying twice. Every reply
is committed as it arrives.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import math
import os
import random
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    """One stage's model server and sampling settings (a stage block of configs/construct.py)."""
    base_url: str                  # e.g. http://127.0.0.1:8000/v1 (the part before /chat/completions)
    model: str                     # the `model` field of the request
    api_key_env: str = ""          # name of the environment variable holding the API key ("" = none)
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = -1                 # -1: not sent
    timeout_s: float = 120.0       # per attempt
    retries: int = 4               # after the first attempt
    backoff_s: float = 1.0         # first wait; doubles per retry, with jitter
    backoff_max_s: float = 60.0
    concurrency: int = 8           # requests in flight

    def __post_init__(self):
        def bad(key: str, rule: str) -> None:
            raise ValueError(f"{key} must be {rule}, got {getattr(self, key)!r}")

        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            bad("base_url", "an http:// or https:// URL (the part before /chat/completions)")
        if not isinstance(self.model, str) or not self.model.strip():
            bad("model", "a model name the server serves")
        for key in ("timeout_s", "backoff_max_s"):
            if not (isinstance(getattr(self, key), (int, float)) and math.isfinite(getattr(self, key))
                    and getattr(self, key) > 0):
                bad(key, "a finite number > 0")
        if not (isinstance(self.backoff_s, (int, float)) and 0 <= self.backoff_s < math.inf):
            bad("backoff_s", "a finite number >= 0")
        for key, low in (("retries", 0), ("max_tokens", 1), ("concurrency", 1), ("seed", -1)):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                bad(key, f"an integer >= {low}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            bad("temperature", "a number >= 0")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", "in (0, 1]")

    @classmethod
    def from_config(cls, block: Mapping[str, Any], where: str) -> "EndpointConfig":
        """The endpoint fields of a config block (other keys of the block are the stage's own);
        errors name the block (`where`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in dict(block).items() if k in names})
        except (TypeError, ValueError) as e:
            raise ValueError(f"config {where}: {e}") from None

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"the environment variable {self.api_key_env} (api_key_env of model {self.model!r}) "
                             "is not set: export it with the API key, or set api_key_env='' for a server without one")
        return key

    def sampling(self) -> dict[str, Any]:
        out = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.seed >= 0:
            out["seed"] = self.seed
        return out


@dataclasses.dataclass(frozen=True)
class Reply:
    """A chat completion: the text, the reasoning a reasoning parser split off (DeepSeek's and vLLM's
    `reasoning_content`, newer vLLM's `reasoning`; "" without one), the finish reason and the `usage`
    token counts."""
    content: str
    reasoning: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RequestError(Exception):
    """A request that failed after its retries; `kind` groups it in the stage report."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class EndpointError(ValueError):
    """An answer no request to this endpoint gets past (ENDPOINT_ERRORS): the run stops."""


# HTTP statuses that say the endpoint is misconfigured, not the record: what to check.
ENDPOINT_ERRORS = {401: "the API key is missing or wrong (api_key_env)", 403: "the API key may not use it",
                   404: "no such base_url or model"}


class _Retry(Exception):
    def __init__(self, kind: str, message: str, wait_s: float | None = None):
        super().__init__(message)
        self.kind, self.wait_s = kind, wait_s


def parse_reply(body: bytes) -> Reply:
    """A chat-completions body -> Reply; ValueError when it is not one."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        message = choice["message"]
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise TypeError(f"content is {type(content).__name__}")
        usage = data.get("usage") or {}
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""  # servers name it either way
        return Reply(content=content, reasoning=str(reasoning),
                     finish_reason=str(choice.get("finish_reason") or ""),
                     prompt_tokens=int(usage.get("prompt_tokens") or 0),
                     completion_tokens=int(usage.get("completion_tokens") or 0))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"not a chat completion ({type(e).__name__}: {e}): {body[:200]!r}") from None


class ChatClient:
    """POSTs chat completions to one endpoint, retrying as the module docstring says."""

    def __init__(self, endpoint: EndpointConfig, *, sleep: Callable[[float], None] = time.sleep):
        self.endpoint = endpoint
        self.url = endpoint.base_url.rstrip("/") + "/chat/completions"
        self._key = endpoint.api_key()
        self._sleep = sleep
        self.retried = 0  # retries made, all requests together
        self._lock = threading.Lock()

    def payload(self, messages: Sequence[dict]) -> dict[str, Any]:
        return {"model": self.endpoint.model, "messages": list(messages), **self.endpoint.sampling()}

    def complete(self, messages: Sequence[dict]) -> Reply:
        body = json.dumps(self.payload(messages)).encode()
        ep = self.endpoint
        for attempt in range(ep.retries + 1):
            try:
                return self._post(body)
            except _Retry as e:
                if attempt == ep.retries:
                    raise RequestError(e.kind, f"{self.url} (model {ep.model!r}): {e} "
                                               f"(after {ep.retries + 1} attempts)") from None
                with self._lock:
                    self.retried += 1
                wait = min(ep.backoff_max_s, ep.backoff_s * 2 ** attempt * (0.5 + random.random()))
                self._sleep(min(ep.backoff_max_s, e.wait_s) if e.wait_s is not None else wait)
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> Reply:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.endpoint.timeout_s) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            if e.code == 429 or e.code >= 500:
                after = e.headers.get("Retry-After")
                wait = float(after) if after and after.strip().replace(".", "", 1).isdigit() else None
                raise _Retry(f"http_{e.code}", f"HTTP {e.code}: {detail}", wait) from None
            if e.code in ENDPOINT_ERRORS:
                raise EndpointError(f"{self.url} (model {self.endpoint.model!r}): HTTP {e.code}, "
                                    f"{ENDPOINT_ERRORS[e.code]}: {detail}") from None
            raise RequestError(f"http_{e.code}", f"{self.url} (model {self.endpoint.model!r}): HTTP {e.code}: "
                                                 f"{detail}") from None
        except (TimeoutError, socket.timeout) as e:
            raise _Retry("timeout", f"no reply within timeout_s={self.endpoint.timeout_s} ({e})") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retry("timeout", f"no reply within timeout_s={self.endpoint.timeout_s}") from None
            raise _Retry("connection", f"cannot connect: {e.reason}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retry("connection", f"connection lost: {type(e).__name__}: {e}") from None
        try:
            return parse_reply(data)
        except ValueError as e:
            raise _Retry("malformed_reply", str(e)) from None


def prompt_hash(payload: Mapping[str, Any]) -> str:
    """Hash of a request (messages + sampling; the model is a key of its own)."""
    rest = {k: v for k, v in payload.items() if k != "model"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Cache:
    """Replies on disk: sqlite, one row per (stage, record id, prompt hash, model), committed at once."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (stage TEXT, record_id TEXT, prompt_hash TEXT, "
                         "model TEXT, reply TEXT, PRIMARY KEY (stage, record_id, prompt_hash, model))")
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str, str]) -> Reply | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE stage=? AND record_id=? AND prompt_hash=? "
                                   "AND model=?", key).fetchone()
        return Reply(**json.loads(row[0])) if row else None

    def put(self, key: tuple[str, str, str, str], reply: Reply) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                             (*key, json.dumps(reply.to_json(), ensure_ascii=False)))

    def close(self) -> None:
        self._db.close()


@dataclasses.dataclass
class Usage:
    """A stage's requests and tokens: those sent this run, and those its cache answered."""
    sent: int = 0
    cached: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0

    def to_json(self) -> dict[str, int]:
        out = dataclasses.asdict(self)
        out["total_tokens"] = self.prompt_tokens + self.completion_tokens
        return out


def run_requests(stage: str, requests: Sequence[tuple[str, list[dict]]], client: ChatClient, cache: Cache,
                 usage: Usage, *, progress: bool = True) -> list[Reply | RequestError]:
    """Replies to (record id, messages) requests, in order: from the cache, else from the server,
    `client.endpoint.concurrency` at a time; a failed request is its RequestError."""
    model = client.endpoint.model
    lock = threading.Lock()
    retried0 = client.retried

    def one(item: tuple[str, list[dict]]) -> Reply | RequestError:
        rid, messages = item
        key = (stage, rid, prompt_hash(client.payload(messages)), model)
        hit = cache.get(key)
        if hit is not None:
            with lock:
                usage.cached += 1
                usage.cached_prompt_tokens += hit.prompt_tokens
                usage.cached_completion_tokens += hit.completion_tokens
            return hit
        try:
            reply = client.complete(messages)
        except RequestError as e:
            with lock:
                usage.sent += 1
                usage.failed += 1
            return e
        cache.put(key, reply)
        with lock:
            usage.sent += 1
            usage.prompt_tokens += reply.prompt_tokens
            usage.completion_tokens += reply.completion_tokens
        return reply

    with ThreadPoolExecutor(client.endpoint.concurrency) as pool, \
            tqdm(total=len(requests), desc=f"{stage} ({model})", unit="req", disable=not progress,
                 leave=False, dynamic_ncols=True) as bar:
        futures = {pool.submit(one, item): i for i, item in enumerate(requests)}
        results: list[Reply | RequestError] = [None] * len(requests)  # type: ignore[list-item]
        try:
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                bar.update(1)
        except EndpointError:
            for f in futures:  # no more requests to an endpoint that refuses them all
                f.cancel()
            raise
    usage.retries += client.retried - retried0
    return results
