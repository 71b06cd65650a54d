"""tools/reward_server.py as a real process on 127.0.0.1 with a tiny random scoring model, and the
HTTP client's timeouts and retries. Loopback traffic only."""
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from vlaa_jax.rewards import HTTPScorer, RewardConfig, ScoreRequest, ScorerError, compute_rewards

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ("what is the color of bus a red blue double decker big small it shows document title "
         "invoice total amount dog cat on left right image").split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny BERT sequence-classification model (num_labels=1, random weights) and a word-level
    tokenizer built with the `tokenizers` library, saved as a normal HF directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    model = BertForSequenceClassification(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_reward_model")
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server_url(model_dir):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "reward_server.py"),
                             "--model_dir", model_dir, "--port", "0", "--batch_size", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()  # blocks until the server prints its address (or exits)
        if "listening on" not in line:
            raise RuntimeError(f"reward server did not start: {line!r} {proc.stderr.read()[-2000:]}")
        yield line.strip().rsplit(" ", 1)[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def reference_scores(model_dir, pairs):
    """The same model run directly with transformers: logits of (question, answer) text pairs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for q, a in pairs:
            out.append(float(model(**tok(q, a, return_tensors="pt")).logits[0, 0]))
    return out


def test_server_scores_match_the_model(server_url, model_dir):
    pairs = [("what is the color of the bus", "a red bus"), ("what is the color of the bus", "blue"),
             ("what is the invoice total", "the total amount is big"), ("dog or cat", "dog on the left"),
             ("what", "it shows a document title with a small image")]
    client = HTTPScorer(server_url, timeout_s=30, retries=0, batch_size=4)  # 2 requests, padded batches
    got = client.score([ScoreRequest(q, a, image="docvqa/x.png") for q, a in pairs])
    want = reference_scores(model_dir, pairs)
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(g, 6) for g in got)) > 1  # a real model, not a constant

    with urllib.request.urlopen(server_url + "/health", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"

    # the mixed reward end to end: the paper's formula on the served scores
    beta = 2.0
    records = [{"verifier_type": "open_ended", "gt": pairs[1][1], "question": pairs[0][0], "image": "v/1.png"}]
    r, _ = compute_rewards([f"<think>t</think><answer>{pairs[0][1]}</answer>"], records,
                           RewardConfig(open_ended_beta=beta, reward_model_url=server_url))
    d = want[0] - want[1]
    assert r[0] == pytest.approx(1 - math.exp(-d * beta) if d > 0 else 0.0, abs=1e-5)


def test_server_rejects_bad_requests(server_url):
    req = urllib.request.Request(server_url + "/score", data=b'{"items": [{"question": 1}]}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and b"question" in e.value.read()
    # 4xx is not retried: the client fails at once with the server's message
    client = HTTPScorer(server_url + "/nope", timeout_s=10, retries=5, backoff_s=10.0)
    t0 = time.monotonic()
    with pytest.raises(ScorerError, match="HTTP 404"):
        client.score([ScoreRequest("q", "a")])
    assert time.monotonic() - t0 < 5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_retries_then_fails_on_refused_connection():
    client = HTTPScorer(f"http://127.0.0.1:{_free_port()}", timeout_s=1.0, retries=2, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(ScorerError, match="failed after 3 attempts"):
        client.score([ScoreRequest("q", "a")])
    assert time.monotonic() - t0 < 3


def test_client_times_out_on_a_silent_server():
    """A loopback socket that accepts and never answers: each attempt ends at timeout_s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        client = HTTPScorer(f"http://127.0.0.1:{port}/score", timeout_s=0.3, retries=1, backoff_s=0.01)
        t0 = time.monotonic()
        with pytest.raises(ScorerError, match="failed after 2 attempts"):
            client.score([ScoreRequest("q", "a")])
        wall = time.monotonic() - t0
        assert 0.5 < wall < 3, wall
        assert len(accepted) == 2
    finally:
        stop.set()
        thread.join()
        for c in accepted:
            c.close()
        listener.close()


def test_client_validates_url():
    with pytest.raises(ValueError, match="reward_model_url"):
        HTTPScorer("127.0.0.1:8000")
