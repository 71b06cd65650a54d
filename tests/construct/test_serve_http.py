"""tools/serve.py's HTTP layer in-process (fast: a scripted generate function instead of the model):
OpenAI request parsing into the data pipeline's own prompt ids, batching of concurrent requests by
sampling settings, `usage`, and the error answers."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer

import pytest
from PIL import Image

from data_pipeline.chat import VLAA_SYSTEM_PROMPT, ChatFormatter
from data_pipeline.records import Record
from tests.construct.conftest import post_chat
from tools import serve
from vlaa_jax.models.qwen2_5_vl.config import VisionConfig


def _png(w: int = 112, h: int = 84) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def server(qwen_tokenizer_dir):
    calls = []

    def generate(sampling, prompts, limits, seed):
        calls.append((sampling, len(prompts), seed))
        if any(len(p[0]) > 10_000 for p in prompts):
            raise RuntimeError("scripted engine failure")
        time.sleep(0.05)
        return [f"echo {len(p[0])}" for p in prompts], list(limits), [True] * len(prompts)

    parser = serve.RequestParser(qwen_tokenizer_dir, "tiny", VisionConfig(), 4 * 28 * 28, 256 * 32 * 32, 64)
    batcher = serve.Batcher(generate, wait_s=1.0, max_batch=16)
    batcher.start()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), serve.make_handler(parser, batcher, False))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", calls, qwen_tokenizer_dir
    httpd.shutdown()


def test_requests_are_batched_and_prompts_are_the_pipelines(server):
    url, calls, tok_dir = server
    question = "How many objects are left?"
    body = {"model": "tiny", "max_tokens": 5, "messages": [
        {"role": "system", "content": VLAA_SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png()}},
                                     {"type": "text", "text": question}]}]}
    sampled = {**body, "temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 7}
    assert post_chat(url, body, 30)[0] == 200  # loads the tokenizer: the requests below then arrive together
    calls.clear()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: post_chat(url, b, 30), [body] * 4 + [sampled] * 2))
    assert all(status == 200 for status, _ in answers)
    # one call per sampling setting, not per request
    assert sorted((s.temperature, s.top_p, s.top_k, n, seed) for s, n, seed in calls) == [
        (0.0, 1.0, 0, 4, 0), (0.8, 0.9, 50, 2, 7)]
    # the prompt is the data pipeline's GRPO prompt: 112x84 -> 8x6 patches -> 12 image tokens
    ids = ChatFormatter.create(tok_dir, VLAA_SYSTEM_PROMPT).encode_prompt(
        Record(id="x", source="", image="", question=question, response="", ground_truth="", verifier_type=None), 12)
    status, reply = answers[0]
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 5, "total_tokens": len(ids) + 5}
    assert reply["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": f"echo {len(ids)}"},
                                   "finish_reason": "length"}
    with urllib.request.urlopen(url + "/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("body, status, says", [
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "serves 'tiny'"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "stream=true"),
    ({"messages": []}, 400, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["\n"]}, 400, "stop sequences are not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 1.5}, 400, "top_k must be an integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "max_tokens must be in [1, 64]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     400, "not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     400, "not fetched"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/no/such.png"}}]}]},
     400, "not found on the server"),
    ({"messages": [{"role": "user", "content": "x " * 20000}]}, 500, "scripted engine failure"),
])
def test_bad_requests_are_named(server, body, status, says):
    got, reply = post_chat(server[0], body, 30)
    assert got == status and says in reply["error"]["message"]


def test_image_files_are_read_only_where_allowed(qwen_tokenizer_dir, tmp_path):
    """A file-path image is read anywhere on a loopback server, only under --image_root when one is
    given, and never on an address others can reach without one (base64 still works there)."""
    inside, outside = tmp_path / "images", tmp_path / "secret"
    inside.mkdir(), outside.mkdir()
    for d in (inside, outside):
        Image.new("RGB", (56, 56), (10, 200, 10)).save(d / "a.png")
    assert serve.image_root("127.0.0.1", "") is None and serve.image_root("localhost", "") is None
    assert serve.image_root("0.0.0.0", "") == "" and serve.image_root("0.0.0.0", str(inside)) == str(inside)

    def parse(root, url):
        parser = serve.RequestParser(qwen_tokenizer_dir, "tiny", VisionConfig(), 4 * 28 * 28, 256 * 32 * 32, 64,
                                     root)
        return parser({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "colour?"}]}]})

    assert parse(None, str(outside / "a.png"))
    assert parse(str(inside), f"file://{inside / 'a.png'}")
    for root, url, says in ((str(inside), str(outside / "a.png"), "outside this server's --image_root"),
                            (str(inside), str(inside / ".." / "secret" / "a.png"), "outside"),
                            ("", str(inside / "a.png"), "reads no image files")):
        with pytest.raises(serve.RequestError, match=says):
            parse(root, url)
    assert parse("", _png())
