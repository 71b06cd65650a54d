"""The demo data: the "visual" task set, written once per data directory (the shared default cache),
built by TFDS quietly (one line of ours), and the third-party log lines that say nothing dropped."""
from __future__ import annotations

import json
import logging
import tempfile

import ml_collections
from absl import logging as absl_logging

from data_pipeline.demo import ensure_demo_data
from data_pipeline.records import SPLIT_FILES
from data_pipeline.vlaa_thinking.vlaa_thinking import build_vlaa_thinking
from vlaa_jax.train import common


def test_visual_demo_written_once_and_built_quietly(tmp_path, capfd, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # what TFDS's temporary directories go under
    out = ensure_demo_data(tmp_path / "demo_data" / "visual", "visual")
    grpo = [json.loads(l) for l in open(out / SPLIT_FILES["grpo"][0])]
    assert {r["verifier_type"] for r in grpo} == {"digit", "mcq", "math", "iou"}  # no unscored open-ended
    assert any(r["question"].startswith("What colour are the shapes?") for r in grpo)
    stamp = (out / SPLIT_FILES["grpo"][0]).stat().st_mtime_ns
    assert ensure_demo_data(out, "visual") == out and (out / SPLIT_FILES["grpo"][0]).stat().st_mtime_ns == stamp
    assert [p.name for p in out.parent.iterdir()] == ["visual"]  # no temporary directory left behind
    capfd.readouterr()
    build_vlaa_thinking("grpo", manual_dir=out, data_dir=out / "tfds")
    captured = capfd.readouterr()
    assert captured.out.splitlines() == [f"building vlaa_thinking/grpo in {out}/tfds/vlaa_thinking/grpo/1.0.0 "
                                         f"from {out} (once per data dir)"]
    assert "Downloading and preparing" not in captured.out + captured.err
    build_vlaa_thinking("grpo", manual_dir=out, data_dir=out / "tfds")
    assert capfd.readouterr().out == ""  # prepared: nothing at all
    assert list(scratch.iterdir()) == []  # no empty /tmp/tmp*tfds left by a GCS look-up per build


def test_demo_data_dir_defaults_to_the_shared_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLAA_JAX_CACHE", str(tmp_path / "cache"))
    c = ml_collections.ConfigDict({"data": {"dir": "", "source": "demo", "demo_tasks": "visual"}})
    assert common.data_dir(c, "/runs/a") == str(tmp_path / "cache" / "demo_data" / "visual")
    c.data.dir = "/mine"
    assert common.data_dir(c, "/runs/a") == "/mine"


def test_third_party_noise_is_dropped(caplog):
    with caplog.at_level(logging.WARNING, logger="absl"):
        absl_logging.warning("[process=%s][thread=%s] Skipping merge of OCDBT checkpoints: No per-process OCDBT "
                             "checkpoint subdirs found in %s, ", 0, "MainThread", "/x")
        absl_logging.warning("Variant folder %s has no %s", "/x/1.0.0", "dataset_info.json")
        absl_logging.warning("Metadata file does not exist: %s", "/run/checkpoints/5/state/_CHECKPOINT_METADATA")
        absl_logging.warning("a warning that %s", "stays")
    assert "OCDBT" not in caplog.text and "Variant folder" not in caplog.text and "Metadata file" not in caplog.text
    assert "a warning that stays" in caplog.text
