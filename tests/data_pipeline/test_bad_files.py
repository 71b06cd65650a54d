"""Bad dataset files, table-driven: what a download, an editor or a tired user can do to a VLAA-Thinking copy.

Each case builds the GRPO split twice: strict (the default), where it must raise a DataError of the
expected kind naming the file (and the line, where there is one) and what to do, or build every record;
and with `skip_bad_records`, where every record is either built or counted, never lost: examples built
+ records counted == records in the file. A split left empty is an error in both modes. Each build runs
under a time limit.
"""
from __future__ import annotations

import dataclasses
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import pytest

from data_pipeline.loader import make_loader
from data_pipeline.records import HELDOUT_IDS_FILE, SPLIT_FILES, DataError
from data_pipeline.vlaa_thinking import build_vlaa_thinking
from tests.data_pipeline.test_bad_data import _encode, _rgb, _row
from tests.time_limit import within

GRPO_FILE = SPLIT_FILES["grpo"][0]
N = 4  # records of a case unless it says otherwise
LIMIT_S = 60.0  # per build (a few seconds each here)


def _png(i: int) -> bytes:
    return _encode(_rgb(96, 64, i))


def _lines(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _forged_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (CRC fixed): a decompression bomb's header."""
    data = bytearray(_encode(_rgb(1, 1)))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _repo(root: Path, split: str | bytes, images: dict[str, bytes] | None = None,
          archive: bytes | None = None) -> None:
    """A dataset copy: the GRPO split file, extracted images, and/or images/clevr_math.tar.gz."""
    (root / "images" / "clevr_math").mkdir(parents=True)
    f = root / GRPO_FILE
    f.write_bytes(split) if isinstance(split, bytes) else f.write_text(split)
    for name, data in (images or {}).items():
        (root / "images" / name).write_bytes(data)
    if archive is not None:
        (root / "images" / "clevr_math.tar.gz").write_bytes(archive)


def _good(n: int = N, start: int = 0) -> dict[str, bytes]:
    return {f"clevr_math/{i}.png": _png(i) for i in range(start, start + n)}


def _plain(root: Path, rows: list, images: dict | None = None) -> None:
    _repo(root, _lines(rows), _good() if images is None else images)


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[[Path], None]      # writes the dataset copy
    records: int = N                  # records in the file (built + counted must add up to it)
    strict: tuple | None = None       # (kind, line or None, words in the message); None: builds all
    skipped: dict | None = None       # skip_bad_records: counts by kind (built = records - total)
    always: str | None = None         # kind raised in both modes (nothing can be located or nothing is left)


def _latin1_second_line(root: Path) -> None:
    rows = [json.dumps(_row(i)) for i in range(N)]
    rows[1] = rows[1].replace('"How many', '"Caf\u00e9: how many')
    _repo(root, "\n".join(rows).encode("latin-1") + b"\n", _good())


def _duplicate(root: Path, times: int) -> None:
    rows = [_row(0, id="rec-0")] + [_row(i, id="twin") for i in range(1, 1 + times)] + \
           [_row(i, id=f"rec-{i}") for i in range(1 + times, N)]
    _plain(root, rows)


def _truncated_archive(root: Path) -> None:
    tgz = _tar_gz(_good(10))
    _repo(root, _lines([_row(i) for i in range(10)]), {}, tgz[: len(tgz) // 2])


CASES = {
    # accepted as they are
    "utf8_bom_json_lines": Case(lambda r: _repo(r, b"\xef\xbb\xbf" + _lines([_row(i) for i in range(N)]).encode(),
                                                _good())),
    "utf8_bom_json_array": Case(lambda r: _repo(r, b"\xef\xbb\xbf" + json.dumps([_row(i) for i in range(N)]).encode(),
                                                _good())),
    "utf16_with_bom": Case(lambda r: _repo(r, _lines([_row(i) for i in range(N)]).encode("utf-16"), _good())),
    "one_line_json_array": Case(lambda r: _repo(r, json.dumps([_row(i) for i in range(N)]), _good())),
    "one_line_json_array_with_ids": Case(lambda r: _repo(r, json.dumps([_row(i, id=f"a{i}") for i in range(N)]),
                                                         _good())),
    "crlf_line_ends": Case(lambda r: _repo(r, _lines([_row(i) for i in range(N)]).replace("\n", "\r\n"), _good())),
    "plain_tar_named_tar_gz": Case(lambda r: _repo(r, _lines([_row(i) for i in range(N)]), {},
                                                   _plain_tar(_good()))),
    # text that is not UTF-8
    "latin1_line": Case(_latin1_second_line, strict=("bad_encoding", 2, ["not UTF-8", "0xe9", "iconv"]),
                        skipped={"bad_encoding": 1}),
    "latin1_json_array": Case(lambda r: _repo(r, json.dumps([_row(0), _row(1, question="Caf\u00e9?")], indent=1,
                                                            ensure_ascii=False).encode("latin-1"), _good(2)),
                              records=2, always="bad_encoding"),
    "binary_file_as_split": Case(lambda r: _repo(r, b"PK\x03\x04\x14\x00\x08\xff\xfe\x00\x81garbage\n" * 3,
                                                 _good()),
                                 records=3, strict=("bad_encoding", 1, ["not UTF-8"]), always="empty_split"),
    # nothing in it
    "empty_file": Case(lambda r: _repo(r, "", _good()), records=0, always="empty_split"),
    "empty_json_array": Case(lambda r: _repo(r, "[]", _good()), records=0, always="empty_split"),
    "blank_lines_only": Case(lambda r: _repo(r, "\n \n\t\n", _good()), records=0, always="empty_split"),
    "every_record_bad": Case(lambda r: _plain(r, [_row(i, question=None) for i in range(N)]),
                             strict=("missing_field", 1, ["'question'"]), always="empty_split"),
    "every_image_missing": Case(lambda r: _plain(r, [_row(i) for i in range(N)], {}),
                                strict=("missing_image", None, ["not found"]), always="empty_split"),
    "everything_held_out": Case(lambda r: (_plain(r, [_row(i, id=f"h{i}") for i in range(N)]),
                                           (r / HELDOUT_IDS_FILE).write_text("h0\nh1\nh2\nh3\n")),
                                always="empty_split"),
    # ids
    "duplicate_id": Case(lambda r: _duplicate(r, 2), strict=("duplicate_id", 3, ["'twin'", "line 2", "unique"]),
                         skipped={"duplicate_id": 1}),
    "id_three_times": Case(lambda r: _duplicate(r, 3), strict=("duplicate_id", 3, ["'twin'"]),
                           skipped={"duplicate_id": 2}),
    # the wrong shape of file
    "pretty_printed_object_of_records": Case(
        lambda r: _repo(r, json.dumps({"data": [_row(i) for i in range(N)]}, indent=2), _good()),
        always="malformed_json", strict=("malformed_json", 1, ["one JSON object", "'data'"])),
    "one_line_object_of_records": Case(
        lambda r: _repo(r, json.dumps({"records": [_row(i) for i in range(N)]}), _good()),
        always="malformed_json", strict=("malformed_json", 1, ["one JSON object", "'records'"])),
    "one_record_pretty_printed": Case(lambda r: _repo(r, json.dumps(_row(0), indent=2), _good(1)), records=1,
                                      always="malformed_json", strict=("malformed_json", 1, ["several lines"])),
    "records_after_the_array": Case(lambda r: _repo(r, json.dumps([_row(0), _row(1)]) + "\n" + _lines([_row(2)]),
                                                    _good()),
                                    records=3, always="malformed_json",
                                    strict=("malformed_json", 2, ["after the closing ']'"])),
    "array_of_non_objects": Case(lambda r: _repo(r, "[\n" + ",\n".join(map(json.dumps, [_row(0), 7, "x", _row(3)]))
                                                 + "\n]\n", _good()),
                                 strict=("malformed_json", 3, ["expected a JSON object, got int"]),
                                 skipped={"malformed_json": 2}),
    "split_is_a_directory": Case(lambda r: (_plain(r, []), (r / GRPO_FILE).unlink(), (r / GRPO_FILE).mkdir()),
                                 records=0, always="not_a_file"),
    # image archives
    "archive_not_a_tar": Case(lambda r: _repo(r, _lines([_row(i) for i in range(N)]), _good(1, start=N - 1),
                                              b"this is an HTML error page, not a tar.gz\n" * 50),
                              strict=("bad_archive", 1, ["clevr_math.tar.gz", "corrupt or truncated", "tar tzf"]),
                              skipped={"bad_archive": N - 1}),
    "archive_truncated": Case(_truncated_archive, records=10,
                              strict=("bad_archive", None, ["clevr_math.tar.gz", "download it again"])),
    "archive_empty_file": Case(lambda r: _repo(r, _lines([_row(i) for i in range(N)]), _good(1, start=N - 1), b""),
                               strict=("bad_archive", 1, ["clevr_math.tar.gz"]), skipped={"bad_archive": N - 1}),
    "archive_member_is_a_symlink": Case(lambda r: _repo(r, _lines([_row(i) for i in range(N)]), {},
                                                        _odd_tar(_good(), "symlink")),
                                        strict=("missing_image", 3, ["clevr_math/2.png", "not found"]),
                                        skipped={"missing_image": 1}),
    "archive_member_escapes_with_dotdot": Case(lambda r: _repo(r, _lines([_row(i) for i in range(N)]), {},
                                                               _odd_tar(_good(), "dotdot")),
                                               strict=("missing_image", 3, ["clevr_math/2.png", "not found"]),
                                               skipped={"missing_image": 1}),
    # images
    "zero_byte_image": Case(lambda r: _plain(r, [_row(i) for i in range(N)], {**_good(), "clevr_math/2.png": b""}),
                            strict=("bad_image", 3, ["clevr_math/2.png", "empty file"]), skipped={"bad_image": 1}),
    "image_path_is_a_directory": Case(
        lambda r: (_plain(r, [_row(i) for i in range(N)], _good(N - 1)), (r / "images/clevr_math/3.png").mkdir()),
        strict=("missing_image", 4, ["clevr_math/3.png", "not found"]), skipped={"missing_image": 1}),
    "decompression_bomb_header": Case(
        lambda r: _plain(r, [_row(i) for i in range(N)], {**_good(), "clevr_math/1.png": _forged_png(40000, 40000)}),
        strict=("bad_image", 2, ["clevr_math/1.png", "DecompressionBomb"]), skipped={"bad_image": 1}),
}


def _plain_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _odd_tar(members: dict[str, bytes], how: str) -> bytes:
    """A tar.gz whose member for clevr_math/2.png is a symlink to /etc/passwd, or named ../clevr_math/2.png:
    neither may give a record bytes (the archive is read, never extracted)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            if name == "clevr_math/2.png":
                info = tarfile.TarInfo(name if how == "symlink" else "../" + name)
                if how == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                else:
                    info.size = len(data)
                tf.addfile(info, None if how == "symlink" else io.BytesIO(data))
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _build(tmp_path: Path, repo: Path, tag: str, **kw):
    with within(LIMIT_S):
        return build_vlaa_thinking("grpo", manual_dir=repo, data_dir=tmp_path / f"tfds_{tag}", **kw)


def _built(b) -> int:
    return sum(s.num_examples for s in b.info.splits.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_file(tmp_path, name):
    case = CASES[name]
    repo = tmp_path / "repo"
    case.make(repo)
    split = repo / GRPO_FILE

    # strict
    if case.strict is None and case.always is None:
        assert _built(_build(tmp_path, repo, "strict")) == case.records
    else:
        with pytest.raises(DataError) as e:
            _build(tmp_path, repo, "strict")
        kind, line, words = case.strict or (case.always, None, [])
        err = e.value
        assert err.kind == kind, str(err)
        assert str(split) in str(err) and err.file == str(split)
        if line is not None:
            assert err.line == line and f"{split}:{line}" in str(err)
        for w in words:
            assert w in str(err), (w, str(err))

    # skip_bad_records: built + counted == records, or (nothing to build) the same error
    if case.always is not None:
        with pytest.raises(DataError) as e:
            _build(tmp_path, repo, "skip", skip_bad_records=True)
        assert e.value.kind == case.always and str(split) in str(e.value)
        if case.always == "empty_split":
            assert "would be empty" in str(e.value) or "held out" in str(e.value)
        return
    b = _build(tmp_path, repo, "skip", skip_bad_records=True)
    bad = b.info.metadata["bad_records"]
    if case.skipped is not None:
        assert bad["counts"] == case.skipped
    assert _built(b) + bad["total"] == case.records, bad
    for msgs in bad["examples"].values():
        assert all(str(split) in m for m in msgs)


def test_truncated_archive_keeps_the_images_before_the_break(tmp_path):
    repo = tmp_path / "repo"
    _truncated_archive(repo)
    b = _build(tmp_path, repo, "skip", skip_bad_records=True)
    bad = b.info.metadata["bad_records"]
    assert 0 < _built(b) < 10 and bad["counts"] == {"bad_archive": 10 - _built(b)}
    ds = b.as_data_source(split="train")
    assert all(ds[i]["image_path"].decode() in _good(10) for i in range(len(ds)))


def test_one_line_json_array_ids_and_lines(tmp_path):
    repo = tmp_path / "repo"
    CASES["one_line_json_array"].make(repo)
    ds = _build(tmp_path, repo, "strict").as_data_source(split="train")
    ids = sorted(ds[i]["id"].decode() for i in range(len(ds)))
    assert ids == sorted([f"{GRPO_FILE}:1"] + [f"{GRPO_FILE}:1:{n}" for n in range(2, N + 1)])
    assert {int(ds[i]["line"]) for i in range(len(ds))} == {1}


def test_duplicate_id_keeps_the_first_record(tmp_path):
    repo = tmp_path / "repo"
    _duplicate(repo, 2)
    b = _build(tmp_path, repo, "skip", skip_bad_records=True)
    ds = b.as_data_source(split="train")
    twins = [int(ds[i]["line"]) for i in range(len(ds)) if ds[i]["id"] == b"twin"]
    assert twins == [2]
    assert "line 2" in b.info.metadata["bad_records"]["examples"]["duplicate_id"][0]


@pytest.mark.parametrize("where", ["missing", "empty", "a_file"])
def test_manual_dir_that_holds_no_dataset_is_named(tmp_path, where):
    manual = tmp_path / "manual"
    if where == "empty":
        manual.mkdir()
    elif where == "a_file":
        manual.write_text("not a directory")
    with pytest.raises(FileNotFoundError, match=f"{manual}.*" + ("not a directory" if where != "empty" else
                                                                 GRPO_FILE.replace(".", r"\."))):
        _build(tmp_path, manual, "x")


def test_loader_reports_build_time_skips_and_loses_nothing(tmp_path, qwen_tokenizer_dir):
    """Through make_loader (what the trainers call): a latin-1 line, a repeated id and an unreadable
    archive are counted in loader.summary()["build"], every other record comes out once."""
    repo = tmp_path / "repo"
    rows = [json.dumps(_row(i, id=f"r{i}")) for i in range(6)]
    rows[1] = rows[1].replace('"How many', '"Caf\u00e9: how many')
    rows[4] = json.dumps(_row(4, id="r3"))
    rows.append(json.dumps(_row(0, id="in-archive", image="vg/0.png")))
    _repo(repo, ("\n".join(rows) + "\n").encode("latin-1"), _good(6))
    (repo / "images" / "vg.tar.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    cfg = dict(source="vlaa_thinking", dir=str(tmp_path / "tfds"), manual_dir=str(repo), batch_size=2,
               max_prompt_length=200, min_pixels=56 * 56, max_pixels=64 * 28 * 28, shuffle=False,
               process_index=0, process_count=1, skip_bad_records=True)
    with within(LIMIT_S):
        loader = make_loader(cfg, "grpo", qwen_tokenizer_dir)
        ids = [r["id"] for b in loader for r in b.records]
    build = loader.summary()["build"]
    assert sorted(ids) == ["r0", "r2", "r3", "r5"]
    assert build["counts"] == {"bad_encoding": 1, "duplicate_id": 1, "bad_archive": 1}
    assert len(ids) + build["total"] == len(rows)
