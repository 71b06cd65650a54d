"""The six stages of VLAA-Thinking data construction (the paper's pipeline; package docstring).

Each stage reads the records its predecessor kept (`work/<stage>.jsonl` in the output directory) and
writes its own kept records, its dropped ones with their reasons (`work/<stage>.dropped.jsonl`) and a
report (`reports/<stage>.json`). A record is a dict that gains fields stage by stage:
    metadata  id, source, image (absolute path), question, gt, verifier_type, origin ("file:line")
    caption   caption, caption_model
    distill   reasoning (the distiller's trace), answer, ds_answer ("<think>..</think><answer>..</answer>")
    rewrite   response (the rewritten trace + the same answer, tagged)
    verify    verified_by ("digit" / "mcq" / "math" / "iou" rule, or "judge", or "unjudged")
    split     (the released layout in the output directory, see data_pipeline.release)
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import json
import mimetypes
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data_pipeline.construct.client import Cache, ChatClient, EndpointConfig, Reply, RequestError, Usage, run_requests
from data_pipeline.image import decode_image
from data_pipeline.records import (DataError, SOURCE_VERIFIER, iter_raw_json, normalize_image_path,
                                   normalize_verifier_type)
from data_pipeline.release import write_release
from vlaa_jax.rewards.extract import extract_answer
from vlaa_jax.rewards.mixed import MixedReward, RewardConfig

STAGES = ("metadata", "caption", "distill", "rewrite", "verify", "split")
TEMPLATES_DIR = Path(__file__).parent / "templates"
TEMPLATE_OF = {"caption": "caption.txt", "distill": "distill.txt", "rewrite": "rewrite.txt", "verify": "judge.txt"}
# The paper's per-source counts (SFT, RL), Table 1 / the dataset card: the optional target of `split`.
PAPER_COUNTS: dict[str, tuple[int, int]] = {
    "clevr_math": (5923, 2000), "geoqa170k": (0, 6499), "synthesis": (19258, 6696), "arxivqa": (34604, 1000),
    "docvqa": (4897, 1000), "vizwiz": (4266, 1000), "allava_laion": (10496, 3000), "coco": (8727, 2000),
    "vg": (38242, 2000),
}
_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_FILE_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
_THINK = re.compile(r"<think>(.*?)</think>(.*)", re.DOTALL)
_TAGS = re.compile(r"</?(think|answer)>")


# ---------------------------------------------------------------------------------------- configs
def _typed(cls: type, block: Mapping[str, Any], where: str, names: Sequence[str] | None = None):
    fields = {f.name for f in dataclasses.fields(cls)}
    items = {k: v for k, v in dict(block).items() if names is None or k in names}
    unknown = sorted(set(items) - fields)
    if unknown:
        raise ValueError(f"config {where}: unknown keys {unknown}; known: {sorted(fields)}")
    try:
        return cls(**items)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config {where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Where the source records are: a JSON / JSON Lines file of records, or a CSV beside a folder of
    images. Keys: image (path, relative to images_root), question, gt (ground_truth), and optional
    id, source (default: the image path's first folder, else `source`), verifier_type (default: the
    source's, data_pipeline.records.SOURCE_VERIFIER)."""
    path: str = ""
    images_root: str = ""          # "" = the directory of `path`
    source: str = ""               # source of records that name none and whose image path has no folder
    skip_bad_records: bool = False  # False: the first bad record stops the run; True: dropped, counted


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    iou_threshold: float = 0.5     # an iou answer is correct at IoU >= this
    open_ended: str = "judge"      # judge: the LLM judge decides; keep: open-ended answers pass unjudged

    def __post_init__(self):
        if self.open_ended not in ("judge", "keep"):
            raise ValueError(f"open_ended must be 'judge' or 'keep', got {self.open_ended!r}")
        if not 0 < self.iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold!r}")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    rl_fraction: float = 0.2       # per source, this share of the verified records goes to the RL (GRPO) split
    target: str = ""               # "paper": per-source caps from PAPER_COUNTS (sources not there: rl_fraction)
    seed: int = 0                  # which records go where (a hash of seed and id)

    def __post_init__(self):
        if not 0 <= self.rl_fraction <= 1:
            raise ValueError(f"rl_fraction must be in [0, 1], got {self.rl_fraction!r}")
        if self.target not in ("", "paper"):
            raise ValueError(f"target must be '' or 'paper', got {self.target!r}")


@dataclasses.dataclass(frozen=True)
class Template:
    """A stage's prompt: an optional `[system]` section and the `[user]` text, with {placeholders}."""
    path: str
    system: str | None
    user: str

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Template":
        path = os.fspath(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"prompt template {path}: {e.strerror or e}") from None
        system, user = None, text
        if text.lstrip().startswith("[system]"):
            head, sep, user = text.lstrip()[len("[system]"):].partition("\n[user]\n")
            if not sep:
                raise ValueError(f"prompt template {path}: a [system] section needs a [user] line after it")
            system = head.strip()
        elif text.lstrip().startswith("[user]"):
            user = text.lstrip()[len("[user]"):]
        return cls(path, system, user.strip())

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.system}\0{self.user}".encode()).hexdigest()[:16]

    def render(self, **values: str) -> tuple[str | None, str]:
        def sub(text: str) -> str:
            def one(m: re.Match) -> str:
                if m.group(1) not in values:
                    raise ValueError(f"prompt template {self.path}: unknown placeholder {{{m.group(1)}}}; this "
                                     f"stage fills {', '.join('{' + k + '}' for k in sorted(values))}")
                return str(values[m.group(1)])
            return _PLACEHOLDER.sub(one, text)
        return (sub(self.system) if self.system else None), sub(self.user)


def template_of(config: Any, stage: str) -> Template:
    path = str(config[stage].get("template", "") or "") or str(TEMPLATES_DIR / TEMPLATE_OF[stage])
    return Template.load(path)


# --------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class StageResult:
    """What a stage hands on (kept records) and what it reports (dropped ones with reasons, usage)."""
    stage: str
    kept: list[dict]
    dropped: list[dict] = dataclasses.field(default_factory=list)  # {id, reason, detail}
    usage: Usage | None = None
    model: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def drop(self, record: Mapping[str, Any], reason: str, detail: str = "") -> None:
        self.dropped.append({"id": record.get("id"), "reason": reason, "detail": detail[:500],
                             "origin": record.get("origin", "")})

    def report(self, n_in: int) -> dict[str, Any]:
        reasons = Counter(d["reason"] for d in self.dropped)
        examples: dict[str, list[str]] = {}
        for d in self.dropped:
            lst = examples.setdefault(d["reason"], [])
            if len(lst) < 3:
                lst.append(f"{d['id']}: {d['detail']}" if d["detail"] else str(d["id"]))
        out = {"stage": self.stage, "model": self.model, "in": n_in, "kept": len(self.kept),
               "dropped": dict(sorted(reasons.items())), "dropped_total": len(self.dropped), "examples": examples}
        if self.usage is not None:
            out["usage"] = self.usage.to_json()
        out.update(self.extra)
        return out


class Context:
    """A run's shared state: config, output directory, the reply cache, one client per stage."""

    def __init__(self, config: Any, out: Path, cache: Cache, progress: bool = True):
        self.config, self.out, self.cache, self.progress = config, out, cache, progress

    def endpoint(self, stage: str) -> EndpointConfig:
        return EndpointConfig.from_config(self.config[stage], stage)

    def ask(self, stage: str, result: StageResult, records: Sequence[dict], messages: Sequence[list[dict]]
            ) -> list[Reply | None]:
        """Replies for records (None where the request failed: dropped as request_failed:<kind>)."""
        endpoint = self.endpoint(stage)
        result.model, result.usage = endpoint.model, Usage()
        replies = run_requests(stage, [(r["id"], m) for r, m in zip(records, messages)], ChatClient(endpoint),
                               self.cache, result.usage, progress=self.progress)
        out: list[Reply | None] = []
        for r, rep in zip(records, replies):
            if isinstance(rep, RequestError):
                result.drop(r, f"request_failed:{rep.kind}", str(rep))
                out.append(None)
            else:
                out.append(rep)
        return out


def _chat(system: str | None, user: Any) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def format_response(reasoning: str, answer: str) -> str:
    """The released records' response shape."""
    return f"<think>\n{reasoning.strip()}\n</think>\n<answer>{answer.strip()}</answer>"


# ----------------------------------------------------------------------------------- 1. metadata
def _source_rows(cfg: InputConfig) -> tuple[str, list[tuple[int, Any]]]:
    path = cfg.path
    if not path:
        raise ValueError("config input.path is empty: give a JSON / JSON Lines file of records, or a CSV file "
                         "(with input.images_root the folder of its images)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config input.path {path!r}: {'a directory' if os.path.isdir(path) else 'no such file'}")
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [k for k in ("image", "question") if k not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"CSV header has no column {missing[0]!r} (columns: {reader.fieldnames})",
                                kind="missing_field", file=path, line=1, field=missing[0])
            return path, [(reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}) for row in reader]
    return path, list(iter_raw_json(path))


def metadata(ctx: Context, _records: Sequence[dict]) -> StageResult:
    cfg: InputConfig = _typed(InputConfig, ctx.config.input, "input")
    path, rows = _source_rows(cfg)
    root = Path(cfg.images_root or os.path.dirname(os.path.abspath(path)))
    result = StageResult("metadata", [])
    seen: dict[str, str] = {}
    for line, raw in rows:
        try:
            rec = _metadata_record(raw, path, line, root, cfg)
            if rec["id"] in seen:
                raise DataError(f"id already used by the record at {seen[rec['id']]}", kind="duplicate_id",
                                file=path, line=line, field="id", record_id=rec["id"])
            seen[rec["id"]] = rec["origin"]
            result.kept.append(rec)
        except DataError as e:
            if not cfg.skip_bad_records:
                raise
            result.drop({"id": e.record_id, "origin": f"{path}:{line}"}, e.kind, str(e))
    # A ground truth that fails its own verifier would drop its record at verify whatever the models say:
    # caught here, before any request is paid for.
    rule = [r for r in result.kept if r["verifier_type"] != "open_ended"]
    bad = {}
    for r, score in zip(rule, rule_scores(rule, [format_response("", r["gt"]) for r in rule])):
        if isinstance(score, str) or score < 1.0 - 1e-6:
            why = score if isinstance(score, str) else f"scores {score:.3f} against itself"
            e = DataError(f"the ground truth does not pass its own {r['verifier_type']} verifier ({why}); fix it or "
                          "the record's verifier_type", kind="unverifiable_gt", file=path,
                          line=int(r["origin"].rpartition(":")[2]), field="gt", record_id=r["id"])
            if not cfg.skip_bad_records:
                raise e
            bad[r["id"]] = e
    if bad:
        result.kept = [r for r in result.kept if r["id"] not in bad]
        for rid, e in bad.items():
            result.drop({"id": rid, "origin": f"{e.file}:{e.line}"}, e.kind, str(e))
    return result


def _metadata_record(raw: Any, path: str, line: int, root: Path, cfg: InputConfig) -> dict:
    if isinstance(raw, DataError):
        raise raw
    where = {"file": path, "line": line, "record_id": str(raw["id"]) if isinstance(raw, dict) and raw.get("id")
             is not None else None}
    if not isinstance(raw, dict):
        raise DataError(f"expected a JSON object, got {type(raw).__name__}", kind="malformed_json", **where)
    image = normalize_image_path(raw.get("image"), **where)
    for key in ("question",):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise DataError("missing or empty", kind="missing_field", field=key, **where)
    gt = raw.get("gt", raw.get("ground_truth"))
    if gt is None or (isinstance(gt, str) and not gt.strip()) or (isinstance(gt, (list, dict)) and not gt):
        raise DataError("missing or empty ground truth", kind="missing_field", field="gt", **where)
    source = str(raw.get("source") or (image.split("/", 1)[0] if "/" in image else cfg.source)).strip().lower()
    if not _SOURCE_NAME.match(source):
        raise DataError(f"source {source!r} is not a name of lower-case letters, digits and _ (it names "
                        "images/<source>.tar.gz); give the record a `source` or set input.source",
                        kind="bad_field", field="source", **where)
    if raw.get("verifier_type") is not None:
        verifier = normalize_verifier_type(raw["verifier_type"], **where)
    elif source in SOURCE_VERIFIER:
        verifier = SOURCE_VERIFIER[source]
    else:
        raise DataError(f"no verifier_type and source {source!r} has no known one; give the record a "
                        "verifier_type (digit, mcq, math, iou, open_ended)", kind="missing_field",
                        field="verifier_type", **where)
    file = root / image
    if not file.is_file():
        raise DataError(f"image {str(file)!r} not found (image paths are relative to input.images_root, "
                        f"{str(root)!r})", kind="missing_image", field="image", **where)
    with decode_image(file.read_bytes(), name=str(file)) as img:  # the training data's image checks
        w, h = img.size
    gt_text = gt if isinstance(gt, str) else json.dumps(gt)
    question = raw["question"].strip()
    digest = hashlib.sha1(f"{image}\n{question}".encode()).hexdigest()[:12]
    rid = str(raw["id"]) if raw.get("id") is not None else f"{source}-{digest}"
    return {"id": rid, "source": source, "image": str(file), "width": w, "height": h, "question": question,
            "gt": gt_text, "verifier_type": verifier, "origin": f"{path}:{line}"}


# ------------------------------------------------------------------------------------ 2. caption
def _data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def caption(ctx: Context, records: Sequence[dict]) -> StageResult:
    t = template_of(ctx.config, "caption")
    result = StageResult("caption", [], extra={"template": t.path, "template_hash": t.digest})
    messages = []
    for r in records:
        system, user = t.render(question=r["question"])
        messages.append(_chat(system, [{"type": "image_url", "image_url": {"url": _data_url(r["image"])}},
                                       {"type": "text", "text": user}]))
    for r, rep in zip(records, ctx.ask("caption", result, records, messages)):
        if rep is None:
            continue
        if not rep.content.strip():
            result.drop(r, "empty_caption")
            continue
        result.kept.append({**r, "caption": rep.content.strip(), "caption_model": result.model})
    return result


# ------------------------------------------------------------------------------------ 3. distill
def split_reasoning(reply: Reply) -> tuple[str, str] | str:
    """(reasoning, answer) of a reasoning model's reply, or the reason it has none: the reasoning is
    `reasoning_content` (a server's reasoning parser) or the `<think>` part (R1 may omit the opening
    tag); the answer is the single `<answer>` part of the rest, else the rest."""
    text = reply.content
    if reply.reasoning.strip():
        reasoning, rest = reply.reasoning, text
    elif (m := _THINK.search(text)) is not None:
        reasoning, rest = m.group(1), m.group(2)
    elif "</think>" in text:
        reasoning, _, rest = text.partition("</think>")
    else:
        return "truncated" if reply.finish_reason == "length" else "no_reasoning"
    if not reasoning.strip():
        return "no_reasoning"
    answer = extract_answer(rest) if "<answer>" in rest or "</answer>" in rest else rest.strip()
    if not answer:
        return "truncated" if reply.finish_reason == "length" else "no_answer"
    return reasoning.strip(), answer


def distill(ctx: Context, records: Sequence[dict]) -> StageResult:
    t = template_of(ctx.config, "distill")
    result = StageResult("distill", [], extra={"template": t.path, "template_hash": t.digest})
    messages = [_chat(*t.render(question=r["question"], caption=r["caption"])) for r in records]
    for r, rep in zip(records, ctx.ask("distill", result, records, messages)):
        if rep is None:
            continue
        parsed = split_reasoning(rep)
        if isinstance(parsed, str):
            result.drop(r, parsed, rep.content[:300])
            continue
        reasoning, answer = parsed
        result.kept.append({**r, "reasoning": reasoning, "answer": answer,
                            "ds_answer": format_response(reasoning, answer)})
    return result


# ------------------------------------------------------------------------------------ 4. rewrite
def rewrite(ctx: Context, records: Sequence[dict]) -> StageResult:
    """The trace told as seen in the image, fluent; the answer is the distiller's, kept by construction."""
    t = template_of(ctx.config, "rewrite")
    result = StageResult("rewrite", [], extra={"template": t.path, "template_hash": t.digest})
    messages = [_chat(*t.render(question=r["question"], reasoning=r["reasoning"], answer=r["answer"],
                                caption=r["caption"])) for r in records]
    for r, rep in zip(records, ctx.ask("rewrite", result, records, messages)):
        if rep is None:
            continue
        text = rep.content
        m = _THINK.search(text)
        text = m.group(1) if m else text.split("<answer>")[0]
        text = _TAGS.sub("", text).strip()
        if not text:
            result.drop(r, "empty_rewrite", rep.content[:300])
            continue
        result.kept.append({**r, "response": format_response(text, r["answer"])})
    return result


# ------------------------------------------------------------------------------------- 5. verify
def judge_verdict(text: str) -> bool | None:
    """The judge's yes / no (its first word), None when it said neither."""
    m = re.match(r"\W*([A-Za-z]+)", text)
    word = m.group(1).lower() if m else ""
    return {"yes": True, "no": False}.get(word)


def rule_scores(records: Sequence[dict], responses: Sequence[str]) -> list[float | str]:
    """The GRPO reward's rule verifier (vlaa_jax.rewards.MixedReward, by each record's verifier_type) of
    each response; for a record the verifier refuses (a ground truth that is not one number, not a box,
    ...) its message instead. Boxes in pixels are read in the image's own frame."""
    if not records:
        return []
    reward = MixedReward(RewardConfig(num_workers=1))

    def score(rows: Sequence[dict], texts: Sequence[str]) -> list[float]:
        hw = [((r["height"], r["width"]), (r["height"], r["width"])) for r in rows]
        return [float(x) for x in reward(list(texts), list(rows), image_hw=hw)[0]]

    try:
        return list(score(records, responses))
    except ValueError:  # find the records it refuses, one by one
        out: list[float | str] = []
        for r, text in zip(records, responses):
            try:
                out += score([r], [text])
            except ValueError as e:
                out.append(str(e).partition("): ")[2] or str(e))
        return out


def verify(ctx: Context, records: Sequence[dict]) -> StageResult:
    """Rule verifiers (vlaa_jax.rewards, the GRPO reward's) for digit / mcq / math / iou; the LLM judge (or
    nothing, verify.open_ended='keep') for open-ended answers."""
    cfg: VerifyConfig = _typed(VerifyConfig, ctx.config.verify, "verify", ("iou_threshold", "open_ended"))
    result = StageResult("verify", [])
    rule = [r for r in records if r["verifier_type"] != "open_ended"]
    opened = [r for r in records if r["verifier_type"] == "open_ended"]
    if rule:
        for r, s in zip(rule, rule_scores(rule, [r["response"] for r in rule])):
            need = cfg.iou_threshold if r["verifier_type"] == "iou" else 1.0
            if extract_answer(r["response"]) is None:
                result.drop(r, "no_answer", r["response"][-200:])
            elif isinstance(s, str):
                result.drop(r, "unverifiable_gt", s)
            elif s >= need - 1e-9:
                result.kept.append({**r, "verified_by": r["verifier_type"]})
            else:
                result.drop(r, f"wrong_answer:{r['verifier_type']}",
                            f"answer {r['answer']!r} vs ground truth {r['gt']!r} (score {s:.3f})")
    if opened and cfg.open_ended == "keep":
        result.kept += [{**r, "verified_by": "unjudged"} for r in opened]
    elif opened:
        t = template_of(ctx.config, "verify")
        result.extra.update(template=t.path, template_hash=t.digest)
        messages = [_chat(*t.render(question=r["question"], ground_truth=r["gt"], answer=r["answer"],
                                    caption=r["caption"])) for r in opened]
        for r, rep in zip(opened, ctx.ask("verify", result, opened, messages)):
            if rep is None:
                continue
            verdict = judge_verdict(rep.content)
            if verdict is None:
                result.drop(r, "judge_unparsable", rep.content[:200])
            elif not verdict:
                result.drop(r, "judge_rejected", f"answer {r['answer']!r} vs ground truth {r['gt']!r}")
            else:
                result.kept.append({**r, "verified_by": "judge"})
    order = {r["id"]: i for i, r in enumerate(records)}
    result.kept.sort(key=lambda r: order[r["id"]])
    return result


# -------------------------------------------------------------------------------------- 6. split
def _rank(seed: int, rid: str) -> str:
    return hashlib.sha256(f"{seed}\0{rid}".encode()).hexdigest()


def split(ctx: Context, records: Sequence[dict]) -> StageResult:
    """The verified records into the SFT and RL splits, per source, written in the released layout."""
    cfg: SplitConfig = _typed(SplitConfig, ctx.config.split, "split")
    by_source: dict[str, list[dict]] = {}
    for r in records:
        by_source.setdefault(r["source"], []).append(r)
    rows: dict[str, list[dict]] = {"sft": [], "grpo": []}
    images: dict[str, list[tuple[str, Path]]] = {}  # read one at a time while the tars are written
    per_source: dict[str, dict[str, int]] = {}
    result = StageResult("split", [])
    names: dict[str, str] = {}
    for source in sorted(by_source):
        group = sorted(by_source[source], key=lambda r: _rank(cfg.seed, r["id"]))
        n = len(group)
        if cfg.target == "paper" and source in PAPER_COUNTS:
            sft_target, rl_target = PAPER_COUNTS[source]
            n_rl = min(rl_target, n)
            n_sft = min(sft_target, n - n_rl)
        else:
            sft_target = rl_target = None
            n_rl = int(cfg.rl_fraction * n + 0.5)  # half up: one record of a source at 0.5 goes to RL
            n_sft = n - n_rl
        per_source[source] = {"sft": n_sft, "grpo": n_rl, "unused": n - n_rl - n_sft,
                              **({"target_sft": sft_target, "target_grpo": rl_target} if sft_target is not None else {})}
        for i, r in enumerate(group):
            if i >= n_rl + n_sft:
                result.drop(r, "over_target", f"source {source} holds more records than the paper's counts")
                continue
            name = f"{source}/{_FILE_SAFE.sub('_', r['id'])}{Path(r['image']).suffix.lower()}"
            if name in names:
                raise ValueError(f"records {names[name]!r} and {r['id']!r} map to one image name {name!r}: "
                                 "give them ids that differ in letters, digits, '.', '_' or '-'")
            names[name] = r["id"]
            images.setdefault(source, []).append((name, Path(r["image"])))
            base = {"id": r["id"], "image": name, "question": r["question"], "answer": r["response"], "gt": r["gt"],
                    "verifier_type": r["verifier_type"]}
            if i < n_rl:
                rows["grpo"].append(base)
            else:
                rows["sft"].append({**base, "ds_answer": r["ds_answer"], "caption": r["caption"],
                                    "meta": {"caption_model_id": r.get("caption_model", ""),
                                             "rationale": r["reasoning"], "text_question": r["question"],
                                             "url": "", "verified_by": r.get("verified_by", "")}})
            result.kept.append(r)
    written = write_release(ctx.out, rows, {s: ((name, path.read_bytes()) for name, path in members)
                                            for s, members in images.items()})
    result.extra.update(sft=len(rows["sft"]), grpo=len(rows["grpo"]), per_source=per_source,
                        files={k: str(v) for k, v in written.items()})
    return result


RUNNERS = {"metadata": metadata, "caption": caption, "distill": distill, "rewrite": rewrite, "verify": verify,
           "split": split}
