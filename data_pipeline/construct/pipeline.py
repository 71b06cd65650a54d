"""Runs the construction stages in order over an output directory (resumable; package docstring).

    out/work/<stage>.jsonl           the records a stage kept (the next stage's input)
    out/work/<stage>.dropped.jsonl   the records it dropped: id, reason, detail, origin
    out/reports/<stage>.json         its report (in / kept / dropped by reason / requests and tokens)
    out/report.json                  every stage's latest report
    out/cache.sqlite                 the replies of every request (client.Cache)
    out/VLAA-Thinking-SFT-126K.json, out/VLAA-Thinking-GRPO-25K.json, out/images/<source>.tar.gz  (split)
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipeline.construct.client import Cache, EndpointConfig
from data_pipeline.construct.stages import RUNNERS, STAGES, Context, StageResult


def parse_stages(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """`--stages caption,distill` -> the stages in pipeline order; all of them for None / ""."""
    if not text:
        return STAGES
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ValueError(f"--stages: unknown stage {unknown[0]!r}; the stages are {','.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a killed run never leaves half a stage output


def summary_line(report: dict[str, Any]) -> str:
    u = report.get("usage")
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
    line = f"{report['stage']}: {report['in']} in, {report['kept']} kept, dropped: {dropped}"
    if u:
        line += (f"; {u['sent']} requests ({u['failed']} failed, {u['retries']} retries), {u['cached']} from the "
                 f"cache; {u['total_tokens']} tokens ({u['prompt_tokens']} prompt + {u['completion_tokens']} "
                 f"completion)")
    return line + f"; {report['wall_s']:.1f} s"


def run(config: Any, out: str | os.PathLike, stages: str | Sequence[str] | None = None, *,
        progress: bool = True, echo: bool = True) -> dict[str, Any]:
    """Runs `stages` (default all) of `config` (a configs/construct.py preset) in `out`; returns
    {stage: report}. A stage's input is its predecessor's output in `out/work`."""
    out = Path(out)
    chosen = parse_stages(stages)
    for stage in chosen:  # every endpoint (and its API key) checked before any request is paid for
        if stage in ("caption", "distill", "rewrite") or (stage == "verify" and config.verify.open_ended == "judge"):
            EndpointConfig.from_config(config[stage], stage).api_key()
    (out / "work").mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(exist_ok=True)
    cache = Cache(out / "cache.sqlite")
    ctx = Context(config, out, cache, progress=progress)
    reports: dict[str, Any] = {}
    try:
        for stage in chosen:
            i = STAGES.index(stage)
            records: list[dict] = []
            if i:
                prev = out / "work" / f"{STAGES[i - 1]}.jsonl"
                if not prev.is_file():
                    raise ValueError(f"stage {stage} reads the output of stage {STAGES[i - 1]} ({prev}), which is "
                                     f"not there: run --stages {STAGES[i - 1]} first (or all stages)")
                records = _read_jsonl(prev)
            t0 = time.time()
            result: StageResult = RUNNERS[stage](ctx, records)
            n_in = len(records) if i else len(result.kept) + len(result.dropped)  # metadata: the source rows
            report = {**result.report(n_in), "wall_s": time.time() - t0}
            _write_jsonl(out / "work" / f"{stage}.jsonl", result.kept)
            _write_jsonl(out / "work" / f"{stage}.dropped.jsonl", result.dropped)
            (out / "reports" / f"{stage}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            reports[stage] = report
            if echo:
                print(summary_line(report), flush=True)
    finally:
        cache.close()
        merged_path = out / "report.json"
        merged = json.loads(merged_path.read_text()) if merged_path.is_file() else {}
        merged.update(reports)
        merged_path.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    return reports
