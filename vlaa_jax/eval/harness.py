"""The evaluation harness: benchmark -> greedy answers -> scores, tables, behaviour metrics, files.

    python -m vlaa_jax.main --config configs/<file>.py:<preset> --workdir DIR --config.mode=eval \
        --config.eval.data=FILE          (the `eval` block: configs/base.py)
    python tools/evaluate.py --ckpt MODEL_DIR --data FILE [--out DIR]

Steps: `load_benchmark` (benchmarks.py) -> per item the data pipeline's own prompt (the chat template
with the system prompt, the image resized by smart_resize within [min_pixels, max_pixels] and
patchified, `ChatFormatter.encode_prompt`) -> the continuous-batching engine (`vlaa_jax.rollout.Engine`,
`eval.batch_size` decode slots, greedy, `eval.max_new_tokens`) -> `Judge` (scoring.py) ->
tables per source / question type / verifier type, behaviour metrics (behaviour.py), accuracy vs
length. Files in the output folder:
    predictions.jsonl  one row per item: id, source, question_type, verifier_type, question,
                       ground_truth, response, answer (as judged), answer_tag_valid, score, correct,
                       num_tokens, truncated
    report.json        settings, tables, behaviour metrics, accuracy-vs-length rows, timing
    table.txt          the plain-text table printed at the end
`evaluate(items, generate_fn, ...)` is the model-free core: any `generate_fn(items) -> Responses` (the
model-backed `ModelGenerator`, or another engine) can be scored and reported the same way.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from data_pipeline.chat import ChatFormatter, resolve_system_prompt, system_prompt_of
from data_pipeline.demo import ensure_demo_data
from data_pipeline.image import decode_image, preprocess_image, processor_pixels
from data_pipeline.records import DataError, Record
from vlaa_jax import sharding as shd
from vlaa_jax.eval import behaviour
from vlaa_jax.eval.benchmarks import BenchmarkError, EvalItem, load_benchmark
from vlaa_jax.eval.scoring import Judge, format_table, tables
from vlaa_jax.rollout import Engine, PromptSource, SamplingConfig
from vlaa_jax.train import common, loop


class Responses(NamedTuple):
    """What a generate function returns for a list of items (same order)."""
    texts: list[str]
    num_tokens: list[int]            # generated tokens per response (stop token included)
    truncated: list[bool]            # hit max_new_tokens without a stop token
    image_hw: list[tuple | None]     # ((orig_h, orig_w), (resized_h, resized_w)) per item, for IoU boxes


GenerateFn = Callable[[Sequence[EvalItem]], Responses]


# ------------------------------------------------------------------------------------ prompts
@dataclasses.dataclass
class PromptBuilder:
    """EvalItem -> prompt token ids + image features, exactly as the data pipeline builds GRPO prompts."""
    tokenizer_dir: str
    system_prompt: str | None
    min_pixels: int
    max_pixels: int

    def __post_init__(self):
        self.formatter = ChatFormatter.create(self.tokenizer_dir, self.system_prompt)

    def __call__(self, item: EvalItem):
        try:
            img = decode_image(item.image.read(), name=item.image.name, min_side=0)
            feats = preprocess_image(img, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            rec = Record(id=item.id, source=item.source, image=item.image.name, question=item.question,
                         response="", ground_truth=item.answer, verifier_type=item.verifier_type, file=item.where)
            ids = self.formatter.encode_prompt(rec, feats.num_tokens)
        except (DataError, ValueError) as e:
            raise BenchmarkError(f"{item.where} (id {item.id!r}): {e}") from e
        return ids, feats


# --------------------------------------------------------------------------------- generation
class ModelGenerator:
    """`GenerateFn` over a Qwen2.5-VL (graphdef, state) with the continuous-batching engine, greedy
    unless `sampling` says otherwise.

    `batch_size` decode slots; items are streamed through them (a finished answer's slot takes the next
    item at once), `CALL_ITEMS` slots' worth of prompts per engine call so that only those items' images
    are held in memory at a time. `generate` is the same over prompts built elsewhere (tools/serve.py)."""

    CALL_ITEMS = 8    # prompts per engine call, in units of batch_size

    def __init__(self, graphdef: Any, state: Any, *, model_config: Any, tokenizer: Any,
                 prompts: PromptBuilder | None, batch_size: int, max_new_tokens: int, mesh: Any = None,
                 rules: Any = None, progress: Callable[[int, int], None] | None = None,
                 sampling: SamplingConfig | None = None):
        self.graphdef, self.state, self.mcfg = graphdef, state, model_config
        self.tokenizer, self.prompts = tokenizer, prompts
        self.max_new_tokens = int(max_new_tokens)
        self.progress = progress
        # The slots split over the data-parallel devices: rounded up to a multiple of their number.
        dp = 1 if mesh is None else shd.data_parallel_size(mesh, rules)
        self.batch_size = -(-int(batch_size) // dp) * dp
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.stop_ids = tuple(sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), self.pad_id}))
        self.engine = Engine(graphdef, model_config, slots=self.batch_size, stop_ids=self.stop_ids,
                             pad_id=self.pad_id, sampling=sampling or SamplingConfig(temperature=0.0), mesh=mesh,
                             rules=rules)

    def generate(self, prompts: Sequence[tuple[Any, Any, Any]], max_new_tokens: int | Sequence[int] | None = None,
                 rng: int = 0) -> tuple[list[str], Any]:
        """(texts, the engine's Generation) for prompts given as (token ids, pixel_values or None,
        image_grid_thw or None); max_new_tokens: one limit or one per prompt (default the generator's)."""
        source = PromptSource.from_prompts(self.mcfg, list(prompts), pad_id=self.pad_id)
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        gen, _ = self.engine.generate(self.state, source, max_new_tokens=limit, rng=rng)
        texts = self.tokenizer.batch_decode([gen.tokens[i, :gen.lengths[i]] for i in range(len(prompts))],
                                            skip_special_tokens=True)
        return texts, gen

    def __call__(self, items: Sequence[EvalItem]) -> Responses:
        if self.prompts is None:
            raise ValueError("this ModelGenerator was built without a PromptBuilder (prompts=None): it answers "
                             "prompts built elsewhere through generate(), not evaluation items")
        out = Responses([], [], [], [])
        step = self.batch_size * self.CALL_ITEMS
        for start in range(0, len(items), step):
            built = [self.prompts(it) for it in items[start:start + step]]
            texts, gen = self.generate([(ids, f.pixel_values, f.image_grid_thw) for ids, f in built])
            out.texts.extend(texts)
            out.num_tokens.extend(int(n) for n in gen.lengths)
            out.truncated.extend(bool(t) for t in gen.truncated)
            out.image_hw.extend((f.original_hw, f.resized_hw) for _, f in built)
            if self.progress is not None:
                self.progress(start + len(built), len(items))
        return out


# ------------------------------------------------------------------------------------- report
def evaluate(items: Sequence[EvalItem], generate_fn: GenerateFn, *, output_dir: str | None = None,
             judge: Judge | None = None, settings: Mapping[str, Any] | None = None, length_bins: int = 4,
             write: bool = True) -> dict[str, Any]:
    """Generates, scores and reports `items`; writes predictions.jsonl / report.json / table.txt to
    `output_dir` (when given and `write`). Returns the report dict."""
    t0 = time.time()
    res = generate_fn(items)
    t_gen = time.time() - t0
    if len(res.texts) != len(items):
        raise ValueError(f"generate_fn returned {len(res.texts)} responses for {len(items)} items")
    judge = judge or Judge()
    rows = judge(items, res.texts, image_hw=res.image_hw, num_tokens=res.num_tokens, truncated=res.truncated)
    scored = [r for r in rows if r.correct is not None]
    tab = tables(rows)
    beh = behaviour.behaviour_metrics([r.response for r in rows], lengths=res.num_tokens, prefix="")
    if scored:
        beh.update({k: v for k, v in behaviour.behaviour_metrics(
            [r.response for r in scored], lengths=[r.num_tokens for r in scored],
            correct=[r.correct for r in scored], num_bins=length_bins, prefix="").items()
            if k.startswith(("accuracy", "length_correct", "length_incorrect"))})
    report = {
        "settings": dict(settings or {}),
        "num_items": len(items),
        **tab,
        "behaviour": beh,
        "accuracy_vs_length": behaviour.accuracy_by_length([r.num_tokens for r in scored],
                                                           [r.correct for r in scored], length_bins) if scored else [],
        "truncated": int(sum(res.truncated)),
        "time": {"generate_s": t_gen, "total_s": time.time() - t0,
                 "tokens_per_s": float(sum(res.num_tokens)) / max(t_gen, 1e-9)},
    }
    table = format_table(tab, title=f"{len(items)} items: {report['settings'].get('data', '')}")
    report["table"] = table
    if output_dir and write:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        (out / "report.json").write_text(json.dumps(_json_safe(report), indent=2, ensure_ascii=False) + "\n")
        (out / "table.txt").write_text(table + "\n")
        report["output_dir"] = str(out)
    return report


def _json_safe(v: Any) -> Any:
    """NaN / inf (e.g. the accuracy of an empty group) -> null, so report.json is strict JSON."""
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


# ----------------------------------------------------------------------------------- mode=eval
# The paper's evaluation settings (sec. 5): greedy, 800 new tokens, images within these pixel bounds.
PAPER_MIN_PIXELS, PAPER_MAX_PIXELS = 4 * 28 * 28, 256 * 32 * 32


def pixel_limits(model_dir: str, min_pixels: int = 0, max_pixels: int = 0) -> tuple[int, int]:
    """Image bounds for generating with the model of `model_dir`, one rule for mode=eval, tools/evaluate.py
    and tools/generate.py: a non-zero argument wins, else what the model's processor config records (a
    trained model's: its training bounds), else the paper's evaluation bounds."""
    lo, hi = processor_pixels(model_dir) or (PAPER_MIN_PIXELS, PAPER_MAX_PIXELS)
    return min_pixels or lo, max_pixels or hi


def default_data(config: Any, workdir: str) -> str:
    """eval.data, or for the demo set the demo data directory (written there first if missing)."""
    if config.eval.data:
        return config.eval.data
    if config.data.source == "demo":
        return str(ensure_demo_data(common.data_dir(config, workdir), config.data.demo_tasks))
    raise ValueError("config key 'eval.data' is empty: give a benchmark file (.tsv / .json / .jsonl) or a "
                     "VLAA-Thinking dataset directory")


def run_eval(config: Any, workdir: str) -> dict[str, Any]:
    """mode="eval": evaluate the model of `config.model` on `config.eval.data`; returns the summary
    (tables + behaviour; full files under eval.output_dir or workdir/eval/<benchmark name>)."""
    e = config.eval
    workdir = os.path.abspath(workdir)
    data = default_data(config, workdir)
    items = load_benchmark(data, images_root=e.images_root or None, ids_file=e.ids_file or None, limit=e.limit)
    run = loop.Run.setup(config, workdir)
    min_pixels, max_pixels = pixel_limits(config.model.path, e.min_pixels, e.max_pixels)
    system_prompt = resolve_system_prompt(config.model.path, e.system_prompt)
    prompts = PromptBuilder(run.tokenizer_dir, system_prompt_of(system_prompt), min_pixels, max_pixels)
    done = [0]

    def progress(k: int, n: int) -> None:
        if k * 10 // n != done[0] * 10 // n or k == n:
            run.message(f"eval: {k}/{n} items generated")
        done[0] = k

    gen = ModelGenerator(run.graphdef, (run.params, run.rest), model_config=run.mcfg, tokenizer=run.tokenizer,
                         prompts=prompts, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                         mesh=run.mesh, rules=run.rules, progress=progress)
    reward_cfg = dict(config.reward.items()) if "reward" in config else {}
    name = Path(data).stem if os.path.isfile(data) else Path(data).name
    out_dir = e.output_dir or os.path.join(workdir, "eval", name)
    settings = {"data": os.path.abspath(data), "model": config.model.path or f"{config.model.init} init",
                "num_items": len(items), "greedy": True, "max_new_tokens": e.max_new_tokens,
                "min_pixels": min_pixels, "max_pixels": max_pixels, "system_prompt": system_prompt,
                "batch_size": e.batch_size}
    report = evaluate(items, gen, output_dir=out_dir, judge=Judge(reward_cfg), settings=settings,
                      length_bins=e.length_bins, write=jax.process_index() == 0)
    run.print_summary([report["table"], f"predictions and report: {out_dir}"])
    summary = {k: report[k] for k in ("overall", "by_source", "by_question_type", "by_verifier_type", "behaviour",
                                      "accuracy_vs_length", "truncated", "time")}
    return _json_safe({**summary, "output_dir": out_dir})
