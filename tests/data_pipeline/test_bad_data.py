"""Bad data: each kind raises a DataError naming file, line and field, or is skipped and counted."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.loader import make_loader
from data_pipeline.records import SPLIT_FILES, DataError
from data_pipeline.vlaa_thinking import build_vlaa_thinking

GRPO_FILE, SFT_FILE = SPLIT_FILES["grpo"][0], SPLIT_FILES["sft"][0]


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


GOOD_PNG = _encode(_rgb(96, 64))
MODE_IMAGES = {  # not bad: every PIL mode is converted like the HF processor does
    "gray": _encode(_rgb(80, 60, 1).convert("L")),
    "rgba": _encode(_rgb(80, 60, 2).convert("RGBA")),
    "palette": _encode(_rgb(80, 60, 3).convert("P")),
    "cmyk": _encode(_rgb(80, 60, 4).convert("CMYK"), "JPEG"),
    "sixteen": _encode(Image.fromarray(np.random.default_rng(5).integers(0, 65535, (60, 80), dtype=np.uint16))),
}


def _row(i: int, **kw) -> dict:
    row = {"image": f"clevr_math/{i}.png", "question": f"How many objects? ({i})",
           "answer": "<think>count</think><answer>3</answer>", "gt": "3", "verifier_type": "digit"}
    row.update(kw)
    return {k: v for k, v in row.items() if v is not None}


# kind -> (JSON line or dict for the bad record, extra image files, where it is caught)
BAD = {
    "malformed_json": ('{"image": "clevr_math/x.png", "question": "q",', {}, None),
    "missing_question": (_row(90, question=None), {"clevr_math/90.png": GOOD_PNG}, "question"),
    "missing_gt": (_row(91, gt=None), {"clevr_math/91.png": GOOD_PNG}, "gt"),
    "unknown_verifier_type": (_row(92, verifier_type="vibes"), {"clevr_math/92.png": GOOD_PNG}, "verifier_type"),
    "path_escape": (_row(93, image="clevr_math/../../outside.png"), {}, "image"),
    "missing_image": (_row(94), {}, "image"),
    "corrupt_image": (_row(95), {"clevr_math/95.png": b"\x89PNG\r\n\x1a\n garbage"}, "image"),
    "truncated_image": (_row(96), {"clevr_math/96.png": GOOD_PNG[: len(GOOD_PNG) // 2]}, "image"),
    "tiny_image": (_row(97), {"clevr_math/97.png": _encode(_rgb(20, 64))}, "image"),
    "extreme_aspect_ratio": (_row(98), {"clevr_math/98.png": _encode(_rgb(5800, 28))}, "image"),
    "prompt_too_long": (_row(99, question="word " * 400), {"clevr_math/99.png": GOOD_PNG}, "question"),
}
KIND = {"missing_question": "missing_field", "missing_gt": "missing_field", "corrupt_image": "bad_image",
        "truncated_image": "bad_image"}


def _repo(root: Path, rows: list, images: dict, sft_rows: list | None = None) -> Path:
    (root / "images" / "clevr_math").mkdir(parents=True)
    (root / "outside.png").write_bytes(GOOD_PNG)
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (root / GRPO_FILE).write_text("\n".join(lines) + "\n")
    (root / SFT_FILE).write_text(json.dumps(sft_rows or [r for r in rows if isinstance(r, dict)], indent=1))
    return root


def _good(n: int) -> tuple[list, dict]:
    return [_row(i) for i in range(n)], {f"clevr_math/{i}.png": _encode(_rgb(96, 64, i)) for i in range(n)}


def _cfg(tmp_path, repo, **kw) -> dict:
    return dict(source="vlaa_thinking", dir=str(tmp_path / "tfds"), manual_dir=str(repo), batch_size=2,
                max_length=256, max_prompt_length=200, min_pixels=56 * 56, max_pixels=64 * 28 * 28,
                shuffle=False, process_index=0, process_count=1, **kw)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_record_raises_naming_file_line_field(tmp_path, qwen_tokenizer_dir, name):
    bad, images, field = BAD[name]
    rows, good_images = _good(2)
    repo = _repo(tmp_path / "repo", [rows[0], bad, rows[1]], {**good_images, **images})
    with pytest.raises(DataError) as e:
        loader = make_loader(_cfg(tmp_path, repo), "grpo", qwen_tokenizer_dir)
        list(loader)
    err = e.value
    assert err.kind == KIND.get(name, name)
    assert GRPO_FILE in str(err) and f":2" in str(err)  # file and line of the bad record
    assert err.line == 2 and err.file.endswith(GRPO_FILE)
    if field is not None:
        assert err.field == field and repr(field) in str(err)


def test_bad_records_skipped_and_counted(tmp_path, qwen_tokenizer_dir, hf_processor):
    rows, images = _good(4)
    mode_rows = [_row(50 + k, image=f"clevr_math/{m}.png") for k, m in enumerate(MODE_IMAGES)]
    images.update({f"clevr_math/{m}.png": data for m, data in MODE_IMAGES.items()})
    all_rows = rows[:2] + [BAD[n][0] for n in sorted(BAD)] + mode_rows + rows[2:]
    for n in BAD:
        images.update(BAD[n][1])
    repo = _repo(tmp_path / "repo", all_rows, images)
    loader = make_loader(_cfg(tmp_path, repo, skip_bad_records=True), "grpo", qwen_tokenizer_dir)
    batches = list(loader)
    ids = [r["id"] for b in batches for r in b.records]  # GRPO batches are PromptBatches
    assert len(ids) == len(rows) + len(mode_rows)  # all good records, each once
    summary = loader.summary()
    counts = {**summary["build"]["counts"], **summary["load"]["counts"]}
    expected = {}
    for n in BAD:
        expected[KIND.get(n, n)] = expected.get(KIND.get(n, n), 0) + 1
    merged = dict(summary["build"]["counts"])
    for k, v in summary["load"]["counts"].items():
        merged[k] = merged.get(k, 0) + v
    assert merged == expected, counts
    assert summary["build"]["total"] + summary["load"]["total"] == len(BAD)
    for msgs in list(summary["build"]["examples"].values()) + list(summary["load"]["examples"].values()):
        assert all(GRPO_FILE in m for m in msgs)
    # Grayscale / RGBA / palette / CMYK / 16-bit images went through exactly like the HF processor.
    by_id = {r["id"]: patches for b in batches for r, patches in zip(b.records, b.patches)}
    for k, (m, data) in enumerate(MODE_IMAGES.items()):
        line = all_rows.index(mode_rows[k]) + 1
        ref = hf_processor.image_processor(Image.open(io.BytesIO(data)), return_tensors="np")
        np.testing.assert_allclose(by_id[f"{GRPO_FILE}:{line}"], ref["pixel_values"], atol=1e-6, rtol=0)


def test_corrupt_image_caught_at_load_when_build_does_not_verify(tmp_path, qwen_tokenizer_dir):
    rows, images = _good(2)
    bad, extra, _ = BAD["truncated_image"]
    repo = _repo(tmp_path / "repo", [rows[0], bad, rows[1]], {**images, **extra})
    build_vlaa_thinking("grpo", manual_dir=repo, data_dir=tmp_path / "tfds", verify_images=False)
    loader = make_loader(_cfg(tmp_path, repo, skip_bad_records=True), "grpo", qwen_tokenizer_dir)
    assert sum(len(b) for b in loader) == 2
    assert loader.summary()["load"]["counts"] == {"bad_image": 1}
    with pytest.raises(DataError, match=rf"{GRPO_FILE}:2.*'image'.*cannot decode"):
        list(make_loader(_cfg(tmp_path, repo), "grpo", qwen_tokenizer_dir))


def test_sft_empty_response_and_long_answers(tmp_path, qwen_tokenizer_dir):
    rows, images = _good(3)
    long_answer = "<think>" + "step " * 300 + "</think><answer>3</answer>"
    sft = [rows[0], _row(1, answer=long_answer), rows[2]]
    repo = _repo(tmp_path / "repo", rows, images, sft_rows=sft)
    # Truncation keeps the example, cut at max_length, and counts it.
    loader = make_loader(_cfg(tmp_path, repo), "sft", qwen_tokenizer_dir)
    batches = list(loader)
    assert max(b["input_ids"].shape[1] for b in batches) == 256
    assert loader.summary()["load"]["counts"] == {"truncated": 1}
    assert f"{SFT_FILE}:" in loader.summary()["load"]["examples"]["truncated"][0]
    # "drop" makes it a bad record.
    with pytest.raises(DataError, match=r"max_length is 256") as e:
        list(make_loader(_cfg(tmp_path, repo, sft_truncation="drop"), "sft", qwen_tokenizer_dir))
    assert e.value.kind == "too_long" and e.value.field == "answer"
    # An empty response is caught while building the SFT split.
    repo2 = _repo(tmp_path / "repo2", rows, images, sft_rows=[rows[0], _row(1, answer="  "), rows[2]])
    with pytest.raises(DataError, match=rf"{SFT_FILE}:\d+.*'answer'"):
        make_loader(_cfg(tmp_path / "b", repo2), "sft", qwen_tokenizer_dir)
    loader = make_loader(_cfg(tmp_path / "c", repo2, skip_bad_records=True), "sft", qwen_tokenizer_dir)
    assert sum(len(b["id"]) for b in loader) == 2 and loader.summary()["build"]["counts"] == {"missing_field": 1}
