"""Bad model outputs and bad reward servers, fed through the public reward entry points (issue 22).

Each row states the exact outcome (reward, counter, or error type and the names in its message) and
runs under a wall-clock limit enforced by a timer signal, so a regression to a superlinear parse or a
blocking read fails in seconds instead of hanging the suite:
  * PATHOLOGICAL: 256 KB inputs shaped against each regex / brace scan, through extraction and every
    host-side verifier (the quadratic code took minutes on these; the linear one milliseconds);
  * MIXED: whole responses through MixedReward: the answer cap, counters, logged record ids, None /
    bytes responses, unicode, non-finite ground-truth boxes;
  * SERVER: HTTPScorer against real loopback servers that trickle, stall, lie or break the protocol;
  * SCORER: non-finite / non-numeric scores from any scorer.
"""
import contextlib
import logging
import math
import socket
import threading
import time

import pytest

from vlaa_jax.rewards import (CallableScorer, HTTPScorer, MathResult, RewardConfig, ScoreRequest, ScorerError,
                              compute_rewards, digit_reward, extract_answer, iou_reward, last_boxed, mcq_reward)
from tests.time_limit import within
from vlaa_jax.rewards.extract import normalize_text




# ------------------------------------------------------------------ PATHOLOGICAL: linear parsing
K = 256 * 1024
PATHOLOGICAL = {
    "boxed_nest": "\\boxed{" * (K // 7),                 # every \boxed{ used to rescan to the end
    "boxed_unclosed": "\\boxed{x " * (K // 9),
    "fbox_spaces": "\\fbox   {" * (K // 9),
    "text_nest": "\\text{" * (K // 12) + "3" + "}" * (K // 12),  # one wrapper peeled per full rescan
    "mixed_wrappers": "$\\mathrm{\\(" * (K // 20) + "3" + "\\)}$" * (K // 20),
    "dollars": "$" * (K // 2) + "3" + "$" * (K // 2),       # one $ pair sliced off per pass
    "open_braces": "{" * K,
    "close_braces": "}" * K,
    "escaped_braces": "\\{" * (K // 2),
    "digit_run": "1" * K,
    "comma_groups": "1" + ",000" * (K // 4) + "1",
    "decimal_dots": "1." * (K // 2),
    "signs": "-+" * (K // 2),
    "spaced_digits": "1 " * (K // 2),
    "open_brackets": "[1, 2, 3, " * (K // 10),
    "parens_numbers": "(1e1" * (K // 4),
    "markdown": "**_`" * (K // 4),
    "fullwidth": "\uff13" * K,                            # NFKC -> "3"
    "ligature_expansion": "\ufdfa" * (K // 18),           # NFKC expands each char to 18
    "answer_tags": "<answer>" * (K // 8),
}


@pytest.mark.parametrize("shape", sorted(PATHOLOGICAL))
def test_pathological_text_is_parsed_in_linear_time(shape):
    text = PATHOLOGICAL[shape]
    with within(4.0):
        extract_answer(text, fallback_boxed=True)
        extract_answer(f"<answer>{text}</answer>")
        last_boxed(text)
        normalize_text(text)
        assert digit_reward(text, "7") == 0.0
        assert mcq_reward(text, "B", "Q?\nA. 1\nB. 2") == 0.0
        assert iou_reward(text, [0.1, 0.2, 0.5, 0.6]) == 0.0


def test_peeling_thousands_of_wrappers_still_finds_the_answer():
    with within(4.0):
        assert normalize_text(PATHOLOGICAL["text_nest"]) == "3"
        assert normalize_text(PATHOLOGICAL["dollars"]) == "3"
        assert normalize_text(PATHOLOGICAL["mixed_wrappers"]) == "3"
        assert last_boxed("\\boxed{" * 5000 + "7" + "}" * 5000) == "7"  # the last one: innermost


# ------------------------------------------------------------------ MIXED: through MixedReward
class FakePool:
    """Math-Verify pool stand-in: fixed results, and it records what it was asked."""

    def __init__(self, result=MathResult(1.0)):
        self.result, self.calls = result, []

    def verify(self, pairs):
        self.calls.append(list(pairs))
        return [self.result for _ in pairs]


def _words(image, question, answer):
    return float(len(answer.split()))


def run_mixed(responses, records, pool=None, scorer=None, **cfg):
    pool = pool or FakePool()
    with within(4.0):
        return compute_rewards(responses, records, RewardConfig(**cfg), math_pool=pool,
                               scorer=scorer or CallableScorer(_words))


def A(text):
    return f"<think>t</think><answer>{text}</answer>"


DIGIT = {"id": "d-1", "verifier_type": "digit", "gt": "3"}
CAP = 100
MIXED = [
    # (name, response, record, config, reward, counters that must be 1 (others 0), extract failed)
    ("1MB_no_tags", "x" * (1 << 20), DIGIT, {}, 0.0, (), True),
    ("1MB_boxed_nest_fallback", "\\boxed{" * 150_000, DIGIT, {"answer_fallback_boxed": True}, 0.0, (), True),
    ("1MB_answer_over_cap", A("3 " * 500_000), DIGIT, {}, 0.0, ("answer_too_long",), False),
    ("answer_at_cap_scored", A("3" + "." * (CAP - 1)), DIGIT, {"max_answer_chars": CAP}, 1.0, (), False),
    ("answer_one_over_cap", A("3" + "." * CAP), DIGIT, {"max_answer_chars": CAP}, 0.0, ("answer_too_long",), False),
    ("cap_counts_stripped_answer", A("  3  " + " " * CAP), DIGIT, {"max_answer_chars": CAP}, 1.0, (), False),
    ("600_text_wrappers_under_cap", A("\\text{" * 600 + "3" + "}" * 600), DIGIT, {}, 1.0, (), False),
    ("empty_response", "", DIGIT, {}, 0.0, (), True),
    ("whitespace_answer", A(" \n\t "), DIGIT, {}, 0.0, (), True),
    ("fullwidth_digit", A("\uff13"), DIGIT, {}, 1.0, (), False),
    ("lone_surrogate", A("\ud800 3"), DIGIT, {}, 1.0, (), False),
    ("nul_and_controls", A("\x00\x01 3 \x7f"), DIGIT, {}, 1.0, (), False),
    ("digit_run_at_cap", A("1" * 8192), DIGIT, {}, 0.0, (), False),
    ("mcq_parens_at_cap", A("(" * 8192), {"id": "m-1", "verifier_type": "mcq", "gt": "B",
                                          "question": "Q?\nA. x\nB. y"}, {}, 0.0, (), False),
    ("iou_same_box_300_times", A("[0.1, 0.2, 0.5, 0.6] " * 300),
     {"id": "b-1", "verifier_type": "iou", "gt": "[0.1, 0.2, 0.5, 0.6]"}, {}, 1.0, (), False),
    ("iou_nan_prediction", A("[nan, 0.2, 0.5, 0.6]"),
     {"id": "b-2", "verifier_type": "iou", "gt": "[0.1, 0.2, 0.5, 0.6]"}, {}, 0.0, (), False),
    ("iou_inf_prediction", A("[0.1, 0.2, 1e999, 0.6]"),
     {"id": "b-3", "verifier_type": "iou", "gt": "[0.1, 0.2, 0.5, 0.6]"}, {}, 0.0, (), False),
    ("math_over_cap_never_sent", A("1+" * 5000), {"id": "x-1", "verifier_type": "math", "gt": "2"}, {},
     0.0, ("answer_too_long",), False),
    ("open_ended_over_cap_never_sent", A("word " * 2000),
     {"id": "o-1", "verifier_type": "open_ended", "gt": "a b", "question": "q"}, {}, 0.0, ("answer_too_long",),
     False),
]


@pytest.mark.parametrize("name,response,record,cfg,reward,counted,failed", MIXED, ids=[m[0] for m in MIXED])
def test_bad_responses_score_exactly(name, response, record, cfg, reward, counted, failed, caplog):
    pool = FakePool()
    calls = []
    scorer = CallableScorer(lambda image, q, a: calls.append(a) or 1.0)
    with caplog.at_level(logging.WARNING, logger="vlaa_jax.rewards"):
        r, stats = run_mixed([response], [record], pool=pool, scorer=scorer, **cfg)
    assert float(r[0]) == reward
    for key in ("answer_too_long", "math_timeouts", "math_errors", "open_ended_unscored"):
        assert stats[key] == (1 if key in counted else 0), key
    assert stats["extract_fail"] == int(failed)
    if "answer_too_long" in counted:
        assert pool.calls == [] and calls == []  # no verifier saw the over-long answer
        assert f"id={record['id']!r}" in caplog.text and "max_answer_chars" in caplog.text


def test_math_timeouts_and_errors_are_counted_and_logged_with_ids(caplog):
    recs = [{"id": f"m-{i}", "verifier_type": "math", "gt": "1"} for i in range(12)]
    with caplog.at_level(logging.WARNING, logger="vlaa_jax.rewards"):
        r, stats = run_mixed([A("1")] * 12, recs, pool=FakePool(MathResult(0.0, timed_out=True)))
    assert r.tolist() == [0.0] * 12 and stats["math_timeouts"] == 12 and stats["math_errors"] == 0
    assert "12 answers scored 0" in caplog.text and "id='m-0'" in caplog.text and "and 2 more" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlaa_jax.rewards"):
        _, stats = run_mixed([A("1")], recs[:1], pool=FakePool(MathResult(0.0, error="ValueError: bad gt")))
    assert stats["math_errors"] == 1 and "ValueError: bad gt" in caplog.text and "id='m-0'" in caplog.text


@pytest.mark.parametrize("response", [None, b"<answer>3</answer>", 3, ["<answer>3</answer>"]],
                         ids=["None", "bytes", "int", "list"])
def test_a_response_that_is_not_text_names_the_record(response):
    with pytest.raises(TypeError, match=r"record 1 \(id='d-2'\): response must be a str"):
        run_mixed([A("3"), response], [DIGIT, dict(DIGIT, id="d-2")])


BAD_GT_BOXES = [
    ("nan_json", "[NaN, 0.2, 0.5, 0.6]", "non-finite"),
    ("inf_json", "[0.1, 0.2, Infinity, 0.6]", "non-finite"),
    ("overflow_json", "[0.1, 0.2, 1e400, 0.6]", "non-finite"),
    ("nan_list", [0.1, float("nan"), 0.5, 0.6], "non-finite"),
    ("inf_text", "box: 0.1 0.2 inf 0.6", "not a box"),
    ("bool_list", [True, 0.2, 0.5, 0.6], "not a box of 4 numbers"),
    ("word_list", ["a", 0.2, 0.5, 0.6], "not a box of 4 numbers"),
    ("three_numbers", "[0.1, 0.2, 0.5]", "not a box"),
]


@pytest.mark.parametrize("name,gt,message", BAD_GT_BOXES, ids=[b[0] for b in BAD_GT_BOXES])
def test_a_bad_ground_truth_box_is_an_error_naming_the_record(name, gt, message):
    rec = {"id": "g-1", "verifier_type": "iou", "gt": gt}
    with pytest.raises(ValueError, match=rf"record 0 \(id='g-1'\) \(iou\): .*{message}"):
        run_mixed([A("[0.1, 0.2, 0.5, 0.6]")], [rec])
    with pytest.raises(ValueError, match=message):  # also without an answer: the data is wrong
        run_mixed(["no answer"], [rec])


# ------------------------------------------------------------------ SERVER: loopback HTTP faults
def _read_request(conn):
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        rest += chunk


def reply(status=200, body=b'{"scores": [1.5]}', reason=b"OK", extra=b""):
    def act(conn, stop):
        conn.sendall(b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
                     % (status, reason, len(body), extra) + body)
    return act


def trickle(prefix=b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", byte=b" ", every=0.05):
    def act(conn, stop):  # valid bytes, forever, each well within any per-read timeout
        conn.sendall(prefix)
        while not stop.is_set():
            conn.sendall(byte)
            time.sleep(every)
    return act


def trickle_headers():
    return trickle(prefix=b"HTTP/1.1 200 OK\r\n", byte=b"X", every=0.05)


def silent(conn, stop):
    stop.wait(30)


def close_now(conn, stop):
    pass


def partial_body(conn, stop):
    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"scores": [')


def flood(conn, stop):
    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    chunk = b"9" * 65536
    while not stop.is_set():
        conn.sendall(chunk)


class ScriptedServer:
    """A loopback server; connection k gets behaviour k of the script (the last one repeats)."""

    def __init__(self, *script, read_request=True):
        self.script, self.read_request = script, read_request
        self.connections = 0
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/score"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            act = self.script[min(self.connections, len(self.script) - 1)]
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn, act), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn, act):
        try:
            if self.read_request:
                _read_request(conn)
            act(conn, self.stop)
        except OSError:
            pass  # the client went away (its deadline): expected for the endless behaviours
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        self.sock.close()


@contextlib.contextmanager
def server(*script, **kw):
    srv = ScriptedServer(*script, **kw)
    try:
        yield srv
    finally:
        srv.close()


TIMEOUT = 0.4
SERVER_FAULTS = [
    # (name, script, retries, error message (regex), connections the client made)
    ("trickles_body_forever", [trickle()], 0, r"failed after 1 attempts \(timeout 0\.4s each\).*TimeoutError", 1),
    ("trickles_headers_forever", [trickle_headers()], 1, r"failed after 2 attempts.*TimeoutError", 2),
    ("accepts_and_stays_silent", [silent], 0, r"failed after 1 attempts.*TimeoutError", 1),
    ("floods_bytes", [flood], 0, r"sent more than 1048576 bytes", 1),
    ("closes_at_once", [close_now], 1, r"failed after 2 attempts.*RemoteDisconnected", 2),
    ("closes_mid_body", [partial_body], 1, r"failed after 2 attempts.*IncompleteRead", 2),
    ("not_http", [reply(body=b"")], 0, None, 1),  # replaced below: garbage status line
    ("http_500_twice", [reply(500, b"model crashed", b"Internal Server Error")], 1,
     r"failed after 2 attempts.*HTTP 500: model crashed", 2),
    ("http_404_not_retried", [reply(404, b"no such path", b"Not Found")], 5, r"rejected the request: HTTP 404", 1),
    ("redirect_not_followed", [reply(302, b"", b"Found", b"Location: /elsewhere\r\n")], 3, r"HTTP 302", 1),
    ("nan_score", [reply(body=b'{"scores": [NaN]}')], 0, r"non-finite score nan for item 0 of 1", 1),
    ("inf_score", [reply(body=b'{"scores": [Infinity]}')], 0, r"non-finite score inf", 1),
    ("minus_inf_score", [reply(body=b'{"scores": [-Infinity]}')], 0, r"non-finite score -inf", 1),
    ("overflowing_score", [reply(body=b'{"scores": [1e999]}')], 0, r"non-finite score inf", 1),
    ("string_score", [reply(body=b'{"scores": ["0.5"]}')], 0, r"non-numeric score '0\.5' for item 0", 1),
    ("null_score", [reply(body=b'{"scores": [null]}')], 0, r"non-numeric score None", 1),
    ("bool_score", [reply(body=b'{"scores": [true]}')], 0, r"non-numeric score True", 1),
    ("nested_score", [reply(body=b'{"scores": [[1.0]]}')], 0, r"non-numeric score \[1\.0\]", 1),
    ("too_many_scores", [reply(body=b'{"scores": [1, 2]}')], 0, r"returned \[1, 2\] for 1 items", 1),
    ("no_scores", [reply(body=b'{"scores": []}')], 0, r"returned \[\] for 1 items", 1),
    ("scores_not_a_list", [reply(body=b'{"scores": 1.0}')], 0, r"returned 1\.0 for 1 items", 1),
    ("wrong_key", [reply(body=b'{"score": [1.0]}')], 0, r'malformed answer \(expected \{"scores"', 1),
    ("json_list", [reply(body=b"[1.0]")], 0, r'malformed answer \(expected \{"scores"', 1),
    ("not_json", [reply(body=b"<html>busy</html>")], 0, r"malformed answer \(not JSON", 1),
    ("not_utf8", [reply(body=b'\xff\xfe{"scores": [1]}')], 0, r"malformed answer \(not JSON", 1),
    ("empty_body", [reply(body=b"")], 0, r"malformed answer \(not JSON", 1),
    ("deeply_nested_json", [reply(body=b"[" * 200_000)], 0, r"malformed answer \(not JSON", 1),
    ("integer_beyond_float", [reply(body=b'{"scores": [1%s]}' % (b"0" * 400))], 0, r"non-finite score 1000", 1),
]


def _garbage(conn, stop):
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")


SERVER_FAULTS[[f[0] for f in SERVER_FAULTS].index("not_http")] = (
    "not_http", [_garbage], 1, r"failed after 2 attempts.*BadStatusLine", 2)


@pytest.mark.parametrize("name,script,retries,message,connections", SERVER_FAULTS,
                         ids=[f[0] for f in SERVER_FAULTS])
def test_reward_server_faults_raise_a_scorer_error_naming_the_server(name, script, retries, message, connections):
    with server(*script) as srv:
        client = HTTPScorer(srv.url, timeout_s=TIMEOUT, retries=retries, backoff_s=0.01)
        t0 = time.monotonic()
        with within(8.0), pytest.raises(ScorerError) as err:
            client.score([ScoreRequest("q", "a")])
        wall = time.monotonic() - t0
    assert f"reward server {srv.url}" in str(err.value)
    assert err.match(message)
    assert srv.connections == connections
    assert wall < (retries + 1) * TIMEOUT + 1.0, wall  # each attempt ends at its deadline


def test_a_retry_after_a_500_gets_the_score():
    with server(reply(503, b"warming up", b"Service Unavailable"), reply(body=b'{"scores": [2.5, -1]}')) as srv:
        with within(5.0):
            got = HTTPScorer(srv.url, timeout_s=TIMEOUT, retries=2, backoff_s=0.01).score(
                [ScoreRequest("q", "a"), ScoreRequest("q", "b")])
    assert got == [2.5, -1.0] and srv.connections == 2


def test_nan_from_the_server_stops_the_reward_instead_of_scoring_zero():
    rec = {"id": "o-1", "verifier_type": "open_ended", "gt": "a b", "question": "q"}
    with server(reply(body=b'{"scores": [NaN, 1.0]}')) as srv:
        with within(5.0), pytest.raises(ScorerError, match=rf"reward server {srv.url} returned a non-finite"):
            compute_rewards([A("an answer")], [rec], RewardConfig(reward_model_url=srv.url,
                                                                  reward_model_timeout_s=TIMEOUT,
                                                                  reward_model_retries=0))


# ------------------------------------------------------------------ SCORER: any scorer's values
def _nan_scorer(image, question, answer):
    return float("nan")


SCORER_FAULTS = [
    ("nan", CallableScorer(_nan_scorer), r"scorer _nan_scorer returned a non-finite score nan for item 0"),
    ("string", CallableScorer(lambda i, q, a: "high"), r"non-numeric score 'high'"),
    ("none", CallableScorer(lambda i, q, a: None), r"non-numeric score None"),
    ("batched_short", CallableScorer(lambda items: [1.0], batched=True), r"returned \[1\.0\] for 2 items"),
    ("batched_dict", CallableScorer(lambda items: {"a": 1.0, "b": 2.0}, batched=True), r"for 2 items"),
]


@pytest.mark.parametrize("name,scorer,message", SCORER_FAULTS, ids=[f[0] for f in SCORER_FAULTS])
def test_a_scorer_with_bad_values_raises_naming_the_scorer(name, scorer, message):
    rec = {"id": "o-1", "verifier_type": "open_ended", "gt": "a b", "question": "q"}
    with within(4.0), pytest.raises(ScorerError, match=message):
        compute_rewards([A("an answer")], [rec], scorer=scorer)


def test_a_custom_scorer_object_is_checked_too():
    class Stub:
        def score(self, items):
            return [math.inf] * len(items)

    rec = {"id": "o-1", "verifier_type": "open_ended", "gt": "a b", "question": "q"}
    with pytest.raises(ScorerError, match="scorer Stub returned a non-finite score inf"):
        compute_rewards([A("an answer")], [rec], scorer=Stub())
