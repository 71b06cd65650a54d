"""Grain pipelines that turn the `vlaa_thinking` TFDS data source into fixed-shape SFT / GRPO batches.

Pipeline (per process):
    ArrayRecord data source (random access, raw image bytes)
    -> this process's shard  ds[process_index::process_count]
    -> shuffle(seed), reshuffled each epoch -> repeat(num_epochs)
    -> map(Preprocessor): decode + check image, Qwen2.5-VL pixel values, chat tokens      (per example)
    -> BucketBatch: collect batch_size good examples (or pack them), pad to length / pixel buckets,
       M-RoPE position ids                                                                 (per batch)
    -> mp_prefetch(worker_count)       worker processes each run the steps above on a slice
    -> GRPO: `PromptBatch` (data_pipeline.model_inputs), the typed hand-off to the rollout: per-row
       prompts and image patches, laid out later for each generate call / update micro-batch
Patch size, merge size, temporal patch, window size and the image token ids come from the model
config (`make_loader(..., model=)`), so the batches fit the model they feed.
Bad examples become `Skipped` markers in the map step; the batcher counts them into the batch's
`_summary`, and `Loader` adds those up: `loader.summary()` reports every skipped or truncated record.
`Loader.get_state()` / `set_state()` checkpoint the position (resume yields exactly the next batch).

Batch keys (numpy; B = batch_size, L = a length bucket, P = a pixel bucket, N = image slots):
    input_ids        int32 [B, L]   right-padded (SFT) / left-padded (GRPO prompts), pad = <|endoftext|>
    attention_mask   int32 [B, L]   1 = token (not packed)
    segment_ids      int32 [B, L]   packed SFT only: 1, 2, ... per example in a row, 0 = padding
    position_ids     int32 [3, B, L] M-RoPE (t, h, w); packed: restart at 0 for each segment
    rope_deltas      int32 [B, 1]   (unpacked) max position + 1 - tokens: decode positions are k + delta
    loss_mask        int32 [B, L]   SFT only: 1 on response tokens and their <|im_end|>
    pixel_values     float32 [P, D]     all images of the batch in token order, zero rows after
                                    (D = the model's VisionConfig.patch_dim, 1176 for Qwen2.5-VL)
    image_grid_thw   int32 [N, 3]   one row per image in token order, zero rows after (N = B unpacked,
                                    max_images_per_batch packed)
    num_patches      int32 []       real rows of pixel_values
    example_mask     int32 [B]      1 = real example (0 only in a final partial batch); packed: 1 = used row
  SFT host-side list: id.
  No vision layout: the trainers lay the images out per model batch, as image groups of the mesh's
  data-parallel size (SFT: `train.common.pad_to`; GRPO: `PromptBatch.rows`), so it is computed once.
  GRPO batches are `PromptBatch`es built from these fields (`PromptBatch.from_loader`) and the host-side
    lists (length = real examples) id, source, question, ground_truth, verifier_type, image_hw (original
    (h, w)), resized_hw.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from data_pipeline.buckets import length_buckets, max_image_patches, pick_bucket, pixel_buckets
from data_pipeline.chat import VLAA_SYSTEM_PROMPT, ChatFormatter
from data_pipeline.demo import ensure_demo_data
from data_pipeline.image import decode_image, normalize_patches, preprocess_image
from data_pipeline.model_inputs import PromptBatch
from data_pipeline.records import BadRecordSummary, DataError, Record
from data_pipeline.vlaa_thinking import VlaaThinking, build_vlaa_thinking
from vlaa_jax.models.qwen2_5_vl import Qwen25VLConfig, VisionConfig, mrope_positions

_UNSET = object()


@dataclasses.dataclass
class LoaderConfig:
    """Everything the loader reads from a config (ConfigDict / dict / object; missing fields -> defaults).

    Data location:
      source: "vlaa_thinking" (TFDS dataset under `dir`, built from `manual_dir` if not yet prepared) or
        "demo" (demo data in `dir`, generated there if missing, TFDS built in `dir`/tfds).
      demo_tasks: the demo's task set when it is generated (data_pipeline.demo.TASK_SETS).
      dir: TFDS data dir ("vlaa_thinking") or demo data dir ("demo").
      manual_dir: local copy of the dataset repository, used to build the TFDS dataset if needed.
      external_image_roots: {"coco": dir, "vg": dir} for images outside the repository (build time).
    Examples:
      max_length: tokens per SFT sequence (prompt + response); longer responses are cut (see
        sft_truncation); a prompt alone (with its image tokens) longer than this is a bad record.
      max_prompt_length: tokens per GRPO prompt; longer prompts are bad records (prompt_too_long).
      sft_truncation: "truncate" (cut the response tail, counted as `truncated`) or "drop" (bad record).
      min_pixels / max_pixels: Qwen2.5-VL smart_resize bounds, pixels.
      min_image_side: images with a side below this (pixels) are bad records (0 = let HF upscale them).
      system_prompt: system message; default the VLAA-Thinker prompt; None = the template's default.
      skip_bad_records: skip + count bad records (True) or raise DataError naming file/line/field (False).
    Order and batching:
      batch_size: examples per batch on this process (rows of packed batches). Default: data.batch_size,
        else train.batch_size (global) / process_count when given a whole config with a `train` section.
      seed, shuffle, num_epochs (None = forever): seeded shuffle, reshuffled every epoch.
      process_index / process_count: this process's shard (default jax.process_index()/count()).
      worker_count: Grain worker processes (0 = main process); worker_buffer_size: batches per worker.
      read_threads: threads per process reading + preprocessing examples ahead (Grain ReadOptions).
      length_buckets: padded lengths to choose from (default: max_length / 8, / 4, / 2, / 1).
      pixel_buckets: pixel_values rows to choose from (default: worst case / 8, / 4, / 2, / 1).
      pack: SFT only: pack several examples per row with segment ids.
      max_images_per_batch: image slots N when packing (default 4 * batch_size).
      drop_remainder: drop a final partial batch instead of padding it with empty rows.
    (The model's geometry is not a data field: `make_loader` takes the model config.)
    """

    source: str = "vlaa_thinking"
    dir: str = ""
    manual_dir: str = ""
    demo_tasks: str = "visual"
    external_image_roots: dict = dataclasses.field(default_factory=dict)
    max_length: int = 2048
    max_prompt_length: int = 1024
    sft_truncation: str = "truncate"
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 256 * 28 * 28
    min_image_side: int = 28
    system_prompt: str | None = VLAA_SYSTEM_PROMPT
    skip_bad_records: bool = False
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    process_index: int | None = None
    process_count: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 8
    read_threads: int = 2
    length_buckets: Sequence[int] | None = None
    pixel_buckets: Sequence[int] | None = None
    pack: bool = False
    max_images_per_batch: int | None = None
    drop_remainder: bool = False

    @classmethod
    def from_config(cls, cfg: Any = None, **overrides: Any) -> "LoaderConfig":
        """Fields of `cfg` (a ConfigDict, a dict, an object, or a ConfigDict with a `data` section)."""
        vals: dict[str, Any] = {}
        sections = [cfg]
        global_batch = None
        if cfg is not None and _get(cfg, "data") is not _UNSET:
            sections = [cfg, _get(cfg, "data")]  # top level (seed, ...) then data.* (wins)
            if _get(cfg, "train") is not _UNSET and _get(_get(cfg, "train"), "batch_size") is not _UNSET:
                global_batch = int(_get(_get(cfg, "train"), "batch_size"))
        for sec in sections:
            if sec is None:
                continue
            for f in dataclasses.fields(cls):
                v = _get(sec, f.name)
                if v is not _UNSET:
                    vals[f.name] = v
        aliases = {"worker_count": ("num_workers",)}
        for name, alts in aliases.items():
            for a in alts:
                for sec in sections:
                    if sec is not None and _get(sec, a) is not _UNSET and name not in vals:
                        vals[name] = _get(sec, a)
        vals.update(overrides)
        if "batch_size" not in vals and global_batch is not None:
            # train.batch_size is global: each process loads its share.
            count = vals.get("process_count")
            if count is None:
                count = jax.process_count()
            if global_batch % count:
                raise ValueError(f"train.batch_size {global_batch} is not divisible by {count} processes")
            vals["batch_size"] = global_batch // count
        for k in ("length_buckets", "pixel_buckets"):
            if vals.get(k) is not None:
                vals[k] = tuple(int(x) for x in vals[k])
        if vals.get("external_image_roots") is not None:
            vals["external_image_roots"] = dict(vals["external_image_roots"])
        out = cls(**vals)
        out.validate()
        return out

    def validate(self) -> None:
        if self.sft_truncation not in ("truncate", "drop"):
            raise ValueError(f"data.sft_truncation must be 'truncate' or 'drop', got {self.sft_truncation!r}")
        if self.batch_size < 1:
            raise ValueError(f"data batch_size must be >= 1, got {self.batch_size}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"data.min_pixels {self.min_pixels} > data.max_pixels {self.max_pixels}")


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return _UNSET
    if isinstance(obj, Mapping):
        return obj.get(name, _UNSET)
    try:
        if hasattr(obj, "keys") and name not in obj.keys():  # ConfigDict: avoid its AttributeError
            return _UNSET
        return getattr(obj, name)
    except (AttributeError, KeyError):
        return _UNSET


# ----------------------------------------------------------------------------------------------
# Per example


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A bad record that was skipped (kind + message naming file, line, field)."""

    kind: str
    message: str


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def record_from_example(ex: Mapping[str, Any]) -> Record:
    """Record from one element of the TFDS data source (text features come back as bytes)."""
    return Record(
        id=_text(ex["id"]), source=_text(ex["source"]), image=_text(ex["image_path"]),
        question=_text(ex["question"]), response=_text(ex["response"]), ground_truth=_text(ex["ground_truth"]),
        verifier_type=_text(ex["verifier_type"]) or None, file=_text(ex["file"]), line=int(ex["line"]),
    )


_FORMATTERS: dict[tuple[str, str | None], ChatFormatter] = {}
_FORMATTERS_LOCK = threading.Lock()


def _formatter(tokenizer_dir: str, system_prompt: str | None) -> ChatFormatter:
    """One ChatFormatter per process. Locked: Grain's read threads would otherwise race on transformers'
    lazy imports ("cannot import name 'AutoTokenizer'") and load the tokenizer several times."""
    key = (tokenizer_dir, system_prompt)
    with _FORMATTERS_LOCK:
        if key not in _FORMATTERS:
            _FORMATTERS[key] = ChatFormatter.create(tokenizer_dir, system_prompt)
        return _FORMATTERS[key]


@dataclasses.dataclass
class Preprocessor:
    """Raw TFDS example -> SFT / GRPO example dict, or `Skipped` (or raises DataError).

    Picklable: the tokenizer is loaded lazily (once per worker process) from `tokenizer_dir`.
    """

    formatter: ChatFormatter
    mode: str  # "sft" | "grpo"
    cfg: LoaderConfig
    vision: VisionConfig  # patch, merge and temporal patch sizes of the model's vision tower

    def __call__(self, ex: Mapping[str, Any]) -> dict | Skipped:
        rec = record_from_example(ex)
        try:
            return self.process(rec, ex["image"])
        except DataError as e:
            e = e.with_context(file=rec.file, line=rec.line, record_id=rec.id)
            if not self.cfg.skip_bad_records:
                raise e from None
            return Skipped(e.kind, str(e))

    def process(self, rec: Record, image_bytes: bytes) -> dict:
        c, v = self.cfg, self.vision
        img = decode_image(bytes(image_bytes), name=rec.image, min_side=c.min_image_side)
        feats = preprocess_image(img, min_pixels=c.min_pixels, max_pixels=c.max_pixels, patch_size=v.patch_size,
                                 merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
        out: dict[str, Any] = {"patches_u8": feats.patches_u8, "image_grid_thw": feats.image_grid_thw,
                               "id": rec.id}
        where = {"file": rec.file, "line": rec.line, "record_id": rec.id}
        if self.mode == "sft":
            ids, mask = self.formatter.encode_sft(rec, feats.num_tokens)
            prompt_len = int(np.argmax(mask)) if mask.any() else len(ids)
            truncated = False
            if prompt_len >= c.max_length:
                raise DataError(f"prompt is {prompt_len} tokens (with {feats.num_tokens} image tokens), "
                                f"max_length is {c.max_length}", kind="prompt_too_long", field="question", **where)
            if len(ids) > c.max_length:
                if c.sft_truncation == "drop":
                    raise DataError(f"example is {len(ids)} tokens, max_length is {c.max_length}",
                                    kind="too_long", field="answer", **where)
                ids, mask, truncated = ids[: c.max_length], mask[: c.max_length], True
            out.update(input_ids=ids, loss_mask=mask, truncated=truncated,
                       truncation_note=f"{rec.file}:{rec.line} record {rec.id!r}" if truncated else "")
        else:
            if not rec.ground_truth:
                raise DataError("missing ground truth", kind="missing_field", field="gt", **where)
            if rec.verifier_type is None:
                raise DataError("missing verifier_type", kind="missing_field", field="verifier_type", **where)
            ids = self.formatter.encode_prompt(rec, feats.num_tokens)
            if len(ids) > c.max_prompt_length:
                raise DataError(f"prompt is {len(ids)} tokens (with {feats.num_tokens} image tokens), "
                                f"max_prompt_length is {c.max_prompt_length}", kind="prompt_too_long",
                                field="question", **where)
            out.update(input_ids=ids, source=rec.source, question=rec.question, ground_truth=rec.ground_truth,
                       verifier_type=rec.verifier_type, image_hw=feats.original_hw, resized_hw=feats.resized_hw)
        return out


# ----------------------------------------------------------------------------------------------
# Per batch


class BatchBuilder:
    """Pads lists of examples into fixed-shape batches (host NumPy), adds M-RoPE positions and the vision
    layout, both in the geometry and token ids of `model`."""

    def __init__(self, cfg: LoaderConfig, mode: str, pad_id: int, model: Qwen25VLConfig):
        self.cfg, self.mode, self.pad_id, self.model = cfg, mode, pad_id, model
        max_len = cfg.max_length if mode == "sft" else cfg.max_prompt_length
        lb = tuple(sorted(set(cfg.length_buckets))) if cfg.length_buckets else length_buckets(max_len)
        self.length_buckets = tuple(b for b in lb if b < max_len) + (max_len,) if max(lb) < max_len else lb
        self.packed = bool(cfg.pack and mode == "sft")
        self.max_images = (cfg.max_images_per_batch or 4 * cfg.batch_size) if self.packed else cfg.batch_size
        default = pixel_buckets(self.max_images, cfg.max_pixels, model.vision)
        pb = tuple(sorted(set(cfg.pixel_buckets))) if cfg.pixel_buckets else default
        worst = self.max_images * max_image_patches(cfg.max_pixels, model.vision)
        self.pixel_buckets = pb if max(pb) >= worst else pb + (default[-1],)

    def _positions(self, input_ids: np.ndarray, grids: np.ndarray, mask: np.ndarray):
        m = self.model
        return mrope_positions(input_ids, grids, mask, spatial_merge_size=m.vision.spatial_merge_size,
                               image_token_id=m.image_token_id, vision_start_token_id=m.vision_start_token_id)

    def _pixels(self, examples: Sequence[dict], out: dict) -> None:
        """Image slots and uint8 patches; `finalize_batch` turns the patches into padded float32
        pixel_values."""
        pv = [e["patches_u8"] for e in examples]
        total = sum(len(p) for p in pv)
        P = pick_bucket(total, self.pixel_buckets, "pixel_values rows")
        grids = np.zeros((self.max_images, 3), np.int32)
        grids[: len(examples)] = np.concatenate([e["image_grid_thw"] for e in examples], axis=0)
        out.update(_patches_u8=np.concatenate(pv, axis=0), _pixel_rows=np.int32(P), image_grid_thw=grids,
                   num_patches=np.int32(total))

    def build(self, examples: Sequence[dict]) -> dict:
        """Unpacked batch of up to batch_size examples (fewer only for a final partial batch)."""
        B = self.cfg.batch_size
        L = pick_bucket(max(len(e["input_ids"]) for e in examples), self.length_buckets, "sequence length")
        ids = np.full((B, L), self.pad_id, np.int32)
        att = np.zeros((B, L), np.int32)
        loss = np.zeros((B, L), np.int32) if self.mode == "sft" else None
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            sl = slice(0, n) if self.mode == "sft" else slice(L - n, L)  # SFT right-, GRPO left-padded
            ids[i, sl] = e["input_ids"]
            att[i, sl] = 1
            if loss is not None:
                loss[i, sl] = e["loss_mask"]
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": att}
        if loss is not None:
            out["loss_mask"] = loss
        self._pixels(examples, out)
        pos, deltas = self._positions(ids, out["image_grid_thw"][: len(examples)], att)
        out["position_ids"], out["rope_deltas"] = pos.astype(np.int32), deltas.astype(np.int32)
        mask = np.zeros((B,), np.int32)
        mask[: len(examples)] = 1
        out["example_mask"] = mask
        out["id"] = [e["id"] for e in examples]
        if self.mode == "grpo":
            for k in ("source", "question", "ground_truth", "verifier_type", "image_hw", "resized_hw"):
                out[k] = [e[k] for e in examples]
        return out

    def build_packed(self, rows: Sequence[Sequence[dict]]) -> dict:
        """Packed SFT batch: rows[i] = examples packed into row i (segments 1, 2, ...)."""
        B = self.cfg.batch_size
        L = pick_bucket(max(sum(len(e["input_ids"]) for e in r) for r in rows), self.length_buckets,
                        "packed row length")
        ids = np.full((B, L), self.pad_id, np.int32)
        seg = np.zeros((B, L), np.int32)
        loss = np.zeros((B, L), np.int32)
        ordered = [e for r in rows for e in r]  # token order = row-major, segment order
        maxlen = max(len(e["input_ids"]) for e in ordered)
        seg_ids = np.full((len(ordered), maxlen), self.pad_id, np.int32)
        seg_att = np.zeros((len(ordered), maxlen), np.int32)
        k = 0
        for i, r in enumerate(rows):
            off = 0
            for j, e in enumerate(r):
                n = len(e["input_ids"])
                ids[i, off:off + n] = e["input_ids"]
                loss[i, off:off + n] = e["loss_mask"]
                seg[i, off:off + n] = j + 1
                seg_ids[k, :n] = e["input_ids"]
                seg_att[k, :n] = 1
                off, k = off + n, k + 1
        out: dict[str, Any] = {"input_ids": ids, "segment_ids": seg, "loss_mask": loss}
        self._pixels(ordered, out)
        # One mrope call with every segment as its own row: positions restart per segment.
        seg_pos, _ = self._positions(seg_ids, out["image_grid_thw"][: len(ordered)], seg_att)
        pos = np.zeros((3, B, L), np.int32)
        k = 0
        for i, r in enumerate(rows):
            off = 0
            for e in r:
                n = len(e["input_ids"])
                pos[:, i, off:off + n] = seg_pos[:, k, :n]
                off, k = off + n, k + 1
        out["position_ids"] = pos
        mask = np.zeros((B,), np.int32)
        mask[: len(rows)] = [1 if r else 0 for r in rows]
        out["example_mask"] = mask
        out["id"] = [e["id"] for e in ordered]
        return out


class BucketBatchIterDataset(grain.IterDataset):
    """Batches good examples (skipping + counting `Skipped`), optionally packing SFT examples into rows."""

    def __init__(self, parent: grain.IterDataset, builder: BatchBuilder, drop_remainder: bool):
        super().__init__(parent)
        self._builder, self._drop_remainder = builder, drop_remainder

    def __iter__(self) -> "_BucketBatchIterator":
        return _BucketBatchIterator(self._parent.__iter__(), self._builder, self._drop_remainder)

    def __str__(self) -> str:
        return f"BucketBatchIterDataset(batch_size={self._builder.cfg.batch_size}, packed={self._builder.packed})"


class _BucketBatchIterator(grain.DatasetIterator):
    """State = parent state *before* the first element not yet in an emitted batch: restoring re-reads it."""

    def __init__(self, parent: grain.DatasetIterator, builder: BatchBuilder, drop_remainder: bool):
        super().__init__(parent)
        self._b, self._drop_remainder = builder, drop_remainder
        self._carry: tuple[dict, Any] | None = None  # (example, parent state before it)
        self._state = parent.get_state()
        self._emitted = False

    def _pull(self) -> tuple[Any, Any]:
        if self._carry is not None:
            (ex, st), self._carry = self._carry, None
            return ex, st
        st = self._parent.get_state()
        return next(self._parent), st

    def __next__(self) -> dict:
        b = self._b
        summary = BadRecordSummary()
        B = b.cfg.batch_size
        max_len = b.length_buckets[-1]
        rows: list[list[dict]] = [[] for _ in range(B)] if b.packed else []
        used = [0] * B
        n_images = 0
        got_any = False
        while True:
            try:
                ex, st = self._pull()
            except StopIteration:
                if not got_any or self._drop_remainder:
                    if summary.total and not self._emitted:
                        raise ValueError(f"data: no usable example in this shard; bad records: {summary}") from None
                    if summary.total:  # only when dropping a final partial batch
                        logging.warning("data: dropped final partial batch; bad records in it: %s", summary)
                    raise
                break
            if isinstance(ex, Skipped):
                summary.add(ex.kind, ex.message)
                continue
            if ex.get("truncated"):
                summary.add("truncated", ex["truncation_note"])
            n = len(ex["input_ids"])
            if b.packed:
                slot = next((i for i in range(B) if used[i] + n <= max_len), None)
                if slot is None or n_images + 1 > b.max_images:
                    self._carry = (ex, st)  # starts the next batch
                    break
                rows[slot].append(ex)
                used[slot] += n
                n_images += 1
                got_any = True
            else:
                rows.append(ex)
                got_any = True
                if len(rows) == B:
                    self._absorb_skipped(summary)
                    break
        self._emitted = True
        self._state = self._carry[1] if self._carry is not None else self._parent.get_state()
        batch = b.build_packed([r for r in rows]) if b.packed else b.build(rows)
        batch["_summary"] = summary.to_dict()
        return batch

    def _absorb_skipped(self, summary: BadRecordSummary) -> None:
        """Count the bad records right after a full batch into it, so that bad records at the very end of
        the data are reported too; the first good example after them is carried into the next batch."""
        while True:
            try:
                ex, st = self._pull()
            except StopIteration:
                return
            if not isinstance(ex, Skipped):
                self._carry = (ex, st)
                return
            summary.add(ex.kind, ex.message)

    def get_state(self) -> dict:
        return {"parent": self._state}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._carry = None
        self._state = state["parent"]


# ----------------------------------------------------------------------------------------------
# Sources and the public factory


def _ensure_absl_flags_parsed() -> None:
    """Grain workers read absl flags; scripts and tests that do not use absl.app.run must mark them parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def open_data_source(cfg: LoaderConfig, config_name: str, tfds_split: str = "train"):
    """Random-access TFDS data source of `vlaa_thinking/<config_name>` (raw image bytes), building it if needed.

    Returns (data_source, build-time bad-record summary dict).
    """
    if cfg.source == "demo":
        if not cfg.dir:
            raise ValueError("data.dir must name the demo data directory when data.source == 'demo'")
        demo = ensure_demo_data(cfg.dir, cfg.demo_tasks)
        manual_dir, data_dir = demo, demo / "tfds"
    elif cfg.source == "vlaa_thinking":
        if not cfg.dir:
            raise ValueError("data.dir must name the TFDS data dir when data.source == 'vlaa_thinking'")
        manual_dir, data_dir = (Path(cfg.manual_dir) if cfg.manual_dir else None), Path(cfg.dir)
    else:
        raise ValueError(f"data.source must be 'vlaa_thinking' or 'demo', got {cfg.source!r}")
    overrides = dict(skip_bad_records=cfg.skip_bad_records)
    if cfg.external_image_roots:
        overrides["external_image_roots"] = dict(cfg.external_image_roots)
    builder = VlaaThinking(config=config_name, data_dir=os.fspath(data_dir), file_format="array_record")
    if not builder.is_prepared():
        if manual_dir is None:
            raise FileNotFoundError(f"vlaa_thinking/{config_name} is not prepared in {data_dir} and data.manual_dir "
                                    "is not set (a local copy of the dataset repository to build it from)")
        builder = build_vlaa_thinking(config_name, manual_dir=manual_dir, data_dir=data_dir, **overrides)
    source = builder.as_data_source(split=tfds_split, decoders={"image": tfds.decode.SkipDecoding()})
    return source, dict(builder.info.metadata.get("bad_records", {}))


def finalize_batch(batch: dict, vision: VisionConfig) -> dict:
    """uint8 patches -> padded float32 `pixel_values` [P, vision.patch_dim] (exact HF values), in the
    consuming process.

    Runs after the worker processes: a batch crosses processes as uint8 patches without the temporal
    repeat (8x fewer bytes than float32 pixel values, and no bucket padding).
    """
    patches = batch.pop("_patches_u8")
    pixel_values = np.zeros((int(batch.pop("_pixel_rows")), vision.patch_dim), np.float32)
    normalize_patches(patches, out=pixel_values, temporal_patch_size=vision.temporal_patch_size)
    batch["pixel_values"] = pixel_values
    return batch


class EpochShuffleMapDataset(grain.MapDataset):
    """Shuffle reseeded each epoch: a NumPy permutation of the epoch (seed, epoch), computed once per epoch.

    Same contract as `MapDataset.shuffle` before `repeat` (index = epoch * n + i); Grain's per-index
    `index_shuffle` cost ~1 ms per element on this host, the permutation costs nanoseconds per element.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffleMapDataset(seed={self._seed})"

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._parent))
            self._perms = {epoch: perm, **{k: v for k, v in self._perms.items() if k == epoch - 1}}
        return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        epoch, i = divmod(int(index), n)
        return self._parent[int(self._perm(epoch)[i]) + epoch * n]


class Loader:
    """Iterator of batches with checkpointable state and a report of skipped / truncated records."""

    def __init__(self, dataset: grain.IterDataset, build_summary: dict | None, mode: str, num_records: int,
                 max_pixels: int):
        self._dataset = dataset
        self._max_pixels = max_pixels
        self._it = iter(dataset)
        self.mode, self.num_records = mode, num_records
        self._build_summary = BadRecordSummary.from_dict(build_summary or {})
        self._summary = BadRecordSummary()

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict | PromptBatch:
        """SFT: a dict of the fields above; GRPO: a PromptBatch."""
        batch = next(self._it)
        self._summary.merge(BadRecordSummary.from_dict(batch.pop("_summary")))
        return PromptBatch.from_loader(batch, self._max_pixels) if self.mode == "grpo" else batch

    def summary(self) -> dict:
        """{"build": skipped while building the TFDS dataset, "load": skipped/truncated while loading}."""
        return {"build": self._build_summary.to_dict(), "load": self._summary.to_dict()}

    def get_state(self) -> dict:
        return {"iterator": self._it.get_state(), "summary": self._summary.to_dict()}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["iterator"])
        self._summary = BadRecordSummary.from_dict(state.get("summary", {}))

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _process_shard(cfg: LoaderConfig) -> tuple[int, int]:
    if cfg.process_index is not None and cfg.process_count is not None:
        return int(cfg.process_index), int(cfg.process_count)
    return jax.process_index(), jax.process_count()


def make_dataset(source: Sequence, cfg: LoaderConfig, mode: str, tokenizer_dir: str,
                 model: Qwen25VLConfig) -> grain.IterDataset:
    """The Grain pipeline over any random-access source of TFDS-shaped examples, batched for `model`."""
    if mode not in ("sft", "grpo"):
        raise ValueError(f"mode must be 'sft' or 'grpo', got {mode!r}")
    index, count = _process_shard(cfg)
    ds = grain.MapDataset.source(source)
    if count > 1:
        ds = ds[index::count]
    if cfg.shuffle:
        ds = EpochShuffleMapDataset(ds, cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    fmt = _formatter(os.fspath(tokenizer_dir), cfg.system_prompt)
    ours = (fmt.image_pad_id, fmt.vision_start_id)
    if ours != (model.image_token_id, model.vision_start_token_id):
        raise ValueError(f"{tokenizer_dir}: <|image_pad|>, <|vision_start|> are ids {ours}, the model config "
                         f"expects {(model.image_token_id, model.vision_start_token_id)}")
    ds = ds.map(Preprocessor(fmt, mode, cfg, model.vision))
    builder = BatchBuilder(cfg, mode, fmt.pad_id, model)
    it_ds = BucketBatchIterDataset(
        ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * cfg.batch_size)),
        builder, cfg.drop_remainder)
    if cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                               per_worker_buffer_size=cfg.worker_buffer_size))
    return it_ds.map(functools.partial(finalize_batch, vision=model.vision))


def count_verifier_types(cfg: Any, split: str) -> dict[str, int]:
    """verifier_type -> number of records of a split ("<config>[:<tfds split>]", as `make_loader` takes;
    "" for records without one), read from its TFDS source without decoding any image (building the
    source first if needed). For checks before a run (e.g. the GRPO trainer's open-ended scorer check)."""
    c = LoaderConfig.from_config(cfg)
    name, _, tfds_split = split.partition(":")
    source, _ = open_data_source(c, name, tfds_split or "train")
    counts: dict[str, int] = {}
    for start in range(0, len(source), 256):
        for ex in source.__getitems__(range(start, min(start + 256, len(source)))):
            kind = _text(ex["verifier_type"])
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def make_loader(cfg: Any, split: str, tokenizer_dir: str | os.PathLike, *,
                model: Qwen25VLConfig = Qwen25VLConfig(), mode: str | None = None, **overrides: Any) -> Loader:
    """SFT or GRPO batches of a `vlaa_thinking` split, shaped for `model`.

    Args:
      cfg: a config with the LoaderConfig fields (ml_collections ConfigDict, its `data` section, a dict).
      split: "<config>[:<tfds split>]": "sft", "grpo", "grpo:validation", "sft:train+validation".
      tokenizer_dir: directory with the Qwen2.5-VL tokenizer (see data_pipeline.tokenizer).
      model: the model the batches feed: its vision geometry (patch, merge, temporal patch and window
        sizes) and image token ids. Default: the released Qwen2.5-VL (3B and 7B share them).
      mode: "sft" (prompt + response, loss mask) or "grpo" (prompts + ground truth); default: the config.
      overrides: LoaderConfig fields overriding `cfg`.
    """
    c = LoaderConfig.from_config(cfg, **overrides)
    name, _, tfds_split = split.partition(":")
    source, build_summary = open_data_source(c, name, tfds_split or "train")
    mode = mode or name
    return Loader(make_dataset(source, c, mode, os.fspath(tokenizer_dir), model), build_summary, mode,
                  len(source), c.max_pixels)
