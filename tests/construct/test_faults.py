"""The client against failing server processes: a server killed mid-run (the rerun takes the finished
replies from the cache and asks the server only for the rest), the pipeline process killed mid-stage
(the same), 500s and malformed JSON (retried, then a per-record error counted in the report), a hung
server (timeout), a flaky one (retries succeed), a refused API key (the run stops)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from data_pipeline.construct import pipeline
from data_pipeline.construct.client import EndpointError
from tests.construct.conftest import REPO, construct_config, requests_logged, stub, write_sources

STAGES = ("caption", "distill", "rewrite", "verify")


def _sources(tmp_path, n: int):
    return write_sources(tmp_path / "src", [{"image": f"clevr_math/{i}.png", "question": f"[q{i:02d}] How many?",
                                             "gt": "3"} for i in range(n)])


def test_server_killed_mid_run_resumes_from_the_cache(tmp_path, servers):
    first, log1 = stub(tmp_path, "first", die_after=3)
    servers.append(first)
    config = construct_config(_sources(tmp_path, 6), dict.fromkeys(STAGES, first.url),
                              caption={"concurrency": 1, "retries": 1})
    out = tmp_path / "out"
    report = pipeline.run(config, out, stages="metadata,caption", progress=False)["caption"]
    assert first.proc.wait(timeout=10) != 0  # it died on its 4th request
    assert report["kept"] == 3 and report["dropped"] == {"request_failed:connection": 3}
    assert report["usage"]["failed"] == 3 and "cannot connect" in report["examples"]["request_failed:connection"][0]
    served = {r["key"] for r in requests_logged(log1)[:3]}

    second, log2 = stub(tmp_path, "second")  # a fresh process on another port: the cache keys name no URL
    servers.append(second)
    config.caption.base_url = second.url
    report = pipeline.run(config, out, stages="caption", progress=False)["caption"]
    asked = requests_logged(log2)
    assert report["kept"] == 6 and report["usage"]["cached"] == 3 and report["usage"]["sent"] == 3
    assert len(asked) == 3 and not served & {r["key"] for r in asked}


def test_killed_run_resumes_without_asking_twice(tmp_path, servers):
    """The pipeline process killed mid-stage (SIGKILL): the rerun asks only for what no reply was kept."""
    server, log = stub(tmp_path, delay=0.3)
    servers.append(server)
    records = _sources(tmp_path, 6)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "data_pipeline.construct", "--config", "configs/construct.py:local", "--out",
            str(out), "--stages", "metadata,caption", f"--config.input.path={records}",
            f"--config.caption.base_url={server.url}", "--config.caption.model=captioner",
            "--config.caption.concurrency=1"]
    run = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(requests_logged(log)) < 3 and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    first = [r["key"] for r in requests_logged(log)]
    assert 3 <= len(first) < 6 and not (out / "work" / "caption.jsonl").exists()

    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "reports" / "caption.json").read_text())
    second = [r["key"] for r in requests_logged(log)][len(first):]
    assert report["kept"] == 6 and report["usage"]["cached"] >= 2
    assert report["usage"]["sent"] == len(second) == 6 - report["usage"]["cached"]
    assert len(set(first + second)) == 6
    assert len(set(first) & set(second)) <= 1  # at most the request in flight when it was killed


def test_500s_and_malformed_json_are_retried_then_counted(tmp_path, servers):
    for mode, kind in (("500", "http_500"), ("malformed", "malformed_reply")):
        server, log = stub(tmp_path, mode, mode=mode)
        servers.append(server)
        config = construct_config(_sources(tmp_path, 3), dict.fromkeys(STAGES, server.url))
        report = pipeline.run(config, tmp_path / mode, stages="metadata,caption", progress=False)["caption"]
        assert report["kept"] == 0 and report["dropped"] == {f"request_failed:{kind}": 3}
        assert (report["usage"]["failed"], report["usage"]["retries"]) == (3, 6)  # 2 retries each
        assert len(requests_logged(log)) == 9 and "after 3 attempts" in report["examples"][f"request_failed:{kind}"][0]


def test_hung_server_times_out(tmp_path, servers):
    server, _ = stub(tmp_path, mode="hang")
    servers.append(server)
    config = construct_config(_sources(tmp_path, 2), dict.fromkeys(STAGES, server.url),
                              caption={"timeout_s": 0.5, "retries": 1})
    t0 = time.time()
    report = pipeline.run(config, tmp_path / "out", stages="metadata,caption", progress=False)["caption"]
    assert report["dropped"] == {"request_failed:timeout": 2} and time.time() - t0 < 10
    assert "timeout_s=0.5" in report["examples"]["request_failed:timeout"][0]


def test_flaky_server_succeeds_after_retries(tmp_path, servers, monkeypatch):
    server, log = stub(tmp_path, mode="flaky")  # each request: a 500, then malformed JSON, then the reply
    servers.append(server)
    monkeypatch.setenv("STUB_API_KEY", "sk-test")
    config = construct_config(_sources(tmp_path, 3), dict.fromkeys(STAGES, server.url),
                              caption={"api_key_env": "STUB_API_KEY"})
    report = pipeline.run(config, tmp_path / "out", stages="metadata,caption", progress=False)["caption"]
    assert report["kept"] == 3 and (report["usage"]["sent"], report["usage"]["retries"]) == (3, 6)
    assert len(requests_logged(log)) == 9 and {r["auth"] for r in requests_logged(log)} == {"Bearer sk-test"}


def test_refused_api_key_stops_the_run(tmp_path, servers):
    """A 401 is the endpoint's, not the record's: one error naming the endpoint, no record dropped for it,
    and no requests after those in flight (concurrency 2 of 8 records)."""
    server, log = stub(tmp_path, mode="401")
    servers.append(server)
    config = construct_config(_sources(tmp_path, 8), dict.fromkeys(STAGES, server.url),
                              caption={"concurrency": 2})
    with pytest.raises(EndpointError, match=r"/chat/completions \(model 'captioner'\): HTTP 401, the API key"):
        pipeline.run(config, tmp_path / "out", stages="metadata,caption", progress=False)
    assert len(requests_logged(log)) <= 2 * 2 and not (tmp_path / "out" / "work" / "caption.jsonl").exists()
