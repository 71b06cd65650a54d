"""Mistakes on the main job's command line (vlaa_jax.command_line): each is exit code 2 and one `error:`
line naming the thing and the fix, never a traceback; `--help` lists modes, presets and overrides, exit 0.

The checks before absl parses the flags run in this process (`main._parse_flags`); the ones that need
absl or the run's config check, and --help, run as real processes started together (about one start-up
of wall time); none gets as far as building a model."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.train.helpers import REPO
from vlaa_jax import main

MAIN = [sys.executable, "-m", "vlaa_jax.main"]
# (argv after `python -m vlaa_jax.main`, words the one error line must hold)
CASES = {
    "misspelt file": (["--config", "configs/grpoo.py:demo"], ["'configs/grpoo.py' not found", "'configs/grpo.py'"]),
    "missing file": (["--config", "/nonexistent/cfg.py:demo"], ["'/nonexistent/cfg.py' not found", "configs/sft.py"]),
    "unknown preset": (["--config", "configs/grpo.py:dem"], ["unknown preset 'dem'", "'demo'", "vlaa_thinker_3b"]),
    "unknown key": (["--config", "configs/grpo.py:demo", "--config.train.num_step=3"],
                    ["'train.num_step' is unknown", "'train.num_steps'"]),
    "unknown block": (["--config", "configs/sft.py:demo", "--config.trian.num_steps=3"],
                      ["'trian.num_steps' is unknown", "'train'"]),
    "ill-typed key": (["--config", "configs/grpo.py:demo", "--config.train.num_steps=abc"],
                      ["'train.num_steps' takes an int", "'abc'"]),
    "bad mode": (["--config", "configs/grpo.py:demo", "--config.mode=evl"], ["'mode'", "'evl'", "'eval'"]),
    "no workdir": (["--config", "configs/grpo.py:demo"], ["--workdir is required"]),
    "no config": ([], ["--config is required", "--help"]),
    "stray argument": (["--config", "configs/sft.py:demo", "extra"], ["unexpected arguments", "'extra'"]),
}


IN_PROCESS = ("misspelt file", "missing file", "unknown preset", "unknown key", "unknown block", "no config")


def _one_error_line(name: str, rc: int, err: str, words: list[str]) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"{name}: rc {rc}\n{err[-3000:]}"
    assert "Traceback" not in err
    assert all(w in lines[0] for w in words), f"{name}: {lines[0]}"


@pytest.mark.parametrize("name", IN_PROCESS)
def test_mistake_before_parsing(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/... is found in the project directory from anywhere
    argv, words = CASES[name]
    with pytest.raises(SystemExit) as e:
        main._parse_flags(["main"] + argv + ["--workdir", str(tmp_path)])
    _one_error_line(name, e.value.code, capsys.readouterr().err, words)


def test_mistakes_as_processes_and_help(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    procs = {}
    for name, (argv, _) in CASES.items():
        if name in IN_PROCESS:
            continue
        workdir = [] if name == "no workdir" else ["--workdir", str(tmp_path / name.replace(" ", "_"))]
        # Half the cases run from another directory: configs/... is found in the project directory.
        cwd = other_dir if len(procs) % 2 else REPO
        procs[name] = subprocess.Popen(MAIN + argv + workdir, cwd=cwd, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs["help"] = subprocess.Popen(MAIN + ["--help"], cwd=other_dir, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {name: (p.wait(timeout=180), *p.communicate()) for name, p in procs.items()}
    for name, (_, words) in CASES.items():
        if name not in IN_PROCESS:
            rc, out, err = results[name]
            _one_error_line(name, rc, err, words)
    rc, out, err = results["help"]
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    for words in ("sft", "grpo", "eval", "generate", "configs/grpo.py: demo, vlaa_thinker_3b, vlaa_thinker_7b",
                  "configs/sft.py: demo", "--config.KEY=VALUE"):
        assert words in out, words
    assert not any((tmp_path / n.replace(" ", "_") / "checkpoints").exists() for n in CASES)  # nothing was built
