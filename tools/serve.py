"""An OpenAI-compatible chat-completions server for a vlaa-jax model directory or an HF Qwen2.5-VL one.

    python tools/serve.py --model DIR [--host 127.0.0.1] [--port 8000] [--served_name NAME] [--slots 8]

Endpoints: `POST /v1/chat/completions` (messages with text and images: `image_url` parts holding a
base64 `data:` URL, a `file://` URL or a local path (a file is read only under --image_root; without one,
anywhere when serving on loopback and nowhere otherwise); `max_tokens`, `temperature` (0 = greedy, the
default), `top_p`, `top_k` (vLLM's extension), `seed`; the reply carries `usage` token counts and finish_reason "stop" / "length"),
`GET /v1/models`, `GET /health`. Streaming, n > 1 and stop sequences are refused (HTTP 400).

Requests that arrive together are batched: a queue thread takes what waits (up to --slots x 8 requests,
after at most --batch_wait_ms) and hands each group of equal sampling settings to one call of the
evaluation harness's ModelGenerator, i.e. the continuous-batching rollout engine (a finished row's slot
takes the next request at once). Prompts are the model directory's chat template and image settings
(vlaa_jax.eval.harness.pixel_limits), as tools/generate.py builds them. The local back end of
`python -m data_pipeline.construct` (configs/construct.py:local) and of any OpenAI-client tool.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import ipaddress
import dataclasses
import json
import os
import queue
import random
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from data_pipeline.chat import encode_messages, load_tokenizer  # noqa: E402
from data_pipeline.image import decode_image, preprocess_image  # noqa: E402
from data_pipeline.records import DataError  # noqa: E402
from tools import cli  # noqa: E402
from vlaa_jax.eval.harness import ModelGenerator, pixel_limits  # noqa: E402
from vlaa_jax.models import qwen2_5_vl as q  # noqa: E402
from vlaa_jax.nn import ATTENTION_IMPLS  # noqa: E402
from vlaa_jax.rollout import SamplingConfig  # noqa: E402


class RequestError(ValueError):
    """A bad request: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Pending:
    """One parsed request waiting for the batcher."""
    prompt: tuple[np.ndarray, Any, Any]   # (ids, pixel_values or None, image_grid_thw or None)
    max_tokens: int
    sampling: SamplingConfig
    seed: int | None      # None: sampled without a seed, a fresh random one per generate call
    future: Future = dataclasses.field(default_factory=Future)


def _number(body: dict, key: str, default: Any, kind: type, low: float, high: float) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{key} must be in [{low}, {high}], got {value!r}")
    return kind(value)


class Model:
    """The served model: one ModelGenerator (engine) per sampling setting, and its request parser."""

    def __init__(self, model_dir: str, *, served_name: str, slots: int, dtype: str, attention_impl: str,
                 min_pixels: int, max_pixels: int, max_tokens_cap: int, image_root: str | None = None):
        self.slots, self.cap = slots, max_tokens_cap
        model = q.from_pretrained(model_dir, dtype=dtype, attention_impl=attention_impl)
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = load_tokenizer(model_dir)
        self.parser = RequestParser(model_dir, served_name, self.config.vision,
                                    *pixel_limits(model_dir, min_pixels, max_pixels), max_tokens_cap, image_root)
        self._generators: dict[SamplingConfig, ModelGenerator] = {}

    def generate(self, sampling: SamplingConfig, prompts: list, limits: list[int], seed: int
                 ) -> tuple[list[str], list[int], list[bool]]:
        """(texts, generated token counts, truncated) of one batch of equal sampling settings."""
        if sampling not in self._generators:
            self._generators[sampling] = ModelGenerator(
                self.graphdef, self.state, model_config=self.config, tokenizer=self.tokenizer, prompts=None,
                batch_size=self.slots, max_new_tokens=self.cap, sampling=sampling)
        texts, gen = self._generators[sampling].generate(prompts, limits, rng=seed)
        return texts, [int(n) for n in gen.lengths[:len(prompts)]], [bool(t) for t in gen.truncated[:len(prompts)]]


@dataclasses.dataclass(frozen=True)
class RequestParser:
    """An OpenAI chat request -> `Pending`: the model directory's chat template and image settings."""
    tokenizer_dir: str
    name: str        # the served model name
    vision: Any      # the model's VisionConfig (patch, merge and temporal patch sizes)
    min_pixels: int
    max_pixels: int
    cap: int         # largest max_tokens
    image_root: str | None = None  # file-path images: None = any path, "" = refused, DIR = only under DIR

    def _image(self, part: dict) -> bytes:
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise RequestError("an image_url part needs image_url.url: a base64 data: URL or a file path")
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if not head.endswith(";base64"):
                raise RequestError("an image data: URL must be base64 (data:image/png;base64,...)")
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"image data: URL is not valid base64: {e}") from None
        if url.startswith(("http://", "https://")):
            raise RequestError("image URLs are not fetched: send the image as a base64 data: URL or a file path")
        path = url[len("file://"):] if url.startswith("file://") else url
        if self.image_root == "":
            raise RequestError("this server reads no image files (it serves beyond loopback without "
                               "--image_root): send the image as a base64 data: URL")
        if self.image_root is not None:
            root = os.path.realpath(self.image_root)
            if os.path.commonpath([root, os.path.realpath(path)]) != root:
                raise RequestError(f"image file {path!r} is outside this server's --image_root")
        if not os.path.isfile(path):
            raise RequestError(f"image file {path!r} not found on the server")
        with open(path, "rb") as f:
            return f.read()

    def __call__(self, body: Any) -> Pending:
        """An OpenAI chat-completions request -> a prompt and its generation settings (RequestError if bad)."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("model") not in (None, "", self.name):
            raise RequestError(f"model {body.get('model')!r} is not served here; this server serves "
                               f"{self.name!r}", 404)
        if body.get("stream"):
            raise RequestError("stream=true is not supported")
        if body.get("n", 1) != 1:
            raise RequestError("only n=1 is supported")
        if body.get("stop"):
            raise RequestError("stop sequences are not supported (generation stops at the chat template's end "
                               "of turn, or at max_tokens)")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list")
        hf_messages, images = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}] must be an object with role system, user or assistant")
            content = m.get("content")
            if isinstance(content, str):
                hf_messages.append({"role": m["role"], "content": content})
                continue
            if not isinstance(content, list):
                raise RequestError(f"messages[{i}].content must be a string or a list of parts")
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind == "image_url":
                    images.append(self._image(part))
                    parts.append({"type": "image"})
                else:
                    raise RequestError(f"messages[{i}].content[{j}]: type must be text or image_url, got {kind!r}")
            hf_messages.append({"role": m["role"], "content": parts})
        v = self.vision
        pixels, grids, counts = [], [], []
        for k, data in enumerate(images):
            try:
                img = decode_image(data, name=f"image {k}")
            except DataError as e:
                raise RequestError(e.reason) from None
            f = preprocess_image(img, min_pixels=self.min_pixels, max_pixels=self.max_pixels, patch_size=v.patch_size,
                                 merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
            pixels.append(f.pixel_values)
            grids.append(np.asarray(f.image_grid_thw).reshape(-1, 3))
            counts.append(int(np.prod(f.image_grid_thw)) // v.spatial_merge_size ** 2)
        try:
            ids = encode_messages(self.tokenizer_dir, hf_messages, counts)
        except ValueError as e:
            raise RequestError(str(e)) from None
        prompt = (ids, np.concatenate(pixels) if pixels else None, np.concatenate(grids) if grids else None)
        temperature = _number(body, "temperature", 0.0, float, 0.0, 100.0)
        top_p = _number(body, "top_p", 1.0, float, 1e-6, 1.0)
        max_tokens = _number(body, "max_tokens", _number(body, "max_completion_tokens", min(1024, self.cap), int, 1,
                                                         self.cap), int, 1, self.cap)
        seed = _number(body, "seed", None, int, 0, 2 ** 31 - 1)
        top_k = max(0, _number(body, "top_k", 0, int, -1, 1 << 30))  # vLLM's extension; -1 or 0 = off
        sampling = (SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0
                    else SamplingConfig(temperature=0.0))
        return Pending(prompt, max_tokens, sampling, seed if temperature > 0 else 0)


class Batcher(threading.Thread):
    """Takes the waiting requests together and runs each group of equal sampling settings in one call of
    `generate(sampling, prompts, max_tokens, seed) -> (texts, token counts, truncated)` (Model.generate;
    the only thread that runs the model)."""

    def __init__(self, generate: Callable[..., tuple[list[str], list[int], list[bool]]], wait_s: float,
                 max_batch: int):
        super().__init__(daemon=True, name="batcher")
        self.generate, self.wait_s, self.max_batch = generate, wait_s, max_batch
        self.queue: queue.Queue[Pending] = queue.Queue()
        self.calls = 0  # generate calls made (GET /health shows it: the batching, seen from outside)

    def run(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple, list[Pending]] = {}
            for p in batch:
                groups.setdefault((p.sampling, p.seed), []).append(p)
            for (sampling, seed), group in groups.items():
                try:
                    texts, counts, truncated = self.generate(
                        sampling, [p.prompt for p in group], [p.max_tokens for p in group],
                        random.getrandbits(31) if seed is None else seed)
                    self.calls += 1
                except Exception as e:  # noqa: BLE001 - the requests' answer is a 500 naming it
                    for p in group:
                        p.future.set_exception(e)
                    continue
                for i, p in enumerate(group):
                    p.future.set_result((texts[i], int(len(p.prompt[0])), counts[i], truncated[i]))


def make_handler(parser: RequestParser, batcher: Batcher, verbose: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet unless --verbose
            if verbose:
                super().log_message(fmt, *args)

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": parser.name, "object": "model",
                                                             "created": 0, "owned_by": "vlaa-jax"}]})
            elif self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", "model": parser.name, "generate_calls": batcher.calls})
            else:
                self._error(404, f"no route {self.path}: POST /v1/chat/completions, GET /v1/models")

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._error(404, f"no route {self.path}: POST /v1/chat/completions")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length))
                except (ValueError, UnicodeDecodeError) as e:
                    raise RequestError(f"the request body is not JSON: {e}") from None
                pending = parser(body)
            except RequestError as e:
                self._error(e.status, str(e))
                return
            batcher.queue.put(pending)
            try:
                text, n_prompt, n_completion, truncated = pending.future.result()
            except Exception as e:  # noqa: BLE001
                self._error(500, f"generation failed: {type(e).__name__}: {e}")
                return
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": parser.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length" if truncated else "stop"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                          "total_tokens": n_prompt + n_completion}})

    return Handler


def image_root(host: str, root: str) -> str | None:
    """The RequestParser's image_root: `root` if given, else any path on a loopback host (a local user's
    own files) and no file at all on an address others can reach."""
    if root:
        return root
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return None if loopback else ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="vlaa-jax model directory or HF Qwen2.5-VL directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed)")
    p.add_argument("--served_name", default="vlaa-jax", help="the model name requests give")
    p.add_argument("--slots", type=int, default=8, help="decode slots of the engine")
    p.add_argument("--batch_wait_ms", type=float, default=20.0,
                   help="how long the first waiting request waits for others to batch with")
    p.add_argument("--max_tokens_cap", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--min_pixels", type=int, default=0, help="default: the model's preprocessor_config.json")
    p.add_argument("--max_pixels", type=int, default=0, help="default: the model's preprocessor_config.json")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--attention_impl", default="xla", choices=ATTENTION_IMPLS)
    p.add_argument("--image_root", default="",
                   help="image file paths in requests are read only under this directory; default: any path "
                        "when --host is a loopback address, none otherwise (then only base64 data: URLs)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    a = p.parse_args(argv)
    if not os.path.isdir(a.model):
        cli.fail(f"--model {a.model}: not a directory (a vlaa-jax model directory or an HF Qwen2.5-VL directory)")
    if a.slots < 1 or a.max_tokens_cap < 1:
        cli.fail("--slots and --max_tokens_cap must be >= 1")
    with cli.user_errors():
        model = Model(a.model, served_name=a.served_name, slots=a.slots, dtype=a.dtype,
                      attention_impl=a.attention_impl, min_pixels=a.min_pixels, max_pixels=a.max_pixels,
                      max_tokens_cap=a.max_tokens_cap, image_root=image_root(a.host, a.image_root))
        batcher = Batcher(model.generate, a.batch_wait_ms / 1000.0, a.slots * ModelGenerator.CALL_ITEMS)
        batcher.start()
        server = ThreadingHTTPServer((a.host, a.port), make_handler(model.parser, batcher, a.verbose))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"serving {a.served_name} ({a.model}) on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
