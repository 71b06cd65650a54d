"""Reward-model HTTP server for the open-ended reward (vlaa_jax.rewards.open_ended.HTTPScorer).

Hosts any Hugging Face sequence-classification / reward model saved in a local directory
(AutoModelForSequenceClassification + AutoTokenizer, torch, CPU or one GPU). The paper used
InternLM-XComposer2.5-Reward, a multimodal model with its own remote code; this server is the
text-only, dependency-light stand-in: the `image` of each item is accepted and IGNORED (text-only
models score question + answer). To serve a multimodal reward model, subclass RewardModel and
override `score` (the image arrives as a path relative to the images root).

Protocol (JSON over HTTP, loopback by default):
  POST /score   {"items": [{"image": str|null, "question": str, "answer": str}, ...]}
             -> {"scores": [float, ...]}          400 on a malformed request, 500 on a model error
  GET  /health  -> {"status": "ok", "model": "<dir>"}
Text formatting: the tokenizer's chat template with a user turn (question) and an assistant turn
(answer) when it has one (what chat reward models expect), else the (question, answer) text pair.
The score is logits[:, label_index] (default -1: the only logit of a num_labels=1 reward head, or the
"positive" class of a classifier).

Usage: python tools/reward_server.py --model_dir DIR [--host 127.0.0.1] [--port 8000 | 0 = free port]
On start it prints one line "reward_server listening on http://HOST:PORT" (flushed).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence


class RewardModel:
    """A sequence-classification model scoring (question, answer) texts."""

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "float32",
                 max_length: int = 4096, batch_size: int = 8, label_index: int = -1):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=getattr(torch, dtype)).to(device).eval()
        if self.model.config.pad_token_id is None:  # decoder heads need it to find the last token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.max_length = device, max_length
        self.batch_size, self.label_index = max(1, batch_size), label_index
        self.lock = threading.Lock()

    def _encode(self, questions: Sequence[str], answers: Sequence[str]):
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template([{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}], tokenize=False)
                     for q, a in zip(questions, answers)]
            return tok(texts, padding=True, truncation=True, max_length=self.max_length,
                       return_tensors="pt", add_special_tokens=False)
        return tok(list(questions), list(answers), padding=True, truncation=True,
                   max_length=self.max_length, return_tensors="pt")

    def score(self, items: Sequence[dict]) -> list[float]:
        scores: list[float] = []
        with self.lock, self.torch.no_grad():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                enc = self._encode([it["question"] for it in chunk], [it["answer"] for it in chunk])
                logits = self.model(**enc.to(self.device)).logits
                scores.extend(float(v) for v in logits[:, self.label_index].float().cpu())
        return scores


def _validate(payload) -> list[dict]:
    if not isinstance(payload, dict) or not isinstance(payload.get("items"), list):
        raise ValueError('body must be {"items": [...]}')
    items = []
    for k, it in enumerate(payload["items"]):
        if not isinstance(it, dict) or not isinstance(it.get("question"), str) \
                or not isinstance(it.get("answer"), str):
            raise ValueError(f"items[{k}] needs string fields 'question' and 'answer'")
        items.append(it)
    return items


def make_server(model: RewardModel, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server naming)
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "model": model.model_dir})
            else:
                self._reply(404, {"error": f"unknown path {self.path}"})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/score":
                return self._reply(404, {"error": f"unknown path {self.path}"})
            try:
                length = int(self.headers.get("Content-Length", "0"))
                items = _validate(json.loads(self.rfile.read(length) or b"null"))
            except ValueError as e:
                return self._reply(400, {"error": str(e)})
            try:
                self._reply(200, {"scores": model.score(items)})
            except Exception as e:  # noqa: BLE001 - reported to the client as a server error
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, fmt, *args):  # quiet: one line per request is noise in training logs
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True, help="local HF sequence-classification model directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--dtype", default="float32", help="torch dtype name (float32, bfloat16, ...)")
    p.add_argument("--max_length", type=int, default=4096, help="token limit per (question, answer)")
    p.add_argument("--batch_size", type=int, default=8, help="items per forward pass")
    p.add_argument("--label_index", type=int, default=-1, help="logit used as the score")
    args = p.parse_args(argv)
    model = RewardModel(args.model_dir, args.device, args.dtype, args.max_length, args.batch_size,
                        args.label_index)
    server = make_server(model, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"reward_server listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
