"""Helpers of the construction tests: server processes on 127.0.0.1 (the scripted stub, tools/serve.py),
source records with drawn images, and a configs/construct.py preset pointed at the servers."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vlaa_jax.command_line import load_preset

REPO = Path(__file__).resolve().parents[2]
STUB = Path(__file__).with_name("stub_server.py")
STAGE_MODELS = {"caption": "captioner", "distill": "reasoner", "rewrite": "rewriter", "verify": "judge"}


def post_chat(url: str, body: dict, timeout_s: float = 300.0) -> tuple[int, dict]:
    """(HTTP status, JSON reply) of POST <url>/chat/completions, error statuses included."""
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Server:
    """A server process; `url` is its base URL (read from the line it prints when it listens)."""

    def __init__(self, cmd: list[str], log: Path, timeout_s: float = 120.0, env: dict | None = None):
        self.log = log  # its stdout + stderr (a file, so a chatty server never blocks on a full pipe)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                         env={**os.environ, **(env or {})})
        deadline = time.time() + timeout_s
        self.url = None
        while time.time() < deadline and self.proc.poll() is None:
            m = re.search(r"(http://127\.0\.0\.1:\d+/v1)", log.read_text())
            if m:
                self.url = m.group(1)
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server {cmd} did not start: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def stub(tmp_path: Path, name: str = "stub", script: dict | None = None, **flags) -> tuple[Server, Path]:
    log = tmp_path / f"{name}.log"
    cmd = [sys.executable, str(STUB), "--log", str(log)]
    if script is not None:
        (tmp_path / f"{name}.json").write_text(json.dumps(script))
        cmd += ["--script", str(tmp_path / f"{name}.json")]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    return Server(cmd, tmp_path / f"{name}.out", timeout_s=30), log


def requests_logged(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def write_sources(root: Path, rows: list[dict]) -> Path:
    """`rows` (image: "<source>/<name>.png" drawn here, question, gt, ...) as records.jsonl under root."""
    for i, r in enumerate(rows):
        path = root / r["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (112, 84), (40 * (i % 6), 90, 200 - 20 * (i % 8)))
        ImageDraw.Draw(img).rectangle((10 + i, 10, 60, 50), fill=(250, 250, 0))
        img.save(path)
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "records.jsonl"


def construct_config(records: Path, urls: dict[str, str], **stage_overrides):
    """configs/construct.py:local with each stage at urls[stage] (the stub's model names unless given),
    short timeouts and back-offs so failures are quick."""
    c = load_preset("configs/construct.py:local")
    c.input.path = str(records)
    for stage, model in STAGE_MODELS.items():
        block = c[stage]
        block.base_url, block.model = urls[stage], model
        block.timeout_s, block.retries, block.backoff_s, block.backoff_max_s = 10.0, 2, 0.01, 0.05
        block.concurrency = 4
        for k, v in stage_overrides.get(stage, {}).items():
            block[k] = v
    return c


@pytest.fixture
def servers():
    """Servers started by a test (Server objects appended to the list) are killed after it."""
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()
