"""The released VLAA-Thinking layout, written in one place (the demo data and the construction pipeline).

    VLAA-Thinking-SFT-126K.json   one JSON array of records
    VLAA-Thinking-GRPO-25K.json   JSON Lines (the released file is reported to be JSON Lines)
    images/<source>.tar.gz        members named as the records' `image` paths, `<source>/<name>`

`data_pipeline.records` / the TFDS builder read it as they read the released repository.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from data_pipeline.records import SPLIT_FILES


def write_release(out: str | os.PathLike, rows: Mapping[str, Sequence[dict]],
                  images: Mapping[str, Iterable[tuple[str, bytes]]]) -> dict[str, Path]:
    """Writes `rows` ("sft" / "grpo" -> records) and `images` (source -> (member name, encoded bytes)) to
    `out` in the released layout; returns the paths written (split name or `images/<source>` -> path)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    sft_file, grpo_file = out / SPLIT_FILES["sft"][0], out / SPLIT_FILES["grpo"][0]
    sft_file.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows.get("sft", ())) + "\n]\n",
                        encoding="utf-8")
    grpo_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.get("grpo", ())),
                         encoding="utf-8")
    written.update(sft=sft_file, grpo=grpo_file)
    for source, members in images.items():
        path = out / "images" / f"{source}.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))
        written[f"images/{source}"] = path
    return written
