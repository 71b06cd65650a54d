"""benchmarks/run.py: child-process pairs, error rows, the table and the RESULTS.md section."""
from __future__ import annotations

import json
import textwrap

import pytest

from benchmarks import run as suite


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path.name


@pytest.fixture
def pairs(tmp_path, monkeypatch):
    ok = _script(tmp_path, "ok.py", """
        import json, sys
        print("log line")
        print(json.dumps({"pair": "ok", "metric": "x/s", "lower_is_better": False, "ours": 3.0, "theirs": 1.0,
                          "ratio": 3.0, "target": ">= 2.0", "met": True, "quick": "--quick" in sys.argv}))
        """)
    bad = _script(tmp_path, "bad.py", """
        import sys
        print("something broke", file=sys.stderr)
        sys.exit(3)
        """)
    monkeypatch.setattr(suite, "HERE", str(tmp_path))
    monkeypatch.setattr(suite, "PAIRS", {"ok": ok, "bad": bad})


def test_pairs_run_as_children_and_errors_are_rows(pairs, tmp_path, capsys):
    md = tmp_path / "RESULTS.md"
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--quick", "--markdown", str(md), "--out", str(tmp_path / "r.json")])
    assert exit_.value.code == 1  # a pair that failed to run fails the suite
    report = json.loads((tmp_path / "r.json").read_text())
    ok, bad = report["pairs"]
    assert ok["ratio"] == 3.0 and ok["quick"] is True and ok["wall_s"] >= 0
    assert "exit status 3" in bad["error"] and "something broke" in bad["error"]
    text = md.read_text()
    assert "| ok | x/s | 3 | 1 | 3 | >= 2.0 | yes |" in text and "| bad | ERROR: exit status 3" in text
    assert "ok" in capsys.readouterr().err  # the plain table


def test_only_selects_and_rejects_unknown(pairs, capsys):
    report = suite.main(["--only", "ok"])
    assert [r["pair"] for r in report["pairs"]] == ["ok"]
    with pytest.raises(SystemExit):
        suite.main(["--only", "nope"])
