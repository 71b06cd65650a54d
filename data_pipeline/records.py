"""VLAA-Thinking records: the two known file shapes, normalised to one typed `Record`.

Shapes accepted (see shared/vlaa_thinking_format.md):
- released files: `image`, `question`, `answer` (`<think>..</think><answer>..</answer>`), `gt`, and in the
  GRPO split `verifier_type`;
- the pipeline shape on the dataset card: `id`, `image`, `question`, `gt`, `ds_answer`, `caption`, `meta`.
Files may be one JSON array or JSON Lines (the released `.json` files are reported to be JSON Lines).

Every problem is a `DataError` that names the file, the line and the field. Callers decide whether to
raise it or to skip the record and count it (`skip_bad_records`); nothing is dropped silently.
Text is UTF-8 (a byte-order mark is accepted), or UTF-16 / UTF-32 as `json.detect_encoding` tells them;
a JSON Lines line that is not valid text is a bad record (`bad_encoding`). Ids are unique within a file:
a repeated id is a bad record (`duplicate_id`), the first one is kept.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Spellings met (or expected) in the files -> canonical reward type (digit, mcq, math, iou, open_ended).
VERIFIER_ALIASES: dict[str, str] = {
    "digit": "digit",
    "mcq": "mcq",
    "math": "math",
    "iou": "iou",
    "bbox": "iou",
    "open": "open_ended",
    "open_ended": "open_ended",
    "open-ended": "open_ended",
    "general": "open_ended",
}

# Reward type of each source (paper Table 1 / dataset card), used when a record has no `verifier_type`
# (the SFT split). Sources are the first component of the image path.
SOURCE_VERIFIER: dict[str, str] = {
    "clevr_math": "digit",
    "geoqa170k": "mcq",
    "synthesis": "math",  # Math PUMA
    "arxivqa": "mcq",
    "docvqa": "open_ended",
    "vizwiz": "open_ended",
    "allava_laion": "open_ended",
    "coco": "iou",  # LLaVA-CoT COCO
    "vg": "iou",  # LLaVA-CoT Visual Genome
}

# Known names of the two files in the dataset repository, newest first.
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "sft": ("VLAA-Thinking-SFT-126K.json", "train-sft.json"),
    "grpo": ("VLAA-Thinking-GRPO-25K.json", "train-grpo.json"),
}
# Ids held out for evaluation, one per line, beside the split files (the demo data writes one).
HELDOUT_IDS_FILE = "heldout_ids.txt"


class DataError(ValueError):
    """A bad record or image. `kind` groups errors in skip summaries; the message names file/line/field."""

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        record_id: str | None = None,
    ):
        self.kind, self.file, self.line, self.field, self.record_id = kind, file, line, field, record_id
        self.reason = message
        where = f"{file or '<unknown file>'}" + (f":{line}" if line is not None else "")
        parts = [where]
        if record_id is not None:
            parts.append(f"record {record_id!r}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(f"{', '.join(parts)}: {message} [{kind}]")

    def with_context(self, **kw: Any) -> "DataError":
        """Same error with missing location fields filled in (file, line, field, record_id)."""
        args = {k: getattr(self, k) for k in ("kind", "file", "line", "field", "record_id")}
        args.update({k: v for k, v in kw.items() if args.get(k) is None})
        return DataError(self.reason, **args)

    def __reduce__(self):  # picklable across Grain worker processes
        return (_rebuild_error, (self.reason, self.kind, self.file, self.line, self.field, self.record_id))


def _rebuild_error(reason, kind, file, line, field, record_id) -> DataError:
    return DataError(reason, kind=kind, file=file, line=line, field=field, record_id=record_id)


@dataclasses.dataclass(frozen=True)
class Record:
    """One normalised VLAA-Thinking example.

    Attributes:
      id: `id` field if present, else `<file name>:<line>` (stable across runs; `<file name>:<line>:<n>` for
        the n-th record starting on one line, as in a one-line JSON array).
      source: first component of the image path (e.g. `clevr_math`), lower case.
      image: image path relative to the images root (posix, normalised, never escaping the root).
      question: user question (text only; the image goes before it in the prompt).
      response: assistant response with `<think>`/`<answer>` tags (`answer` or `ds_answer`); "" if absent.
      ground_truth: `gt` as a string; non-string values (numbers, boxes) are JSON-encoded ("[x1, y1, x2, y2]").
      verifier_type: a VERIFIER_ALIASES value (from `verifier_type`, else from the source; None if unknown).
      file: file the record came from; line: 1-based line of the record in it (for error messages).
    """

    id: str
    source: str
    image: str
    question: str
    response: str
    ground_truth: str
    verifier_type: str | None
    file: str = ""
    line: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def normalize_verifier_type(value: Any, **where: Any) -> str:
    """Canonical reward type for a `verifier_type` value; DataError (kind `unknown_verifier_type`) otherwise."""
    key = str(value).strip().lower() if isinstance(value, str) else None
    if key not in VERIFIER_ALIASES:
        raise DataError(
            f"unknown verifier_type {value!r}; accepted: {sorted(VERIFIER_ALIASES)}",
            kind="unknown_verifier_type",
            field="verifier_type",
            **where,
        )
    return VERIFIER_ALIASES[key]


def normalize_image_path(path: Any, **where: Any) -> str:
    """Relative posix image path; DataError if empty, absolute or escaping the images root via `..`."""
    if not isinstance(path, str) or not path.strip():
        raise DataError("missing or empty image path", kind="missing_field", field="image", **where)
    p = path.strip().replace("\\", "/")
    norm = posixpath.normpath(p)
    if p.startswith("/") or norm == ".." or norm.startswith("../") or (len(p) > 1 and p[1] == ":"):
        raise DataError(f"image path {path!r} escapes the images root", kind="path_escape", field="image", **where)
    return norm


def _text_field(raw: dict, names: tuple[str, ...], *, required: bool, where: dict) -> str:
    for name in names:
        if name in raw and raw[name] is not None:
            value = raw[name]
            if not isinstance(value, str):
                raise DataError(f"expected a string, got {type(value).__name__}", kind="bad_field", field=name, **where)
            if required and not value.strip():
                raise DataError("empty", kind="missing_field", field=name, **where)
            return value
    if required:
        raise DataError("missing", kind="missing_field", field="/".join(names), **where)
    return ""


def parse_record(
    raw: Any, *, file: str = "", line: int = 0, split: str = "grpo", require_response: bool | None = None,
    default_id: str | None = None,
) -> Record:
    """Normalise one raw JSON object (either known shape) into a Record.

    `split` ("sft" | "grpo") decides what is required: SFT needs a non-empty response; GRPO needs a
    ground truth and a known reward type. `require_response` overrides the SFT default. A record without
    an `id` gets `default_id`, by default `<file name>:<line>`.
    """
    where: dict[str, Any] = {"file": file, "line": line}
    if not isinstance(raw, dict):
        raise DataError(f"expected a JSON object, got {type(raw).__name__}", kind="malformed_json", **where)
    rid = raw.get("id")
    rid = str(rid) if rid is not None else (default_id or f"{os.path.basename(file) or 'record'}:{line}")
    where["record_id"] = rid
    image = normalize_image_path(raw.get("image"), **where)
    source = image.split("/", 1)[0].lower() if "/" in image else "unknown"
    question = _text_field(raw, ("question",), required=True, where=where)
    need_response = (split == "sft") if require_response is None else require_response
    response = _text_field(raw, ("answer", "ds_answer", "response"), required=need_response, where=where)
    gt = raw.get("gt")
    if gt is None or (isinstance(gt, str) and not gt.strip()) or (isinstance(gt, (list, dict)) and not gt):
        if split == "grpo":
            raise DataError("missing or empty ground truth", kind="missing_field", field="gt", **where)
        gt_str = ""
    else:
        gt_str = gt if isinstance(gt, str) else json.dumps(gt)
    if raw.get("verifier_type") is not None:
        verifier = normalize_verifier_type(raw["verifier_type"], **where)
    else:
        verifier = SOURCE_VERIFIER.get(source)
        if verifier is None and split == "grpo":
            raise DataError(
                f"no verifier_type and source {source!r} has no known reward type",
                kind="missing_field",
                field="verifier_type",
                **where,
            )
    return Record(
        id=rid,
        source=source,
        image=image,
        question=question,
        response=response,
        ground_truth=gt_str,
        verifier_type=verifier,
        file=file,
        line=line,
    )


# Where `surrogateescape` decoding put a byte that is not valid text in the file's encoding.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_NON_SPACE = re.compile(r"\S")


def read_text(path: str | os.PathLike) -> str:
    """The text of a data file: UTF-8 with or without a byte-order mark, or UTF-16 / UTF-32 (detected as
    `json.loads` detects them). Bytes that are not valid text become lone surrogates, which `iter_raw_json`
    reports by line; a directory raises DataError naming it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError("is a directory, expected a JSON / JSON Lines file", kind="not_a_file", file=path)
    data = Path(path).read_bytes()
    encoding = json.detect_encoding(data)
    try:
        return data.decode(encoding, errors="surrogateescape")
    except UnicodeDecodeError as e:  # UTF-16 / 32 whose bytes do not pair up
        raise DataError(f"not valid {encoding} text (byte {e.start}): save the file as UTF-8",
                        kind="bad_encoding", file=path, line=1 + data.count(b"\n", 0, e.start)) from None


def _encoding_error(path: str, line: int, text: str, at: int) -> DataError:
    col = at - (text.rfind("\n", 0, at) + 1) + 1
    byte = ord(text[at]) - 0xDC00
    return DataError(f"not UTF-8 text (byte 0x{byte:02x} at column {col}): save the file as UTF-8, e.g. "
                     f"iconv -f latin1 -t utf-8 (or the encoding it was written in)",
                     kind="bad_encoding", file=path, line=line)


def iter_raw_json(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line, object) for a JSON array file or a JSON Lines file.

    A malformed (or undecodable) JSON Lines line yields (line, DataError) so the caller can skip and count
    it; a broken JSON array raises, since nothing after the break can be located, and so does a file that
    is one JSON object (records must be an array or one object per line).
    """
    path = os.fspath(path)
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        bad = _UNDECODABLE.search(text)
        if bad:
            raise _encoding_error(path, 1 + text.count("\n", 0, bad.start()), text, bad.start())
        decoder = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        line = 1 + text.count("\n", 0, pos)
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                if text[pos] == "\n":
                    line += 1
                pos += 1
            if pos >= len(text):
                raise DataError("unterminated JSON array", kind="malformed_json", file=path, line=line)
            if text[pos] == "]":
                rest = text[pos + 1:]
                if rest.strip():  # e.g. records appended after the array: they would be lost
                    raise DataError("text after the closing ']' of the JSON array; records must all be inside it",
                                    kind="malformed_json", file=path,
                                    line=line + rest[: len(rest) - len(rest.lstrip())].count("\n"))
                return
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON: {e.msg}", kind="malformed_json", file=path, line=e.lineno) from e
            yield line, obj
            line += text.count("\n", pos, end)
            pos = end
    if stripped.startswith("{"):
        nl = text.find("\n", len(text) - len(stripped))
        if nl < 0 or not _NON_SPACE.search(text, nl):  # one line: a record, or an object holding the records
            _raise_if_one_object(path, text)
    first = True
    for i, row in enumerate(text.splitlines(), start=1):
        if not row.strip():
            continue
        bad = _UNDECODABLE.search(row)
        if bad:
            yield i, _encoding_error(path, i, row, bad.start())
            first = False
            continue
        try:
            yield i, json.loads(row)
        except json.JSONDecodeError as e:
            if first and row.lstrip().startswith("{"):
                _raise_if_one_object(path, text, pretty=True)
            yield i, DataError(f"malformed JSON line: {e.msg} (column {e.colno})", kind="malformed_json", file=path, line=i)
        first = False


def _raise_if_one_object(path: str, text: str, pretty: bool = False) -> None:
    """A file that is one JSON object holding the records (e.g. {"data": [...]}), or one record spread
    over several lines, is not a split file: say so, and where the records may be, rather than report
    its first line as malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return
    if pretty and isinstance(obj, dict) and {"image", "question"} & set(obj):
        raise DataError("the file is one record spread over several lines; JSON Lines needs each record on "
                        "one line (or put the records in a JSON array)", kind="malformed_json", file=path, line=1)
    if isinstance(obj, dict) and not {"image", "question"} & set(obj):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        hint = f"; its key {lists[0]!r} holds a list: write that list as the file" if lists else ""
        raise DataError("the file is one JSON object; a split file is a JSON array of records or JSON Lines "
                        f"(one record per line){hint}", kind="malformed_json", file=path, line=1)


@dataclasses.dataclass
class BadRecordSummary:
    """Counts of skipped (or truncated) records by kind, with the first few messages of each kind."""

    counts: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    max_examples: int = 3

    def add(self, kind: str, message: str, n: int = 1) -> None:
        self.counts[kind] += n
        lst = self.examples.setdefault(kind, [])
        if len(lst) < self.max_examples:
            lst.append(message)

    def merge(self, other: "BadRecordSummary") -> None:
        for kind, n in other.counts.items():
            for msg in other.examples.get(kind, [])[: max(0, self.max_examples - len(self.examples.get(kind, [])))]:
                self.add(kind, msg, 0)
            self.counts[kind] += n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BadRecordSummary":
        s = cls()
        s.counts.update(d.get("counts", {}))
        s.examples = {k: list(v) for k, v in d.get("examples", {}).items()}
        return s

    def __str__(self) -> str:
        if not self.counts:
            return "no bad records"
        return ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))


def read_records(
    path: str | os.PathLike,
    *,
    split: str,
    skip_bad_records: bool = False,
    summary: BadRecordSummary | None = None,
) -> list[Record]:
    """All records of one split file. Bad ones raise DataError, or are skipped and counted in `summary`."""
    records = []
    first_line: dict[str, int] = {}  # id -> line of the record kept
    on_line: Counter = Counter()  # a one-line JSON array starts every record on line 1
    for line, raw in iter_raw_json(path):
        on_line[line] += 1
        nth = f"{os.path.basename(path)}:{line}:{on_line[line]}" if on_line[line] > 1 else None
        try:
            if isinstance(raw, DataError):
                raise raw
            rec = parse_record(raw, file=os.fspath(path), line=line, split=split, default_id=nth)
            if rec.id in first_line:
                raise DataError(f"id already used by the record at line {first_line[rec.id]}; ids must be unique "
                                "within a split: give one of them another id", kind="duplicate_id", field="id",
                                file=os.fspath(path), line=line, record_id=rec.id)
            first_line[rec.id] = line
            records.append(rec)
        except DataError as e:
            if not skip_bad_records:
                raise
            if summary is None:
                raise ValueError("skip_bad_records=True needs a summary to count skipped records in") from e
            summary.add(e.kind, str(e))
    return records


def find_split_file(manual_dir: str | os.PathLike, split: str) -> Path:
    """The JSON file of `split` ("sft" | "grpo") in a local copy of the dataset repository."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    if not Path(manual_dir).is_dir():
        raise FileNotFoundError(f"data.manual_dir {os.fspath(manual_dir)!r} is not a directory: point it at a local "
                                "copy of the VLAA-Thinking dataset repository")
    for name in SPLIT_FILES[split]:
        p = Path(manual_dir) / name
        if p.is_file():
            return p
        if p.exists():
            raise DataError("is not a file (a directory?): the split must be a JSON / JSON Lines file",
                            kind="not_a_file", file=os.fspath(p))
    raise FileNotFoundError(f"{os.fspath(manual_dir)}: none of {', '.join(SPLIT_FILES[split])} is there: copy the "
                            f"{split} split file of the VLAA-Thinking dataset repository into it")
