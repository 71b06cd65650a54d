"""TFDS builder: released layout (archives / extracted folders / external roots), bytes kept, no TensorFlow."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from data_pipeline.records import HELDOUT_IDS_FILE, SPLIT_FILES, DataError, read_records
from data_pipeline.vlaa_thinking import ImageStore, build_vlaa_thinking


def _archive_bytes(demo_dir) -> dict[str, bytes]:
    out = {}
    for arch in (Path(demo_dir) / "images").glob("*.tar.gz"):
        with tarfile.open(arch) as tf:
            for m in tf.getmembers():
                out[m.name] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def built(demo_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return {s: build_vlaa_thinking(s, manual_dir=demo_dir, data_dir=data_dir) for s in ("sft", "grpo")}


@pytest.mark.parametrize("split", ["sft", "grpo"])
def test_build_from_archives_keeps_bytes_and_fields(built, demo_dir, split):
    builder = built[split]
    records = {r.id: r for r in read_records(Path(demo_dir) / SPLIT_FILES[split][0], split=split)}
    held = set((Path(demo_dir) / HELDOUT_IDS_FILE).read_text().split())
    train = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    val = builder.as_data_source(split="validation", decoders={"image": tfds.decode.SkipDecoding()})
    assert len(train) + len(val) == len(records) and len(val) == len(held & set(records)) > 0
    originals = _archive_bytes(demo_dir)
    seen = set()
    for ds, is_val in ((train, False), (val, True)):
        for i in range(len(ds)):
            ex = ds[i]
            rid = ex["id"].decode()
            r = records[rid]
            seen.add(rid)
            assert (rid in held) == is_val
            assert ex["image"] == originals[r.image]  # original encoded bytes, not re-encoded
            assert ex["question"].decode() == r.question and ex["response"].decode() == r.response
            assert ex["ground_truth"].decode() == r.ground_truth
            assert ex["verifier_type"].decode() == (r.verifier_type or "")
            assert ex["image_path"].decode() == r.image and int(ex["line"]) == r.line
    assert seen == set(records)
    if split == "grpo":
        types = {records[i].verifier_type for i in seen}
        assert types == {"digit", "mcq", "math", "iou", "open_ended"}


def test_extracted_folders_and_external_roots(demo_dir, tmp_path):
    """Same dataset from extracted image folders, with `coco` images outside the repository."""
    manual = tmp_path / "repo"
    manual.mkdir()
    for f in SPLIT_FILES["grpo"][:1] + (HELDOUT_IDS_FILE,):
        shutil.copy(Path(demo_dir) / f, manual / f)
    coco_root = tmp_path / "coco_train2017"
    for arch in (Path(demo_dir) / "images").glob("*.tar.gz"):
        with tarfile.open(arch) as tf:
            if arch.name.startswith("coco"):
                for m in tf.getmembers():
                    (coco_root / Path(m.name).name).parent.mkdir(parents=True, exist_ok=True)
                    (coco_root / Path(m.name).name).write_bytes(tf.extractfile(m).read())
            else:
                tf.extractall(manual / "images", filter="data")
    with pytest.raises(DataError, match=r"coco/grpo_\d+\.jpg.* not found") as e:
        build_vlaa_thinking("grpo", manual_dir=manual, data_dir=tmp_path / "tfds_a")
    assert e.value.file.endswith(SPLIT_FILES["grpo"][0]) and e.value.line and e.value.field == "image"
    b = build_vlaa_thinking("grpo", manual_dir=manual, data_dir=tmp_path / "tfds_b",
                            external_image_roots={"coco": str(coco_root)})
    n = sum(b.info.splits[s].num_examples for s in ("train", "validation"))
    assert n == len(read_records(manual / SPLIT_FILES["grpo"][0], split="grpo"))
    originals = _archive_bytes(demo_dir)
    ds = b.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    for i in range(len(ds)):
        assert ds[i]["image"] == originals[ds[i]["image_path"].decode()]


def test_image_store_random_access_and_escape(demo_dir, tmp_path):
    store = ImageStore(Path(demo_dir) / "images")
    originals = _archive_bytes(demo_dir)
    for name in list(originals)[::7]:
        assert store.read(name) == originals[name]
    with pytest.raises(DataError) as e:
        store.read("clevr_math/nope.png")
    assert e.value.kind == "missing_image"
    (tmp_path / "images" / "src").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "images" / "src" / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(DataError) as e:
        ImageStore(tmp_path / "images").read("src/link.png")  # a symlink leaving the images root
    assert e.value.kind == "path_escape"


def test_reads_without_tensorflow(built):
    code = ("import sys, tensorflow_datasets as tfds\n"
            "from data_pipeline.vlaa_thinking import VlaaThinking\n"
            f"b = VlaaThinking(config='grpo', data_dir={str(built['grpo'].data_dir.split('/vlaa_thinking')[0])!r})\n"
            "ds = b.as_data_source(split='train', decoders={'image': tfds.decode.SkipDecoding()})\n"
            "x = ds[0]\n"
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
            "print(len(ds))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == built["grpo"].info.splits["train"].num_examples
