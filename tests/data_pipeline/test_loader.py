"""Grain loaders: batches vs the HF processor + HF get_rope_index, packing, resume, sharding, workers."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from data_pipeline.buckets import length_buckets
from data_pipeline.chat import VLAA_SYSTEM_PROMPT
from data_pipeline.loader import LoaderConfig, make_loader
from data_pipeline.model_inputs import PromptBatch
from data_pipeline.records import SPLIT_FILES, read_records
from vlaa_jax.models.qwen2_5_vl import Qwen25VLConfig, VisionConfig

IMAGE_PAD = 151655


@pytest.fixture(scope="module")
def references(demo_dir, hf_processor):
    """id -> HF processor outputs (SFT: whole conversation; GRPO: prompt) for every demo record."""
    images = {}
    for arch in (Path(demo_dir) / "images").glob("*.tar.gz"):
        with tarfile.open(arch) as tf:
            for m in tf.getmembers():
                images[m.name] = tf.extractfile(m).read()
    refs = {}
    for split in ("sft", "grpo"):
        for r in read_records(Path(demo_dir) / SPLIT_FILES[split][0], split=split):
            msgs = [{"role": "system", "content": VLAA_SYSTEM_PROMPT},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.question}]}]
            if split == "sft":
                msgs.append({"role": "assistant", "content": r.response})
            text = hf_processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=split == "grpo")
            img = Image.open(io.BytesIO(images[r.image]))
            out = hf_processor(text=[text], images=[img], return_tensors="np")
            refs[(split, r.id)] = dict(out, record=r, size=img.size)
    return refs


def _prompt_fields(p: PromptBatch) -> dict:
    """A GRPO PromptBatch in the loader's field names (the per-row images back to back)."""
    return {"input_ids": p.input_ids, "attention_mask": p.attention_mask, "position_ids": p.position_ids,
            "rope_deltas": p.rope_deltas, "image_grid_thw": p.grids, "pixel_values": np.concatenate(p.patches),
            "example_mask": np.ones(len(p), np.int32), "id": [r["id"] for r in p.records],
            "records": p.records, "image_hw": p.image_hw}


def _ids(batch) -> list[str]:
    return [r["id"] for r in batch.records] if isinstance(batch, PromptBatch) else batch["id"]


def _rows(batch):
    mask = batch["attention_mask"] if "attention_mask" in batch else (batch["segment_ids"] > 0)
    return [batch["input_ids"][i][mask[i] == 1] for i in range(len(batch["input_ids"]))]


@pytest.mark.parametrize("mode", ["sft", "grpo"])
def test_batches_match_hf(demo_cfg, qwen_tokenizer_dir, qwen_tokenizer, references, hf_rope_index, mode):
    loader = make_loader(demo_cfg, mode, qwen_tokenizer_dir)
    cfg = LoaderConfig.from_config(demo_cfg)
    for _, batch in zip(range(3), loader):
        if mode == "grpo":
            batch = _prompt_fields(batch)
        B = cfg.batch_size
        ids, att = batch["input_ids"], batch["attention_mask"]
        assert ids.dtype == att.dtype == batch["position_ids"].dtype == batch["image_grid_thw"].dtype == np.int32
        assert batch["pixel_values"].dtype == np.float32 and batch["pixel_values"].shape[1] == 1176
        assert ids.shape[0] == B and batch["position_ids"].shape == (3, *ids.shape)
        assert ids.shape[1] in length_buckets(cfg.max_length if mode == "sft" else cfg.max_prompt_length)
        assert batch["example_mask"].tolist() == [1] * B
        offset = 0
        for i, rid in enumerate(batch["id"]):
            ref = references[(mode, rid)]
            row = ids[i][att[i] == 1]
            np.testing.assert_array_equal(row, ref["input_ids"][0])
            real = np.flatnonzero(att[i])
            if mode == "sft":  # right padding; loss on the response + <|im_end|>
                assert real[0] == 0 and real[-1] == len(real) - 1
                assert qwen_tokenizer.decode(ids[i][batch["loss_mask"][i] == 1]) == ref["record"].response + "<|im_end|>"
            else:  # left padding; reward inputs on the host
                assert real[-1] == ids.shape[1] - 1 and real[0] == ids.shape[1] - len(real)
                r = ref["record"]
                rec = batch["records"][i]
                assert (rec["ground_truth"], rec["verifier_type"]) == (r.ground_truth, r.verifier_type)
                w, h = ref["size"]
                (oh, ow), (rh, rw) = batch["image_hw"][i]
                assert (oh, ow) == (h, w) and (rh // 14, rw // 14) == tuple(ref["image_grid_thw"][0][1:])
            np.testing.assert_array_equal(batch["image_grid_thw"][i], ref["image_grid_thw"][0])
            n = len(ref["pixel_values"])
            np.testing.assert_allclose(batch["pixel_values"][offset:offset + n], ref["pixel_values"], atol=1e-6, rtol=0)
            offset += n
        assert len(batch["pixel_values"]) == offset if mode == "grpo" else (
            int(batch["num_patches"]) == offset and not batch["pixel_values"][offset:].any())
        pos, deltas = hf_rope_index(ids, (ids == IMAGE_PAD).astype(np.int64), batch["image_grid_thw"][:B], att)
        np.testing.assert_array_equal(batch["position_ids"][:, att == 1], pos[:, att == 1])
        np.testing.assert_array_equal(batch["rope_deltas"], deltas)
    assert loader.summary()["load"]["total"] == 0


def test_packed_sft(demo_cfg, qwen_tokenizer_dir, references, hf_rope_index):
    loader = make_loader(demo_cfg, "sft", qwen_tokenizer_dir, pack=True, max_images_per_batch=12)
    n_examples = 0
    for batch in loader:
        seg, ids = batch["segment_ids"], batch["input_ids"]
        assert "attention_mask" not in batch and batch["image_grid_thw"].shape == (12, 3)
        k, offset = 0, 0
        for i in range(seg.shape[0]):
            for s in range(1, seg[i].max() + 1):
                cols = np.flatnonzero(seg[i] == s)
                assert np.all(np.diff(cols) == 1)
                ref = references[("sft", batch["id"][k])]
                np.testing.assert_array_equal(ids[i, cols], ref["input_ids"][0])
                one = ref["input_ids"]
                pos, _ = hf_rope_index(one, (one == IMAGE_PAD).astype(np.int64), ref["image_grid_thw"], np.ones_like(one))
                np.testing.assert_array_equal(batch["position_ids"][:, i, cols], pos[:, 0])  # restart per segment
                np.testing.assert_array_equal(batch["image_grid_thw"][k], ref["image_grid_thw"][0])
                n = len(ref["pixel_values"])
                np.testing.assert_allclose(batch["pixel_values"][offset:offset + n], ref["pixel_values"], atol=1e-6)
                offset, k = offset + n, k + 1
        assert k == len(batch["id"]) and not batch["image_grid_thw"][k:].any()
        n_examples += k
    assert n_examples == loader.num_records  # every example packed exactly once (one epoch)


@pytest.mark.parametrize("pack", [False, True])
def test_resume_mid_epoch_yields_next_batch(demo_cfg, qwen_tokenizer_dir, pack):
    kw = dict(num_epochs=2, pack=pack)
    a = make_loader(demo_cfg, "sft", qwen_tokenizer_dir, **kw)
    for _ in range(4):
        next(a)
    state = json.loads(json.dumps(a.get_state()))  # a checkpoint is plain JSON
    expected = [next(a) for _ in range(6)]  # crosses into the second epoch when packing
    b = make_loader(demo_cfg, "sft", qwen_tokenizer_dir, **kw)
    b.set_state(state)
    for want in expected:
        got = next(b)
        assert got["id"] == want["id"]
        for key in ("input_ids", "position_ids", "loss_mask", "pixel_values", "image_grid_thw"):
            np.testing.assert_array_equal(got[key], want[key])


def test_epochs_reshuffle_and_shards_partition(demo_cfg, qwen_tokenizer_dir):
    def ids(**kw):
        return [i for b in make_loader(demo_cfg, "grpo", qwen_tokenizer_dir, drop_remainder=False, **kw) for i in _ids(b)]

    two = ids(num_epochs=2)
    n = len(two) // 2
    assert sorted(two[:n]) == sorted(two[n:]) and two[:n] != two[n:]
    assert ids(num_epochs=1) == two[:n] and ids(num_epochs=1, seed=99) != two[:n]
    shard0 = ids(process_index=0, process_count=2)
    shard1 = ids(process_index=1, process_count=2)
    assert not set(shard0) & set(shard1) and sorted(shard0 + shard1) == sorted(two[:n])


def test_worker_processes(demo_cfg, qwen_tokenizer_dir):
    """Two Grain worker processes give the same examples as the in-process loader."""
    serial = [i for b in make_loader(demo_cfg, "grpo", qwen_tokenizer_dir) for i in _ids(b)]
    loader = make_loader(demo_cfg, "grpo", qwen_tokenizer_dir, worker_count=2)
    got = [i for b in loader for i in _ids(b)]
    loader.close()
    assert sorted(got) == sorted(serial)


@pytest.mark.slow
def test_worker_processes_resume(demo_cfg, qwen_tokenizer_dir):
    loader = make_loader(demo_cfg, "grpo", qwen_tokenizer_dir, worker_count=2)
    [next(loader) for _ in range(2)]
    state = json.loads(json.dumps(loader.get_state()))
    rest = list(loader)
    loader.close()
    again = make_loader(demo_cfg, "grpo", qwen_tokenizer_dir, worker_count=2)
    again.set_state(state)
    nxt = next(again)
    again.close()
    assert _ids(nxt) == _ids(rest[0])
    np.testing.assert_array_equal(nxt.input_ids, rest[0].input_ids)


def test_config_from_configdict(demo_cfg):
    data = {k: v for k, v in demo_cfg.items() if k not in ("batch_size", "process_count")}
    c = ml_collections.ConfigDict({"seed": 5, "data": data, "train": {"batch_size": 16}})
    lc = LoaderConfig.from_config(c, process_count=4)
    assert (lc.seed, lc.batch_size, lc.max_length, lc.source) == (3, 4, 512, "demo")  # data.seed wins; 16 / 4
    assert LoaderConfig.from_config(c, batch_size=6).batch_size == 6
    with pytest.raises(ValueError, match="sft_truncation"):
        LoaderConfig.from_config(demo_cfg, sft_truncation="cut")


_ABSL_SCRIPT = """
import json, sys
from absl import app
from data_pipeline.loader import make_loader

def main(argv):
    cfg = json.loads(argv[1])
    loader = make_loader(cfg, "grpo", argv[2], worker_count=2)
    ids = [r["id"] for b in loader for r in b.records]
    loader.close()
    print(json.dumps(sorted(ids)))

if __name__ == "__main__":
    app.run(main)
"""


@pytest.mark.slow
def test_workers_under_absl_app_run(demo_cfg, qwen_tokenizer_dir, tmp_path):
    script = tmp_path / "run_loader.py"
    script.write_text(_ABSL_SCRIPT)
    root = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, str(script), json.dumps(demo_cfg), qwen_tokenizer_dir], cwd=root,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-3000:]
    serial = sorted(i for b in make_loader(demo_cfg, "grpo", qwen_tokenizer_dir) for i in _ids(b))
    assert json.loads(out.stdout.strip().splitlines()[-1]) == serial


@pytest.mark.parametrize("vision", [VisionConfig(), VisionConfig(patch_size=16, window_size=64)],
                         ids=["qwen2.5-vl", "patch16-window64"])
def test_geometry_from_model_config(demo_cfg, qwen_tokenizer_dir, vision):
    """Patch size, patch width and merge size come from the model config. No vision layout: the trainers
    lay the images out per model batch (common.pad_to, PromptBatch.rows)."""
    model = Qwen25VLConfig(vision=vision)
    batch = next(make_loader(demo_cfg, "sft", qwen_tokenizer_dir, model=model))
    assert batch["pixel_values"].shape[1] == vision.patch_dim
    assert not [k for k in batch if k.startswith("vision_")]
    n_tokens = np.prod(batch["image_grid_thw"], axis=1) // vision.spatial_merge_size ** 2
    np.testing.assert_array_equal((batch["input_ids"] == IMAGE_PAD).sum(axis=1), n_tokens)
    prompts = next(make_loader(demo_cfg, "grpo", qwen_tokenizer_dir, model=model))
    for i, (_, (rh, rw)) in enumerate(prompts.image_hw):
        assert tuple(prompts.grids[i]) == (1, rh // vision.patch_size, rw // vision.patch_size)
        assert prompts.patches[i].shape == (rh * rw // vision.patch_size ** 2, vision.patch_dim)
        n_tokens = int(np.prod(prompts.grids[i])) // vision.spatial_merge_size ** 2
        assert (prompts.input_ids[i] == IMAGE_PAD).sum() == n_tokens


def test_tokenizer_must_match_model_token_ids(demo_cfg, qwen_tokenizer_dir):
    with pytest.raises(ValueError, match="image_pad"):
        make_loader(demo_cfg, "grpo", qwen_tokenizer_dir, model=Qwen25VLConfig(image_token_id=7))
