"""Record parsing: both file shapes, JSON array vs JSON Lines, reward-type aliases, errors with location."""
import json

import pytest

from data_pipeline.records import BadRecordSummary, DataError, parse_record, read_records

RELEASED = {"image": "clevr_math/CLEVR_train_027977.png", "question": "Subtract all balls. How many objects are left?",
            "answer": "<think>3 cubes remain.</think><answer>3</answer>", "gt": "3", "verifier_type": "digit"}
PIPELINE = {"id": "clevr-17", "image": "clevr_math/CLEVR_train_027977.png",
            "question": "Subtract all balls. How many objects are left?", "gt": 3,
            "ds_answer": "<think>3 cubes remain.</think><answer>3</answer>", "caption": "Three cubes and a ball.",
            "meta": {"caption_model_id": "x", "rationale": "r", "text_question": "q", "url": "u"}}


def test_both_shapes_normalise_to_one_record():
    a = parse_record(RELEASED, file="f.json", line=4, split="grpo")
    b = parse_record(PIPELINE, file="f.json", line=4, split="sft")
    for r in (a, b):
        assert (r.source, r.image, r.ground_truth, r.verifier_type) == ("clevr_math", RELEASED["image"], "3", "digit")
        assert r.response == RELEASED["answer"] and r.question == RELEASED["question"]
    assert a.id == "f.json:4" and b.id == "clevr-17"


@pytest.mark.parametrize("alias,canon", [("digit", "digit"), ("MCQ", "mcq"), ("math", "math"), ("iou", "iou"),
                                         ("bbox", "iou"), ("open", "open_ended"), ("open_ended", "open_ended"),
                                         ("open-ended", "open_ended"), ("general", "open_ended")])
def test_verifier_aliases(alias, canon):
    assert parse_record({**RELEASED, "verifier_type": alias}, split="grpo").verifier_type == canon


def test_box_ground_truth_is_json_text():
    r = parse_record({**RELEASED, "image": "coco/1.jpg", "gt": [0.1, 0.2, 0.5, 0.75], "verifier_type": "iou"})
    assert json.loads(r.ground_truth) == [0.1, 0.2, 0.5, 0.75]


def test_source_reward_type_when_no_verifier_type():
    raw = {k: v for k, v in RELEASED.items() if k != "verifier_type"}
    assert parse_record({**raw, "image": "geoqa170k/a.png"}, split="grpo").verifier_type == "mcq"
    with pytest.raises(DataError, match="verifier_type"):
        parse_record({**raw, "image": "mystery/a.png"}, split="grpo", file="g.json", line=2)
    assert parse_record({**raw, "image": "mystery/a.png"}, split="sft").verifier_type is None


@pytest.mark.parametrize("raw,split,field,kind", [
    ({**RELEASED, "question": None}, "grpo", "question", "missing_field"),
    ({k: v for k, v in RELEASED.items() if k != "question"}, "grpo", "question", "missing_field"),
    ({**RELEASED, "question": "  "}, "grpo", "question", "missing_field"),
    ({k: v for k, v in RELEASED.items() if k != "gt"}, "grpo", "gt", "missing_field"),
    ({**RELEASED, "gt": ""}, "grpo", "gt", "missing_field"),
    ({**RELEASED, "verifier_type": "fuzzy"}, "grpo", "verifier_type", "unknown_verifier_type"),
    ({**RELEASED, "answer": ""}, "sft", "answer", "missing_field"),
    ({k: v for k, v in RELEASED.items() if k != "answer"}, "sft", "answer/ds_answer/response", "missing_field"),
    ({**RELEASED, "image": "../../etc/passwd"}, "grpo", "image", "path_escape"),
    ({**RELEASED, "image": "/abs/x.png"}, "grpo", "image", "path_escape"),
    ({**RELEASED, "image": "clevr_math/../../x.png"}, "grpo", "image", "path_escape"),
    ({**RELEASED, "image": ""}, "grpo", "image", "missing_field"),
])
def test_bad_fields_name_file_line_field(raw, split, field, kind):
    with pytest.raises(DataError) as e:
        parse_record(raw, file="data/VLAA.json", line=12, split=split)
    assert (e.value.kind, e.value.field, e.value.line, e.value.file) == (kind, field, 12, "data/VLAA.json")
    assert "data/VLAA.json:12" in str(e.value) and repr(field) in str(e.value)


def test_json_array_and_json_lines_give_same_records(tmp_path):
    rows = [RELEASED, PIPELINE, {**RELEASED, "image": "geoqa170k/q.png", "verifier_type": "mcq", "gt": "B"}]
    (tmp_path / "a.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    (tmp_path / "l.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = read_records(tmp_path / "a.json", split="sft")
    b = read_records(tmp_path / "l.json", split="sft")
    strip = lambda r: (r.image, r.question, r.response, r.ground_truth, r.verifier_type)  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    assert [r.line for r in a] == [2, 3, 4] and [r.line for r in b] == [1, 2, 3]
    # A pretty-printed array: each record's line is where its object starts.
    (tmp_path / "p.json").write_text(json.dumps(rows, indent=2))
    lines = (tmp_path / "p.json").read_text().splitlines()
    for r in read_records(tmp_path / "p.json", split="sft"):
        assert lines[r.line - 1].strip() == "{"


def test_malformed_json_line_raises_or_is_counted(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(json.dumps(RELEASED) + "\n{not json\n" + json.dumps(RELEASED) + "\n")
    with pytest.raises(DataError) as e:
        read_records(p, split="grpo")
    assert e.value.kind == "malformed_json" and e.value.line == 2 and str(p) in str(e.value)
    summary = BadRecordSummary()
    recs = read_records(p, split="grpo", skip_bad_records=True, summary=summary)
    assert len(recs) == 2 and summary.counts == {"malformed_json": 1}
    assert f"{p}:2" in summary.examples["malformed_json"][0]


def test_broken_json_array_raises_with_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("[\n" + json.dumps(RELEASED) + ",\n{\"image\": oops}\n]")
    with pytest.raises(DataError, match=r"a.json:3") as e:
        read_records(p, split="grpo")
    assert e.value.kind == "malformed_json"
