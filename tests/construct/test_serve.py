"""tools/serve.py hosting a tiny Qwen2.5-VL (real vocabulary, random weights) on 127.0.0.1 as the back end
of the construction pipeline: all six stages run, captions / rewrites / the judge from the served model
(batched: fewer engine calls than requests), the reasoning from the scripted stub (the tiny model's
text is nonsense), and the result loads with our loader; then every stage on the served model (its
distillations are dropped with their reasons); plus the server's answers to bad requests."""
from __future__ import annotations

import json
import shutil
import sys
import urllib.request

import pytest
import tensorflow_datasets as tfds

from data_pipeline.construct import pipeline
from data_pipeline.records import SPLIT_FILES, read_records
from data_pipeline.vlaa_thinking import build_vlaa_thinking
from tests.construct.conftest import REPO, Server, construct_config, post_chat, stub, write_sources

SAMPLED = {"model": "tiny", "temperature": 1.0, "seed": 0, "max_tokens": 8, "timeout_s": 300.0}


@pytest.fixture
def served(eval_hf_model, tmp_path, servers):
    server = Server([sys.executable, str(REPO / "tools" / "serve.py"), "--model", eval_hf_model[0], "--port", "0",
                     "--served_name", "tiny", "--slots", "2", "--max_tokens_cap", "64"], tmp_path / "serve.out",
                    timeout_s=180, env={"XLA_FLAGS": ""})
    servers.append(server)
    return server


@pytest.mark.slow  # about 50 s on 2 CPU cores, mostly XLA compiling the served model's programs
def test_pipeline_on_served_tiny_model(served, tmp_path, servers):
    reasoner, _ = stub(tmp_path, script={"answers": {"[q1]": "3", "[q2]": "3", "[q3]": "9", "[q4]": "B",
                                                     "[q5]": "A lamp."}})
    servers.append(reasoner)
    rows = [{"image": "clevr_math/a.png", "question": "[q1] How many objects are left?", "gt": "3"},
            {"image": "clevr_math/b.png", "question": "[q2] How many objects are left?", "gt": "3"},
            {"image": "clevr_math/c.png", "question": "[q3] How many objects are left?", "gt": "4"},
            {"image": "geoqa170k/a.png", "question": "[q4] Which? Choices: A. 1 B. 2 C. 3 D. 4", "gt": "B"},
            {"image": "allava_laion/a.png", "question": "[q5] What is shown?", "gt": "A lamp."}]
    urls = {"caption": served.url, "distill": reasoner.url, "rewrite": served.url, "verify": served.url}
    config = construct_config(write_sources(tmp_path / "src", rows), urls, caption=SAMPLED, rewrite=SAMPLED,
                              verify=SAMPLED)
    config.split.rl_fraction = 0.5
    out = tmp_path / "out"
    reports = pipeline.run(config, out, progress=False)

    for stage in ("caption", "rewrite"):
        u = reports[stage]["usage"]
        assert reports[stage]["kept"] == reports[stage]["in"] and u["sent"] == reports[stage]["in"]
        assert u["completion_tokens"] == 8 * u["sent"] and u["prompt_tokens"] > 20 * u["sent"]  # served usage
    verify = reports["verify"]
    assert verify["usage"]["sent"] == 1 and verify["dropped"].get("wrong_answer:digit") == 1
    assert verify["kept"] + sum(verify["dropped"].values()) == len(rows)
    with urllib.request.urlopen(served.url.removesuffix("/v1") + "/health") as r:
        calls = json.loads(r.read())["generate_calls"]
    assert calls < 2 * len(rows) + 1  # 11 requests, batched into fewer engine calls

    sft = read_records(out / SPLIT_FILES["sft"][0], split="sft")
    grpo = read_records(out / SPLIT_FILES["grpo"][0], split="grpo")
    assert len(sft) >= 1 and len(grpo) >= 2
    for split, want in (("sft", sft), ("grpo", grpo)):
        b = build_vlaa_thinking(split, manual_dir=out, data_dir=tmp_path / "tfds")
        assert sum(len(b.as_data_source(split=s, decoders={"image": tfds.decode.SkipDecoding()}))
                   for s in b.info.splits) == len(want)

    # every stage on the served model, the distiller too (in a copy of the run's cache: the captions come
    # from it): its nonsense has no <think> trace, so each record is dropped there with its reason
    out2 = tmp_path / "out2"
    out2.mkdir()
    shutil.copyfile(out / "cache.sqlite", out2 / "cache.sqlite")
    config.distill.base_url = served.url
    config.distill.update(SAMPLED)
    again = pipeline.run(config, out2, progress=False)
    assert again["caption"]["usage"]["cached"] == len(rows) and again["caption"]["usage"]["sent"] == 0
    assert again["distill"]["usage"]["sent"] == len(rows) and again["distill"]["usage"]["completion_tokens"] > 0
    assert again["distill"]["kept"] + sum(again["distill"]["dropped"].values()) == len(rows)
    assert set(again["distill"]["dropped"]) <= {"no_reasoning", "no_answer", "truncated"}

    # bad requests: named, with OpenAI-style error bodies; the model list
    status, body = post_chat(served.url, {"model": "other", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and "serves 'tiny'" in body["error"]["message"]
    status, body = post_chat(served.url, {"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert status == 400 and "stream" in body["error"]["message"]
    status, body = post_chat(served.url, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]})
    assert status == 400 and "base64" in body["error"]["message"]
    status, body = post_chat(served.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **{
        k: SAMPLED[k] for k in ("temperature", "seed")}})  # the sampling settings served above: compiled
    assert status == 200 and body["usage"]["completion_tokens"] <= 4 and body["choices"][0]["finish_reason"]
    with urllib.request.urlopen(served.url + "/models") as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny"]
