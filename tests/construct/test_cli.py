"""The one entry, `python -m data_pipeline.construct`, as a user runs it: the config file by path with
`--config.key=value` overrides (checked against the preset), a per-stage summary, and mistakes as one
`error:` line with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

from data_pipeline.records import SPLIT_FILES
from tests.construct.conftest import REPO, STAGE_MODELS, stub, write_sources


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline.construct", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_runs_the_stages_and_names_mistakes(tmp_path, servers):
    server, _ = stub(tmp_path, script={"answers": {"[q1]": "3", "[q2]": "4"}})
    servers.append(server)
    records = write_sources(tmp_path / "src", [{"image": "clevr_math/a.png", "question": "[q1] How many?", "gt": "3"},
                                               {"image": "clevr_math/b.png", "question": "[q2] How many?", "gt": "3"}])
    out = tmp_path / "out"
    overrides = [f"--config.input.path={records}"] + [
        flag for stage, model in STAGE_MODELS.items()
        for flag in (f"--config.{stage}.base_url={server.url}", f"--config.{stage}.model={model}")]
    run = _cli("--config", "configs/construct.py:local", "--out", str(out), *overrides)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["metadata", "caption", "distill", "rewrite", "verify", "split"]
    assert "dropped: wrong_answer:digit 1" in lines[4]
    sft = json.loads((out / SPLIT_FILES["sft"][0]).read_text())
    assert [r["question"] for r in sft] == ["[q1] How many?"] and (out / "images" / "clevr_math.tar.gz").is_file()

    bad = _cli("--config", "configs/construct.py:local", "--out", str(out), "--stages", "verify,captoin")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: --stages: unknown stage 'captoin'; the stages are metadata,caption,distill,rewrite,verify,split")
