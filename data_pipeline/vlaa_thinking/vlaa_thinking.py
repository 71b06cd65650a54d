"""TFDS builder `vlaa_thinking`: the VLAA-Thinking SFT and GRPO splits as array_record files.

Works without TensorFlow: images are fed as their original encoded bytes (never numpy arrays, which
would make TFDS call `tf.image.encode_png`), and DatasetInfo is built directly. Reading back with
`tfds.data_source` / `builder.as_data_source()` gives random access for Grain.

Usage:
    builder = build_vlaa_thinking("grpo", manual_dir="/data/VLAA-Thinking", data_dir="/data/tfds",
                                  external_image_roots={"coco": "/data/coco/train2017", "vg": "/data/vg"})
    ds = builder.as_data_source(split="train")

`manual_dir` is a local copy of the dataset repository: the JSON files plus `images/` (extracted
folders and/or `images/<source>.tar.gz`, read without extracting). Splits: `train`, and `validation`
when records are held out: ids listed one per line in `manual_dir/heldout_ids.txt` (the demo data tool
writes one) and/or a deterministic hash fraction `holdout_per_mille` of the ids. The paper trains on
everything: use `split="train+validation"` (or no held-out ids) to reproduce it.

Bad records met while building (malformed JSON line, text that is not UTF-8, missing field, unknown
verifier_type, duplicate id, missing / undecodable image, unreadable image archive, path escaping the
images root) raise a DataError naming file, line and field, or with `skip_bad_records=True` are skipped
and counted in `info.metadata["bad_records"]`, which the loader reports. Encoded images are checked by a
full PIL decode when `verify_images` (default). A split left with no example (an empty file, every record
bad) is a DataError naming the file, whatever `skip_bad_records` says: there is nothing to train on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipeline.image import decode_image
from data_pipeline.records import (HELDOUT_IDS_FILE, BadRecordSummary, DataError, Record, find_split_file,
                                   read_records, read_text)
from data_pipeline.vlaa_thinking.images import ImageStore


@dataclasses.dataclass(eq=False)
class VlaaThinkingConfig(tfds.core.BuilderConfig):
    """Config of the `vlaa_thinking` builder.

    Attributes:
      split_name: "sft" or "grpo": which JSON file of the repository to read.
      external_image_roots: source prefix -> directory for images outside the repository, e.g.
        {"coco": "/data/coco/train2017", "vg": "/data/visual_genome"}; a path `coco/x.jpg` is looked up as
        `<root>/x.jpg` then `<root>/coco/x.jpg`.
      skip_bad_records: skip and count bad records instead of raising.
      verify_images: fully decode each image while building (catches truncated / corrupt files early).
      holdout_per_mille: also hold out ids whose sha256 mod 1000 is below this (0 = none).
    """

    split_name: str = "sft"
    external_image_roots: dict = dataclasses.field(default_factory=dict)
    skip_bad_records: bool = False
    verify_images: bool = True
    holdout_per_mille: int = 0


def is_held_out(record_id: str, per_mille: int) -> bool:
    return per_mille > 0 and int(hashlib.sha256(record_id.encode()).hexdigest(), 16) % 1000 < per_mille


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """The info of a dataset built from local files only: no look-up of precomputed info on TFDS's GCS
    bucket, whose attempt (GCS is off offline) leaves an empty /tmp/tmp*tfds directory behind at every
    builder made before the first build (a test session made hundreds)."""

    def initialize_from_bucket(self) -> None:
        return None


class VlaaThinking(tfds.core.GeneratorBasedBuilder):
    """VLAA-Thinking (arXiv 2504.11468): image, question, R1-style response, ground truth, reward type."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "SFT and GRPO splits, original encoded images."}
    BUILDER_CONFIGS = [
        VlaaThinkingConfig(name="sft", split_name="sft", description="VLAA-Thinking-SFT-126K"),
        VlaaThinkingConfig(name="grpo", split_name="grpo", description="VLAA-Thinking-GRPO-25K"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Copy the UCSC-VLAA/VLAA-Thinking dataset repository (the JSON files and images/) into manual_dir. "
        "COCO train2017 and Visual Genome images: set external_image_roots."
    )

    def __init__(self, *, external_image_roots: dict | None = None, skip_bad_records: bool | None = None,
                 verify_images: bool | None = None, holdout_per_mille: int | None = None, **kwargs):
        """Keyword arguments override the config fields of the same name for this build.

        (TFDS refuses a custom config named like a stock one, so overrides live on the builder.)
        """
        super().__init__(**kwargs)
        overrides = dict(external_image_roots=external_image_roots, skip_bad_records=skip_bad_records,
                         verify_images=verify_images, holdout_per_mille=holdout_per_mille)
        self.options: VlaaThinkingConfig = dataclasses.replace(
            self.builder_config, **{k: v for k, v in overrides.items() if v is not None})
        self._bad_summary = BadRecordSummary()

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """This file. (TFDS's lookup via importlib resources needs the `importlib_resources` backport.)"""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "source": tfds.features.Text(),
            "image_path": tfds.features.Text(),
            # Original encoded bytes (PNG/JPEG/...), any mode: decoded and converted by data_pipeline.image.
            "image": tfds.features.Image(shape=(None, None, None)),
            "question": tfds.features.Text(),
            "response": tfds.features.Text(),
            "ground_truth": tfds.features.Text(),
            "verifier_type": tfds.features.Text(),
            "file": tfds.features.Text(),
            "line": tfds.features.Scalar(dtype=np.int64),
        })
        return LocalDatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=features,
            homepage="https://huggingface.co/datasets/UCSC-VLAA/VLAA-Thinking",
            citation="arXiv:2504.11468",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        cfg: VlaaThinkingConfig = self.options
        manual = Path(dl_manager.manual_dir)
        path = find_split_file(manual, cfg.split_name)
        records = read_records(path, split=cfg.split_name, skip_bad_records=cfg.skip_bad_records,
                               summary=self._bad_summary)
        if not records:
            raise self._empty_error(path, "train", read=0)
        ids_file = manual / HELDOUT_IDS_FILE
        held = set(read_text(ids_file).split()) if ids_file.is_file() else set()
        is_val = [r.id in held or is_held_out(r.id, cfg.holdout_per_mille) for r in records]
        train = [r for r, v in zip(records, is_val) if not v]
        val = [r for r, v in zip(records, is_val) if v]
        if not train:
            raise DataError(f"all {len(records)} records are held out for validation ({ids_file.name} and/or "
                            f"holdout_per_mille={cfg.holdout_per_mille}): leave some for training",
                            kind="empty_split", file=os.fspath(path))
        store = ImageStore(manual / "images", cfg.external_image_roots)
        self.info.metadata["bad_records"] = self._bad_summary.to_dict()
        splits = {"train": self._generate_examples(train, store, "train", path)}
        if val:
            splits["validation"] = self._generate_examples(val, store, "validation", path)
        return splits

    def _empty_error(self, path: Path, split: str, *, read: int) -> DataError:
        bad = self._bad_summary
        why = (f"all {read} records of it were bad ({bad}; see the messages above)" if read
               else f"no record of the file is usable ({bad})" if bad.total else "the file holds no record")
        return DataError(f"split {split!r} of vlaa_thinking/{self.options.split_name} would be empty: {why}. Fix "
                         "the data; skip_bad_records cannot help when nothing is left", kind="empty_split",
                         file=os.fspath(path))

    def _generate_examples(self, records: list[Record], store: ImageStore, split: str, path: Path):
        cfg: VlaaThinkingConfig = self.options
        by_image: dict[str, list[Record]] = {}
        for r in records:
            by_image.setdefault(r.image, []).append(r)
        kept, lines = 0, set()
        for rel, data in store.stream(by_image):
            for r in by_image[rel]:
                try:
                    if isinstance(data, DataError):
                        raise data
                    if cfg.verify_images:
                        _verify(data, r)
                except DataError as e:
                    e = e.with_context(file=r.file, line=r.line, record_id=r.id)
                    if not cfg.skip_bad_records:
                        raise e from None
                    self._bad_summary.add(e.kind, str(e))
                    self.info.metadata["bad_records"] = self._bad_summary.to_dict()
                    logging.warning("vlaa_thinking: skipped %s", e)
                    continue
                kept += 1
                # The key is the line (as ever: TFDS orders examples by its hash); records sharing one line
                # (a one-line JSON array) add their id, which is unique within the split.
                key = r.line if r.line not in lines else f"{r.line}:{r.id}"
                lines.add(r.line)
                yield key, {
                    "id": r.id, "source": r.source, "image_path": r.image, "image": data,
                    "question": r.question, "response": r.response, "ground_truth": r.ground_truth,
                    "verifier_type": r.verifier_type or "", "file": os.path.basename(r.file), "line": r.line,
                }
        if not kept:  # TFDS would stop with a bare AssertionError about the split
            raise self._empty_error(path, split, read=len(records))


def _verify(data: bytes, r: Record) -> None:
    """A full decode (the loader's, without its size limits, which are the loader config's)."""
    decode_image(data, name=r.image, max_aspect_ratio=float("inf")).close()


def build_vlaa_thinking(split: str, *, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
                        **config_overrides) -> VlaaThinking:
    """Prepare (once) and return the `vlaa_thinking/<split>` builder; `split` is "sft" or "grpo"."""
    find_split_file(manual_dir, split)  # a missing / empty manual_dir named here (TFDS: a bare AssertionError)
    builder = VlaaThinking(config=split, data_dir=os.fspath(data_dir), file_format="array_record", **config_overrides)
    if builder.is_prepared():
        return builder
    # TFDS prints "Downloading and preparing dataset Unknown size ..." and draws progress bars for a dataset
    # that is built from local files: one line of ours instead.
    print(f"building vlaa_thinking/{split} in {builder.data_dir} from {manual_dir} (once per data dir)", flush=True)
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)),
        )
    return builder
