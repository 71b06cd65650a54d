"""The six stages on scripted answers (the stub server, a real process): correct answers are kept and
wrong ones dropped with their reasons, the result is in the released layout and our loader reads it,
a changed template re-asks only its stage, and bad source records are named by file, line and key."""
from __future__ import annotations

import json

import pytest
import tensorflow_datasets as tfds

from data_pipeline.construct import pipeline
from data_pipeline.records import DataError, SPLIT_FILES, read_records
from data_pipeline.vlaa_thinking import build_vlaa_thinking
from tests.construct.conftest import construct_config, requests_logged, stub, write_sources

MCQ = "Which angle is marked? Choices: A. 30 B. 60 C. 90 D. 120"
ROWS = [  # (record, the reasoner's scripted answer, the judge's scripted verdict)
    ({"image": "clevr_math/a.png", "question": "[q01] How many objects are left?", "gt": "3"}, "3", None),
    ({"image": "clevr_math/b.png", "question": "[q02] How many objects are left?", "gt": "4"}, "5", None),
    ({"image": "clevr_math/c.png", "question": "[q03] How many cubes?", "gt": 7, "id": "clevr-c"}, "7", None),
    ({"image": "geoqa170k/a.png", "question": f"[q04] {MCQ}", "gt": "C"}, "C", None),
    ({"image": "geoqa170k/b.png", "question": f"[q05] {MCQ}", "gt": "A"}, "B", None),
    ({"image": "synthesis/a.png", "question": "[q06] Compute the expression.", "gt": "\\frac{1}{2}"}, "0.5", None),
    ({"image": "coco/a.png", "question": "[q07] Box of the dog?", "gt": [0.1, 0.1, 0.5, 0.5]},
     "[0.1, 0.1, 0.5, 0.52]", None),
    ({"image": "coco/b.png", "question": "[q08] Box of the cat?", "gt": [0.1, 0.1, 0.5, 0.5]},
     "[0.6, 0.6, 0.9, 0.9]", None),
    ({"image": "pics/a.png", "question": "[q09] Describe the scene.", "gt": "A yellow box.", "source": "scenes",
      "verifier_type": "open_ended"}, "A yellow box on blue.", "Yes."),
    ({"image": "pics/b.png", "question": "[q10] Describe the scene.", "gt": "A red box.", "source": "scenes",
      "verifier_type": "open"}, "A green ball.", "No, it differs."),
    ({"image": "pics/c.png", "question": "[q11] Describe the scene.", "gt": "A box.", "source": "scenes",
      "verifier_type": "open"}, "A box.", "Perhaps"),
]
KEPT = {"[q01]", "[q03]", "[q04]", "[q06]", "[q07]", "[q09]"}
DROPPED = {"[q02]": "wrong_answer:digit", "[q05]": "wrong_answer:mcq", "[q08]": "wrong_answer:iou",
           "[q10]": "judge_rejected", "[q11]": "judge_unparsable"}


def _script() -> dict:
    return {"answers": {r["question"][:5]: a for r, a, _ in ROWS},
            "verdicts": {r["question"][:5]: v for r, _, v in ROWS if v}}


def test_six_stages_keep_correct_answers_and_load(tmp_path, servers):
    server, log = stub(tmp_path, script=_script())
    servers.append(server)
    records = write_sources(tmp_path / "src", [r for r, _, _ in ROWS])
    config = construct_config(records, dict.fromkeys(("caption", "distill", "rewrite", "verify"), server.url))
    config.split.rl_fraction = 0.5
    out = tmp_path / "out"
    reports = pipeline.run(config, out, progress=False)

    assert [reports[s]["kept"] for s in ("metadata", "caption", "distill", "rewrite")] == [len(ROWS)] * 4
    verify = reports["verify"]
    assert verify["kept"] == len(KEPT) and verify["dropped"] == {
        "judge_rejected": 1, "judge_unparsable": 1, "wrong_answer:digit": 1, "wrong_answer:iou": 1,
        "wrong_answer:mcq": 1}
    dropped = [json.loads(line) for line in (out / "work" / "verify.dropped.jsonl").read_text().splitlines()]
    meta = {r["id"]: r for r in map(json.loads, (out / "work" / "metadata.jsonl").read_text().splitlines())}
    assert {meta[d["id"]]["question"][:5]: d["reason"] for d in dropped} == DROPPED
    assert "'5' vs ground truth '4'" in next(d["detail"] for d in dropped if d["reason"] == "wrong_answer:digit")
    assert verify["usage"]["sent"] == 3  # the judge saw only the open-ended answers
    for stage in ("caption", "distill", "rewrite"):  # token accounting from the replies' usage
        u = reports[stage]["usage"]
        assert u["sent"] == len(ROWS) and u["cached"] == 0 and u["failed"] == 0 and u["prompt_tokens"] > 0
    assert json.loads((out / "report.json").read_text())["verify"]["kept"] == len(KEPT)

    # the released layout, read by our record reader and the TFDS builder as they read the real files
    sft = read_records(out / SPLIT_FILES["sft"][0], split="sft")
    grpo = read_records(out / SPLIT_FILES["grpo"][0], split="grpo")
    assert {r.question[:5] for r in sft + grpo} == KEPT
    assert (len(sft), len(grpo)) == (reports["split"]["sft"], reports["split"]["grpo"]) == (1, 5)
    assert {p.name for p in (out / "images").iterdir()} == {f"{s}.tar.gz" for s in
                                                          ("clevr_math", "geoqa170k", "synthesis", "coco", "scenes")}
    by_q = {r.question[:5]: r for r in sft + grpo}
    assert by_q["[q03]"].id == "clevr-c" and by_q["[q03]"].ground_truth == "7"
    assert by_q["[q06]"].response.startswith("<think>\nLooking at the image") and \
        by_q["[q06]"].response.endswith("<answer>0.5</answer>")
    raw_sft = json.loads((out / SPLIT_FILES["sft"][0]).read_text())
    assert all(r["ds_answer"].startswith("<think>\nThe caption says") and r["caption"] and r["meta"]["rationale"]
               for r in raw_sft)
    for split, want in (("sft", sft), ("grpo", grpo)):
        b = build_vlaa_thinking(split, manual_dir=out, data_dir=tmp_path / "tfds")
        n = sum(len(b.as_data_source(split=s, decoders={"image": tfds.decode.SkipDecoding()}))
                for s in b.info.splits)
        assert n == len(want)

    # a changed rewrite template re-asks the rewrite stage only; the rest comes from the cache
    n_before = len(requests_logged(log))
    (tmp_path / "rewrite.txt").write_text("[user]\nRetell {reasoning} as seen. Question: {question}\n")
    config.rewrite.template = str(tmp_path / "rewrite.txt")
    again = pipeline.run(config, out, progress=False)
    assert [again[s]["usage"]["sent"] for s in ("caption", "distill", "rewrite", "verify")] == [0, 0, len(ROWS), 0]
    assert again["caption"]["usage"]["cached"] == len(ROWS) and again["verify"]["kept"] == len(KEPT)
    assert len(requests_logged(log)) == n_before + len(ROWS)
    assert {r["model"] for r in requests_logged(log)[n_before:]} == {"rewriter"}


def test_paper_target_caps_sources(tmp_path, servers):
    server, _ = stub(tmp_path, script=_script())
    servers.append(server)
    rows = [r for r, _, _ in ROWS if r["image"].startswith("geoqa170k")]  # GeoQA: RL only in the paper
    config = construct_config(write_sources(tmp_path / "src", rows),
                              dict.fromkeys(("caption", "distill", "rewrite", "verify"), server.url))
    config.split.target = "paper"
    reports = pipeline.run(config, tmp_path / "out", progress=False)
    assert reports["split"]["per_source"]["geoqa170k"] == {"sft": 0, "grpo": 1, "unused": 0, "target_sft": 0,
                                                           "target_grpo": 6499}


def test_bad_source_records_are_named(tmp_path):
    rows = [{"image": "clevr_math/a.png", "question": "How many?", "gt": "3"},
            {"image": "clevr_math/b.png", "question": "How many?"}]
    records = write_sources(tmp_path / "src", rows)
    config = construct_config(records, dict.fromkeys(("caption", "distill", "rewrite", "verify"), "http://127.0.0.1:9/v1"))
    with pytest.raises(DataError, match=r"records.jsonl:2, field 'gt': missing or empty ground truth"):
        pipeline.run(config, tmp_path / "out", stages="metadata", progress=False)
    config.input.skip_bad_records = True
    reports = pipeline.run(config, tmp_path / "out", stages="metadata", progress=False)
    assert reports["metadata"]["kept"] == 1 and reports["metadata"]["dropped"] == {"missing_field": 1}
    # a CSV beside a folder of images; unknown verifier types and missing images are named too
    (tmp_path / "src" / "list.csv").write_text("image,question,gt,verifier_type\nclevr_math/a.png,How many?,3,digit\n"
                                               "clevr_math/zz.png,How many?,3,digit\nclevr_math/a.png,Why?,x,essay\n")
    config.input.path, config.input.images_root = str(tmp_path / "src" / "list.csv"), str(tmp_path / "src")
    reports = pipeline.run(config, tmp_path / "out", stages="metadata", progress=False)
    assert reports["metadata"]["kept"] == 1
    assert reports["metadata"]["dropped"] == {"missing_image": 1, "unknown_verifier_type": 1}
    # a ground truth its own verifier refuses, before any request is paid for
    rows = [{"image": "clevr_math/a.png", "question": "How many?", "gt": "many"},
            {"image": "coco/a.png", "question": "Box?", "gt": "the left one"},
            {"image": "coco/b.png", "question": "Box?", "gt": [0.1, 0.2, 0.3, 0.4]}]
    config.input.path, config.input.images_root = str(write_sources(tmp_path / "src2", rows)), ""
    config.input.skip_bad_records = False
    with pytest.raises(DataError, match=r"records.jsonl:1, record 'clevr_math-\w+', field 'gt': the ground truth "
                                        r"does not pass its own digit verifier \(digit ground truth must be one "
                                        r"number, got 'many'\)"):
        pipeline.run(config, tmp_path / "out", stages="metadata", progress=False)
    config.input.skip_bad_records = True
    reports = pipeline.run(config, tmp_path / "out", stages="metadata", progress=False)
    assert reports["metadata"]["kept"] == 1 and reports["metadata"]["dropped"] == {"unverifiable_gt": 2}
    with pytest.raises(ValueError, match="stage caption reads the output of stage metadata"):
        pipeline.run(config, tmp_path / "empty", stages="caption", progress=False)


def test_endpoints_are_checked_before_any_request(tmp_path, monkeypatch):
    records = write_sources(tmp_path / "src", [{"image": "clevr_math/a.png", "question": "How many?", "gt": "3"}])
    config = construct_config(records, dict.fromkeys(("caption", "distill", "rewrite", "verify"), "http://127.0.0.1:9/v1"))
    monkeypatch.delenv("MY_R1_KEY", raising=False)
    config.distill.api_key_env = "MY_R1_KEY"
    with pytest.raises(ValueError, match="the environment variable MY_R1_KEY .* is not set"):
        pipeline.run(config, tmp_path / "out", progress=False)
    config.distill.api_key_env, config.rewrite.base_url = "", "127.0.0.1:8000"
    with pytest.raises(ValueError, match="config rewrite: base_url must be an http:// or https:// URL"):
        pipeline.run(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
