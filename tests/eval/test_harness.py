"""The harness end to end: a VLMEvalKit TSV with base64 images through `tools/evaluate.py` on a tiny
Qwen2.5-VL with the real vocabulary, checked against HF transformers' own greedy `generate` on the
same checkpoint with HF's image processor and chat template (the reference), and the report files.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from data_pipeline.chat import VLAA_SYSTEM_PROMPT
from data_pipeline.demo import make_demo_data
from tests.fixtures.eval_models import write_tsv
from tools import evaluate as evaluate_tool
from vlaa_jax.eval.benchmarks import load_benchmark
from vlaa_jax.eval.harness import Responses, evaluate

MAX_NEW = 10


def _hf_greedy(model, tokenizer_dir, items, max_new_tokens):
    """HF reference: chat template with the VLAA system prompt, Qwen2VLImageProcessorPil at the paper's
    pixel limits, `generate(do_sample=False)` stopping at <|im_end|> / <|endoftext|>."""
    import torch
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    proc = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=256 * 32 * 32)
    texts = []
    for it in items:
        img = Image.open(io.BytesIO(it.image.read()))
        px = proc(images=[img], return_tensors="pt")
        n = int(px["image_grid_thw"].prod()) // 4
        msgs = [{"role": "system", "content": VLAA_SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question}]}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text.replace("<|image_pad|>", "<|image_pad|>" * n))["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 mm_token_type_ids=(ids == 151655).long(), pixel_values=px["pixel_values"],
                                 image_grid_thw=px["image_grid_thw"], do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=[151645, 151643], pad_token_id=151643)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def test_tsv_round_trip_matches_hf_greedy(eval_hf_model, tmp_path):
    ckpt, hf_model = eval_hf_model
    tsv = write_tsv(str(tmp_path / "MathVista_MINI.tsv"))
    out = tmp_path / "out"
    summary = evaluate_tool.main(["--ckpt", ckpt, "--data", tsv, "--out", str(out), "--batch_size", "8",
                                  "--max_new_tokens", str(MAX_NEW)])
    items = load_benchmark(tsv)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [it.id for it in items]
    assert [(p["ground_truth"], p["verifier_type"], p["source"]) for p in preds] == [
        ("C", "mcq", "geometry"), ("4", "digit", "counting"), ("1.25", "math", "algebra"), ("B", "mcq", "counting")]
    reference = _hf_greedy(hf_model, ckpt, items, MAX_NEW)
    assert [p["response"] for p in preds] == reference
    assert len(set(reference)) > 1  # the image and question reach the model: answers differ per item
    for p in preds:
        assert 1 <= p["num_tokens"] <= MAX_NEW and isinstance(p["correct"], bool)
        assert p["truncated"] == (p["num_tokens"] == MAX_NEW)
    report = json.loads((out / "report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"report.json holds {c}: not strict JSON"))
    assert report["settings"]["max_pixels"] == 256 * 32 * 32 and report["settings"]["system_prompt"] == "vlaa"
    assert report["by_source"]["counting"]["n"] == 2 and set(report["by_question_type"]) == {
        "multi_choice", "free_form"}
    assert report["behaviour"]["length_mean"] == pytest.approx(np.mean([p["num_tokens"] for p in preds]))
    assert summary["overall"]["n"] == 4
    table = (out / "table.txt").read_text()
    assert "geometry" in table and "multi_choice" in table and "overall" in table


def test_evaluate_core_on_vlaa_records(tmp_path):
    """VLAA-Thinking records (the demo GRPO file): the records' own reference answers, given as the
    model's responses, are right for every scorable type; open-ended ones are unscored."""
    make_demo_data(tmp_path / "demo", n=10, seed=1)
    path = tmp_path / "demo" / "VLAA-Thinking-GRPO-25K.json"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    items = load_benchmark(str(path))
    answers = {f"{path.name}:{k + 1}": r["answer"] for k, r in enumerate(raw)}

    def reference_answers(batch):
        texts = [answers[it.id] for it in batch]
        return Responses(texts, [len(t.split()) for t in texts], [False] * len(texts), [None] * len(texts))

    report = evaluate(items, reference_answers, output_dir=str(tmp_path / "out"), settings={"data": str(path)})
    by_type = report["by_verifier_type"]
    assert set(by_type) == {"digit", "mcq", "math", "iou", "open_ended"}
    for t in ("digit", "mcq", "math", "iou"):
        assert (by_type[t]["n"], by_type[t]["accuracy"]) == (2, 1.0), t
    assert by_type["open_ended"]["scored"] == 0 and by_type["open_ended"]["accuracy"] is None
    assert report["overall"]["accuracy"] == 1.0 and report["overall"]["answer_tag_valid"] == 1.0
    assert report["behaviour"]["format_valid"] == 1.0
    rows = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == len(raw) == 10


def test_cli_bad_data_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tquestion\tanswer\n0\tWhat?\t1\n")
    with pytest.raises(SystemExit) as e:
        evaluate_tool.main(["--ckpt", str(tmp_path), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: header has neither an 'image' nor an 'image_path' column"
