"""math reward: Math-Verify equivalence of the extracted answer and the LaTeX ground truth.

Math-Verify's own timeout uses signal.alarm, which only works in a process's main thread (in a
thread it raises), and some inputs (e.g. `9^{9^{9^{9}}}`) run for ever without it. So answers are
verified in worker processes, one item at a time each, and a worker that passes its per-item
deadline is killed and replaced: the item scores 0 and is counted as a timeout. Math-Verify's
internal alarms are switched off inside the workers (the hard deadline replaces them).

Workers come from the "forkserver" start method by default: they are forked from a small clean
server process with math_verify preloaded (cheap to replace, and never a fork of a multi-threaded
JAX process).

How strings are parsed: see `_parse` (bare LaTeX is wrapped in `$...$`, prose is parsed as it is).
A ground truth Math-Verify cannot parse is an error (counted, reward 0).
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import threading
import time
from typing import Sequence

_DELIMS = ("$", "\\boxed", "\\[", "\\(")
_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")  # an English word, not a LaTeX command


def _parse(text: str):
    """Math-Verify parse of an answer/ground truth that usually has no LaTeX delimiters.

    Bare LaTeX ("\\sqrt{2}/2", "\\pi") only parses inside `$...$`; prose ("The area is 12 cm^2")
    parses best as it is (Math-Verify then looks for the final number/expression), and wrapped would
    read the words as a product of symbols. So prose tries the raw text first, bare math the wrapped
    text first; the first non-empty parse wins."""
    from math_verify import parse  # local: sympy-heavy (~0.6 s); only the worker processes run this
    if any(d in text for d in _DELIMS):
        return parse(text, parsing_timeout=None)
    wrapped = f"${text}$"
    order = (text, wrapped) if _WORD.search(text) else (wrapped, text)
    for candidate in order:
        parsed = parse(candidate, parsing_timeout=None)
        if parsed:
            return parsed
    return []


def verify_math(answer: str, gt: str) -> float:
    """Unprotected Math-Verify check (1.0 / 0.0); run it through MathVerifyPool in training."""
    from math_verify import verify  # local: see _parse
    gold = _parse(str(gt))
    if not gold:
        raise ValueError(f"Math-Verify cannot parse the ground truth {gt!r}")
    pred = _parse(str(answer))
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


def _worker_main(conn) -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings
    while True:
        try:
            idx, answer, gt = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send((idx, verify_math(answer, gt), None))
        except Exception as e:  # noqa: BLE001 - reported per item, never kills the batch
            conn.send((idx, 0.0, f"{type(e).__name__}: {e}"))


@dataclasses.dataclass(frozen=True)
class MathResult:
    score: float
    timed_out: bool = False
    error: str | None = None


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class MathVerifyPool:
    """A pool of Math-Verify worker processes with a hard per-item timeout.

    pool.verify([(answer, gt), ...]) -> [MathResult]; identical pairs in one call are checked once.
    Workers start lazily and live until close() (also called at interpreter exit).
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0,
                 start_method: str = "forkserver"):
        if num_workers < 1:
            raise ValueError(f"math reward num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"math reward timeout must be > 0 seconds, got {timeout_s}")
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["math_verify", __name__])
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        atexit.register(self.close)

    def _ensure_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx))

    def verify(self, pairs: Sequence[tuple[str, str]]) -> list[MathResult]:
        unique = list(dict.fromkeys((str(a), str(g)) for a, g in pairs))
        with self._lock:
            done = self._run(unique)
        return [done[(str(a), str(g))] for a, g in pairs]

    def _run(self, items: list[tuple[str, str]]) -> dict[tuple[str, str], MathResult]:
        results: dict[int, MathResult] = {}
        pending = collections.deque(range(len(items)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (item, deadline)
        if items:
            self._ensure_workers()
        while pending or busy:
            for slot in range(self.num_workers):
                if slot not in busy and pending:
                    idx = pending.popleft()
                    try:
                        self._workers[slot].conn.send((idx,) + items[idx])
                    except (BrokenPipeError, OSError):  # died while idle: replace, send again
                        self._replace(slot)
                        self._workers[slot].conn.send((idx,) + items[idx])
                    busy[slot] = (idx, time.monotonic() + self.timeout_s)
            wait_s = max(0.0, min(dl for _, dl in busy.values()) - time.monotonic())
            conns = {self._workers[s].conn: s for s in busy}
            for conn in mp.connection.wait(list(conns), timeout=wait_s):
                slot = conns[conn]
                idx = busy.pop(slot)[0]
                try:
                    got_idx, score, err = conn.recv()
                    results[got_idx] = MathResult(score=score, error=err)
                except (EOFError, OSError) as e:  # the worker died (e.g. out of memory)
                    results[idx] = MathResult(0.0, error=f"math worker died: {e!r}")
                    self._replace(slot)
            now = time.monotonic()
            for slot, (idx, deadline) in list(busy.items()):
                if now >= deadline:
                    results[idx] = MathResult(0.0, timed_out=True)
                    del busy[slot]
                    self._replace(slot)
        return {items[i]: r for i, r in results.items()}

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self._ctx)

    def close(self) -> None:
        if os.getpid() != self._pid:  # a forked child must not kill its parent's workers
            return
        for w in self._workers:
            try:
                w.conn.close()
            finally:
                w.proc.join(timeout=1)
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(timeout=5)
        self._workers = []

    def __enter__(self) -> "MathVerifyPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARED: dict[tuple[int, float], MathVerifyPool] = {}


def shared_pool(num_workers: int = 2, timeout_s: float = 5.0) -> MathVerifyPool:
    """One long-lived pool per (num_workers, timeout_s) for the process (closed at exit)."""
    key = (int(num_workers), float(timeout_s))
    if key not in _SHARED:
        _SHARED[key] = MathVerifyPool(*key)
    return _SHARED[key]
