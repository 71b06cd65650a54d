"""Benchmark files -> `EvalItem`s: question, image, ground truth, how to score it, how to group it.

Layouts read (chosen by the path):
- VLMEvalKit TSV (`*.tsv`): one row per question, `image` as base64 (or, as in MMBench, the `index` of
  an earlier row whose image it shares), or `image_path`; `question`, `answer`; grouping columns
  `category` / `l2-category` / `task` / `source` / `split`; options as an `options` column (JSON /
  Python list or dict, or "A. ..." lines), as `A`, `B`, `C`, ... columns (MMBench style), or as
  MathVista's `choices` list with `answer_option` holding the letter; MathVista's `question_type`
  (multi_choice / free_form), `answer_type` (integer / float / text / list) and `precision`;
  an optional `hint` is put before the question (VLMEvalKit's prompt).
- JSON / JSON Lines (`*.json`, `*.jsonl`): a list, JSON Lines, or an object keyed by id (MathVista
  `testmini.json`); fields as above with `image` (or `image_path`, `images`) a path relative to
  `images_root` (default: the file's folder), `query` (MathVista's full prompt) preferred over
  `question`, `metadata.{source,category,task}` for grouping.
- VLAA-Thinking records (records with `gt` and `verifier_type`, or `gt` and an `<answer>`-tagged
  `answer`): parsed by data_pipeline.records, images read by its ImageStore (extracted folders or
  `images/<source>.tar.gz`). A dataset directory (e.g. the demo data) means its GRPO file, restricted
  to `heldout_ids.txt` when that file exists (the held-out evaluation records).

How an item is scored (`verifier_type`): an explicit `verifier_type` field wins; otherwise options or
`question_type == multi_choice` -> mcq; MathVista `answer_type` integer -> digit, float / list -> math;
a ground truth that is one integer -> digit, one decimal number or LaTeX -> math, four numbers in
brackets -> iou; anything else -> `text` (normalised exact match, see scoring.py).
Bad input raises `BenchmarkError` naming the file, the row / line and the column.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import json
import os
import re
import string
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from data_pipeline.records import HELDOUT_IDS_FILE, SPLIT_FILES, DataError, iter_raw_json, parse_record
from vlaa_jax.rewards.mcq import parse_options

EVAL_VERIFIER_TYPES = ("digit", "mcq", "math", "iou", "open_ended", "text")
_ALIASES = {"digit": "digit", "mcq": "mcq", "multi_choice": "mcq", "math": "math", "iou": "iou",
            "bbox": "iou", "open_ended": "open_ended", "open": "open_ended", "open-ended": "open_ended",
            "general": "open_ended", "text": "text", "exact": "text", "exact_match": "text"}
GROUP_KEYS = ("category", "source", "task", "l2-category", "split")  # first one present names the source


class BenchmarkError(ValueError):
    """A bad benchmark file or row; the message names the file, row/line and column."""


# ----------------------------------------------------------------------------------------- images
@dataclasses.dataclass(frozen=True)
class BytesImage:
    """Encoded image bytes held in memory (a TSV's base64 column)."""
    data: bytes
    name: str

    def read(self) -> bytes:
        return self.data


@dataclasses.dataclass(frozen=True)
class FileImage:
    """An image file on disk, read when the item is prompted."""
    path: str

    @property
    def name(self) -> str:
        return self.path

    def read(self) -> bytes:
        try:
            return Path(self.path).read_bytes()
        except OSError as e:
            raise BenchmarkError(f"cannot read image {self.path}: {e}") from e


@dataclasses.dataclass(frozen=True)
class StoreImage:
    """A VLAA-Thinking image path, resolved by data_pipeline's ImageStore (folders or tar archives)."""
    store: Any
    rel: str

    @property
    def name(self) -> str:
        return self.rel

    def read(self) -> bytes:
        return self.store.read(self.rel)


# ------------------------------------------------------------------------------------------- items
@dataclasses.dataclass
class EvalItem:
    """One benchmark question.

    question: the text shown to the model after the image (options appended when they are not in it).
    answer: ground truth (for mcq the letter when known, else the option text).
    verifier_type: one of EVAL_VERIFIER_TYPES. source / question_type: rows of the result tables.
    options: label -> option text (mcq). precision: decimals of a MathVista float answer.
    """
    id: str
    question: str
    answer: str
    verifier_type: str
    image: Any  # BytesImage | FileImage | StoreImage
    source: str = "all"
    question_type: str = ""
    options: dict[str, str] | None = None
    answer_type: str = ""
    precision: int | None = None
    where: str = ""  # file:row for messages

    def record(self) -> dict[str, Any]:
        """The reward module's record view of this item (vlaa_jax.rewards.mixed)."""
        return {"id": self.id, "verifier_type": self.verifier_type, "gt": self.answer,
                "question": self.question, "options": self.options}


# ----------------------------------------------------------------------------------------- helpers
def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()) \
        or (isinstance(v, (list, dict)) and not v)


def _literal(text: str) -> Any:
    """JSON, else a Python literal (VLMEvalKit writes lists with repr), else None."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return None


def parse_options_value(value: Any, where: str) -> dict[str, str] | None:
    """Options from a list, a dict, or a string holding either (or "A. ..." lines)."""
    if _blank(value):
        return None
    if isinstance(value, str):
        parsed = _literal(value.strip())
        if isinstance(parsed, (list, tuple, dict)):
            value = parsed
        else:
            found = parse_options(value)
            if not found:
                raise BenchmarkError(f"{where}: cannot read options {value[:80]!r} (expected a list, a dict or "
                                     "'A. ...' lines)")
            return found
    if isinstance(value, Mapping):
        return {str(k).strip("() .").upper(): str(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > 26:
            raise BenchmarkError(f"{where}: {len(value)} options, more than 26 labels")
        return {string.ascii_uppercase[i]: str(v) for i, v in enumerate(value)}
    raise BenchmarkError(f"{where}: options must be a list or a dict, got {type(value).__name__}")


_NUM = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_BOX = re.compile(r"^\[\s*[-+]?[\d.]+\s*(,\s*[-+]?[\d.]+\s*){3}\]$")
_LATEX = re.compile(r"\\[a-zA-Z]+|\$|\^|_\{|\{")


def infer_verifier_type(answer: str, *, options: Mapping[str, str] | None = None, question_type: str = "",
                        answer_type: str = "") -> str:
    """Scoring rule for an item without `verifier_type` (see the module docstring)."""
    qt, at = question_type.strip().lower(), answer_type.strip().lower()
    if options or qt in ("multi_choice", "multiple_choice", "mcq"):
        return "mcq"
    if at == "integer":
        return "digit"
    if at in ("float", "list"):
        return "math"
    a = answer.strip()
    if _THOUSANDS.match(a):
        a = a.replace(",", "")
    if _NUM.match(a):
        return "digit" if "." not in a else "math"
    if _BOX.match(a):
        return "iou"
    if _LATEX.search(a):
        return "math"
    return "text"


def _verifier(value: Any, where: str) -> str:
    key = str(value).strip().lower()
    if key not in _ALIASES:
        raise BenchmarkError(f"{where}: unknown verifier_type {value!r}; expected one of {sorted(_ALIASES)}")
    return _ALIASES[key]


def _with_options(question: str, options: Mapping[str, str] | None) -> str:
    """VLMEvalKit's multiple-choice prompt: question, then "Options:" lines, unless already listed."""
    if not options or parse_options(question):
        return question
    lines = "\n".join(f"{k}. {v}" for k, v in options.items())
    return f"{question}\nOptions:\n{lines}\nPlease select the correct answer from the options above."


def _mcq_answer(answer: str, answer_option: Any, options: Mapping[str, str] | None, where: str) -> str:
    """Ground-truth letter: `answer_option`, else `answer` when it is a label, else the option text's label."""
    if not _blank(answer_option):
        return str(answer_option).strip()
    if options:
        a = answer.strip()
        if a.strip("() .").upper() in options and len(a.strip("() .")) == 1:
            return a.strip("() .").upper()
        hits = [k for k, v in options.items() if v.strip() == a]
        if len(hits) == 1:
            return hits[0]
    return answer


def _int_or_none(v: Any, where: str) -> int | None:
    if _blank(v):
        return None
    try:
        return int(float(v))
    except (TypeError, ValueError):
        raise BenchmarkError(f"{where}: column 'precision' must be a number, got {v!r}") from None


def item_from_row(row: Mapping[str, Any], image: Any, *, where: str, default_id: str,
                  default_source: str) -> EvalItem:
    """One EvalItem from a generic (TSV / JSON) row; `image` is already resolved."""
    meta = row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}
    question = next((row[k] for k in ("query", "question") if not _blank(row.get(k))), None)
    if question is None:
        raise BenchmarkError(f"{where}: missing column 'question'")
    answer = next((row[k] for k in ("answer", "gt", "ground_truth") if not _blank(row.get(k))), None)
    if answer is None:
        raise BenchmarkError(f"{where}: missing column 'answer'")
    answer = answer if isinstance(answer, str) else json.dumps(answer)
    options = None
    if not _blank(row.get("options")):
        options = parse_options_value(row["options"], f"{where}, column 'options'")
    elif not _blank(row.get("choices")):
        options = parse_options_value(row["choices"], f"{where}, column 'choices'")
    else:
        letters = [c for c in string.ascii_uppercase if not _blank(row.get(c))]
        if letters:
            options = {c: str(row[c]) for c in letters}
    question = str(question)
    hint = row.get("hint")
    if not _blank(hint) and "query" not in row:
        question = f"Hint: {hint}\n{question}"
    question_type = str(row.get("question_type") or "")
    answer_type = str(row.get("answer_type") or "")
    if not _blank(row.get("verifier_type")):
        vtype = _verifier(row["verifier_type"], where)
    else:
        vtype = infer_verifier_type(answer, options=options, question_type=question_type, answer_type=answer_type)
    if vtype == "mcq":
        answer = _mcq_answer(answer, row.get("answer_option"), options, where)
        question_type = question_type or "multi_choice"
    else:
        question_type = question_type or "free_form"
    source = next((str(v) for k in GROUP_KEYS for v in (row.get(k), meta.get(k)) if not _blank(v)), default_source)
    rid = next((str(row[k]) for k in ("index", "id", "pid", "question_id") if not _blank(row.get(k))), default_id)
    return EvalItem(id=rid, question=_with_options(question, options) if "query" not in row else question,
                    answer=answer.strip(), verifier_type=vtype, image=image, source=source,
                    question_type=question_type, options=options, answer_type=answer_type,
                    precision=_int_or_none(row.get("precision"), where), where=where)


# --------------------------------------------------------------------------------------------- TSV
def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=False)
    except (binascii.Error, ValueError) as e:
        raise BenchmarkError(f"{where}, column 'image': not valid base64 ({e})") from e


def load_tsv(path: str | os.PathLike, *, images_root: str | None = None) -> list[EvalItem]:
    """Items of a VLMEvalKit-style TSV (see the module docstring)."""
    path = os.fspath(path)
    csv.field_size_limit(sys.maxsize)
    root = images_root or os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames or "question" not in reader.fieldnames:
            raise BenchmarkError(f"{path}: header has no 'question' column (columns: {reader.fieldnames})")
        if "image" not in reader.fieldnames and "image_path" not in reader.fieldnames:
            raise BenchmarkError(f"{path}: header has neither an 'image' nor an 'image_path' column")
        rows = list(reader)
    by_index: dict[str, str] = {}
    for row in rows:
        img = row.get("image") or ""
        if row.get("index") and len(img) > 64:
            by_index[str(row["index"]).strip()] = img
    items = []
    for n, row in enumerate(rows, start=1):
        where = f"{path}: row {n}" + (f" (index {row['index']})" if row.get("index") else "")
        img = (row.get("image") or "").strip()
        if img and len(img) <= 64 and img in by_index:  # MMBench: the index of a row with the same image
            img = by_index[img]
        if img and len(img) > 64:
            image = BytesImage(_b64(img, where), name=f"{os.path.basename(path)}:{n}")
        elif not _blank(row.get("image_path")):
            p = str(row["image_path"]).strip().strip("[]'\"")
            image = FileImage(p if os.path.isabs(p) else os.path.join(root, p))
        else:
            raise BenchmarkError(f"{where}: column 'image' is empty and no 'image_path' is given")
        items.append(item_from_row(row, image, where=where, default_id=str(n),
                                   default_source=Path(path).stem))
    return items


# -------------------------------------------------------------------------------------------- JSON
def _json_rows(path: str) -> Iterable[tuple[int, Any]]:
    """(line, object) of a JSON array / JSON Lines file, or (k, {"id": key, **value}) of an object keyed
    by id (MathVista testmini.json)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # JSON Lines
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Mapping) for v in obj.values()):
            for k, (key, v) in enumerate(obj.items(), start=1):
                yield k, {"id": key, **v}
            return
    for line, raw in iter_raw_json(path):
        if isinstance(raw, DataError):
            raise BenchmarkError(str(raw))
        yield line, raw


def _is_vlaa_record(row: Mapping[str, Any]) -> bool:
    return "gt" in row and ("verifier_type" in row or "<answer>" in str(row.get("answer", "")))


def load_json(path: str | os.PathLike, *, images_root: str | None = None,
              ids: Iterable[str] | None = None) -> list[EvalItem]:
    """Items of a JSON / JSON Lines benchmark or VLAA-Thinking record file."""
    path = os.fspath(path)
    keep = set(ids) if ids is not None else None
    root = images_root or os.path.dirname(os.path.abspath(path))
    store = None
    items = []
    for line, row in _json_rows(path):
        where = f"{path}: line {line}"
        if not isinstance(row, Mapping):
            raise BenchmarkError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if _is_vlaa_record(row):
            # Local: the data_pipeline.vlaa_thinking package imports tensorflow_datasets (heavy), needed
            # only for VLAA-Thinking record files.
            from data_pipeline.vlaa_thinking.images import ImageStore
            try:
                rec = parse_record(dict(row), file=path, line=line, split="grpo")
            except DataError as e:
                raise BenchmarkError(str(e)) from e
            if keep is not None and rec.id not in keep:
                continue
            if store is None:
                img_root = images_root or (os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images"))
                                           else root)
                store = ImageStore(img_root)
            vtype = _verifier(rec.verifier_type, where)
            items.append(EvalItem(id=rec.id, question=rec.question, answer=rec.ground_truth, verifier_type=vtype,
                                  image=StoreImage(store, rec.image), source=rec.source,
                                  question_type="multi_choice" if vtype == "mcq" else vtype, where=where))
            continue
        img = next((row[k] for k in ("image", "image_path", "images") if not _blank(row.get(k))), None)
        if isinstance(img, list):
            img = img[0]
        if img is None:
            raise BenchmarkError(f"{where}: missing field 'image' (a path relative to {root})")
        p = str(img)
        image = FileImage(p if os.path.isabs(p) else os.path.join(root, p))
        item = item_from_row(row, image, where=where, default_id=f"{Path(path).name}:{line}",
                             default_source=Path(path).stem)
        if keep is None or item.id in keep:
            items.append(item)
    return items


# ------------------------------------------------------------------------------------------ entry
def load_benchmark(path: str | os.PathLike, *, images_root: str | None = None, ids_file: str | None = None,
                   limit: int = 0) -> list[EvalItem]:
    """EvalItems of a benchmark file or a VLAA-Thinking dataset directory (see the module docstring).

    ids_file: keep only the ids listed in it (one per line). limit: first N items (0 = all)."""
    path = os.fspath(path)
    ids = None
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in SPLIT_FILES["grpo"] if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise BenchmarkError(f"{path}: a directory must hold a VLAA-Thinking GRPO file {SPLIT_FILES['grpo']}")
        heldout = os.path.join(path, HELDOUT_IDS_FILE)
        ids_file = ids_file or (heldout if os.path.isfile(heldout) else None)
        images_root = images_root or os.path.join(path, "images")
        path = found[0]
    if ids_file:
        ids = [line.strip() for line in Path(ids_file).read_text().splitlines() if line.strip()]
    if not os.path.isfile(path):
        raise BenchmarkError(f"benchmark file {path} not found")
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix == "tsv":
        items = load_tsv(path, images_root=images_root)
        if ids is not None:
            items = [it for it in items if it.id in set(ids)]
    elif suffix in ("json", "jsonl"):
        items = load_json(path, images_root=images_root, ids=ids)
    else:
        raise BenchmarkError(f"{path}: unknown benchmark format .{suffix} (expected .tsv, .json or .jsonl)")
    if not items:
        raise BenchmarkError(f"{path}: no items" + (f" with the ids of {ids_file}" if ids_file else ""))
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            raise BenchmarkError(f"{it.where}: duplicate id {it.id!r} (first at {seen[it.id]})")
        seen[it.id] = it.where
    return items[:limit] if limit else items
