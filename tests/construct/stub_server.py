"""A scripted OpenAI-compatible server for the construction tests: a real process on 127.0.0.1 that
answers by model name (captioner, reasoner, rewriter, judge) from a script, logs every request it
receives (one JSON line each, so a test counts them after the process is gone), and fails on demand.

    python tests/construct/stub_server.py --log FILE [--script FILE.json] [--mode ok|500|401|malformed|hang|flaky]
                                          [--die_after N] [--delay S]
script: {"answers": {question: answer given by the reasoner}, "verdicts": {question: judge reply}}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _text(messages: list) -> str:
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        else:
            out += [p.get("text", "") for p in c if p.get("type") == "text"]
            out += ["<image>" for p in c if p.get("type") == "image_url"]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--log", required=True)
    p.add_argument("--script", default="")
    p.add_argument("--mode", default="ok", choices=("ok", "500", "401", "malformed", "hang", "flaky"))
    p.add_argument("--die_after", type=int, default=0, help="exit (no reply) on request N+1")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each reply")
    a = p.parse_args()
    script = json.load(open(a.script)) if a.script else {}
    lock = threading.Lock()
    state = {"n": 0, "attempts": {}}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = _text(body["messages"])
            with lock:
                state["n"] += 1
                n = state["n"]
                key = hashlib.sha1(json.dumps([body["model"], body["messages"]]).encode()).hexdigest()
                state["attempts"][key] = attempt = state["attempts"].get(key, 0) + 1
                with open(a.log, "a") as f:
                    f.write(json.dumps({"n": n, "model": body["model"], "text": text[-300:], "key": key,
                                        "auth": self.headers.get("Authorization", "")}) + "\n")
            if a.die_after and n > a.die_after:
                os._exit(1)
            time.sleep(a.delay)
            if a.mode == "hang":
                time.sleep(3600)
            if a.mode == "401":
                return self._send(401, b'{"error": {"message": "Incorrect API key provided"}}')
            if a.mode == "500" or (a.mode == "flaky" and attempt == 1):
                return self._send(500, b'{"error": {"message": "scripted failure"}}')
            if a.mode == "malformed" or (a.mode == "flaky" and attempt == 2):
                return self._send(200, b'{"choices": [ not json')
            model = body["model"]
            content = ""
            if model == "captioner":
                content = "A drawing with shapes." if "<image>" in text else ""
            elif model == "reasoner":
                answer = next((v for k, v in script.get("answers", {}).items() if k in text), "unknown")
                content = f"<think>The caption says there are shapes, so the answer is {answer}.</think>\n" \
                          f"<answer>{answer}</answer>"
            elif model == "rewriter":
                content = "Looking at the image, I see the shapes and work out the answer."
            elif model == "judge":
                content = next((v for k, v in script.get("verdicts", {}).items() if k in text), "no")
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": max(1, len(content) // 4)}}
            self._send(200, json.dumps(reply).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"serving on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
