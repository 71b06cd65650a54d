"""Benchmark files in their common layouts -> EvalItems (question, options, ground truth, scoring rule,
grouping, image bytes), and clear errors for bad files."""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from data_pipeline.demo import make_demo_data
from tests.fixtures.eval_models import png_b64, write_tsv
from vlaa_jax.eval.benchmarks import BenchmarkError, load_benchmark


def _png(h, w, seed=0) -> bytes:
    return base64.b64decode(png_b64(h, w, seed))


def test_vlmevalkit_tsv(tmp_path):
    items = load_benchmark(write_tsv(str(tmp_path / "MathVista_MINI.tsv")))
    assert [it.id for it in items] == ["0", "1", "2", "3"]
    mc, integer, flt, mmb = items
    # MathVista multiple choice: `choices` list, letter from `answer_option`, options listed in the prompt.
    assert (mc.verifier_type, mc.answer, mc.question_type, mc.source) == ("mcq", "C", "multi_choice", "geometry")
    assert mc.options == {"A": "30", "B": "60", "C": "90", "D": "120"}
    assert mc.question.startswith("What is the largest angle?\nOptions:\nA. 30\nB. 60\nC. 90\nD. 120\n")
    assert Image.open(io.BytesIO(mc.image.read())).size == (112, 84)  # (w, h) of row 0's picture
    assert (integer.verifier_type, integer.answer, integer.question_type) == ("digit", "4", "free_form")
    assert (flt.verifier_type, flt.precision, flt.answer_type) == ("math", 2, "float")
    # MMBench style: A/B/C columns, a hint before the question, image = index of row 1.
    assert (mmb.verifier_type, mmb.answer, mmb.options) == ("mcq", "B", {"A": "red", "B": "blue", "C": "green"})
    assert mmb.question.startswith("Hint: Look at the top left.\nWhich colour is the square?\nOptions:\nA. red")
    assert mmb.image.read() == integer.image.read()


def test_tsv_options_column_and_explicit_verifier(tmp_path):
    rows = [dict(index="7", image=("img", 56, 56, 3), question="Pick one.", answer="A",
                 options='["yes", "no"]', category="x", verifier_type=""),
            dict(index="8", image=("img", 56, 56, 4), question="Where is the cat?", answer="[0.1, 0.1, 0.5, 0.5]",
                 options="", category="x", verifier_type=""),
            dict(index="9", image=("img", 56, 56, 5), question="Colour?", answer="blue", options="", category="y",
                 verifier_type="open")]
    path = tmp_path / "b.tsv"
    cols = ["index", "image", "question", "answer", "options", "category", "verifier_type"]
    with open(path, "w") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            r = dict(r, image=png_b64(*r["image"][1:]))
            f.write("\t".join(r[c] for c in cols) + "\n")
    a, b, c = load_benchmark(str(path))
    assert (a.verifier_type, a.options, a.answer) == ("mcq", {"A": "yes", "B": "no"}, "A")
    assert b.verifier_type == "iou"
    assert c.verifier_type == "open_ended"


def test_mathvista_testmini_json(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(_png(84, 56, 1))
    (tmp_path / "images" / "2.jpg").write_bytes(_png(56, 84, 2))
    data = {
        "1": {"question": "What is the third angle?", "image": "images/1.jpg", "choices": ["30", "60", "90"],
              "unit": None, "precision": None, "answer": "90", "question_type": "multi_choice",
              "answer_type": "text", "pid": "1",
              "metadata": {"source": "GeoQA+", "category": "math-targeted-vqa", "task": "geometry problem solving"},
              "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                       "at the end.\nQuestion: What is the third angle?\nChoices:\n(A) 30\n(B) 60\n(C) 90"},
        "2": {"question": "What is the area?", "image": "images/2.jpg", "choices": None, "precision": 1.0,
              "answer": "2.5", "question_type": "free_form", "answer_type": "float", "pid": "2",
              "metadata": {"source": "TabMWP", "category": "math-targeted-vqa"},
              "query": "Hint: Please answer the question requiring a floating-point number with one decimal "
                       "place.\nQuestion: What is the area?"},
    }
    (tmp_path / "testmini.json").write_text(json.dumps(data))
    mc, ff = load_benchmark(str(tmp_path / "testmini.json"))
    assert (mc.id, mc.verifier_type, mc.answer, mc.source) == ("1", "mcq", "C", "math-targeted-vqa")
    assert mc.question == data["1"]["query"]  # the query already lists the choices: used as is
    assert (ff.verifier_type, ff.precision, ff.answer) == ("math", 1, "2.5")
    assert ff.image.read() == _png(56, 84, 2)


def test_jsonl_with_image_paths(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_png(56, 56))
    rows = [{"id": "q1", "image": "pics/a.png", "question": "How many?", "answer": 12, "category": "count"},
            {"id": "q2", "image": "pics/a.png", "question": "Colour?", "answer": "Red", "category": "colour"},
            {"id": "q3", "image": "pics/a.png", "question": "x?", "answer": "\\sqrt{2}", "category": "math"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_benchmark(str(tmp_path / "b.jsonl"))
    assert [(it.id, it.verifier_type, it.answer, it.source) for it in items] == [
        ("q1", "digit", "12", "count"), ("q2", "text", "Red", "colour"), ("q3", "math", "\\sqrt{2}", "math")]
    assert load_benchmark(str(tmp_path / "b.jsonl"), limit=2)[-1].id == "q2"


def test_demo_dataset_dir_gives_heldout_records(tmp_path):
    make_demo_data(tmp_path, n=20, seed=0)
    heldout = set((tmp_path / "heldout_ids.txt").read_text().split())
    items = load_benchmark(str(tmp_path))
    grpo = [json.loads(l) for l in (tmp_path / "VLAA-Thinking-GRPO-25K.json").read_text().splitlines()]
    # every 10th GRPO record of each source is held out, starting with the first: with 20 records over
    # 5 sources, the first record of each source (lines 1-5)
    assert len(items) == 5 and all(it.id in heldout for it in items)
    assert {it.verifier_type for it in items} == {"digit", "mcq", "math", "iou", "open_ended"}
    for it, raw in zip(items, grpo[:5]):
        assert (it.question, it.answer) == (raw["question"], raw["gt"])
        assert it.verifier_type == raw["verifier_type"]
        Image.open(io.BytesIO(it.image.read())).load()  # read from images/<source>.tar.gz


@pytest.mark.parametrize("content,needle", [
    ("index\timage\tanswer\n0\txx\t1\n", "no 'question' column"),
    ("index\tquestion\tanswer\n0\tq\t1\n", "neither an 'image' nor an 'image_path'"),
    ("index\timage\tquestion\tanswer\n0\t\tq\t1\n", "row 1 (index 0): column 'image' is empty"),
    ("index\timage\tquestion\tanswer\tverifier_type\n0\t{img}\tq\t1\tbogus\n", "unknown verifier_type 'bogus'"),
    ("index\timage\tquestion\tanswer\n0\t{img}\tq\t1\n0\t{img}\tq\t2\n", "duplicate id '0'"),
    ("index\timage\tquestion\tanswer\toptions\n0\t{img}\tq\tA\tnot options\n", "cannot read options"),
])
def test_bad_tsv_errors_name_the_place(tmp_path, content, needle):
    path = tmp_path / "bad.tsv"
    path.write_text(content.replace("{img}", png_b64(56, 56, 0)))
    with pytest.raises(BenchmarkError, match="bad.tsv") as e:
        load_benchmark(str(path))
    assert needle in str(e.value)


def test_unknown_format(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(BenchmarkError, match="unknown benchmark format"):
        load_benchmark(str(tmp_path / "x.parquet"))

