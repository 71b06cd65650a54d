"""The continuous-batching engine vs HF `generate`, vs the static sampler, and against itself with other
pools (float32, CPU, the tiny model).

Prompts: seven of very different lengths (3 to 150 tokens) with no image, one image or two images of
different sizes, so prefill batches have different widths and patch counts, and the pools used are
smaller than the number of requests: every slot is refilled several times in one call.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tests.fixtures import hf_models
from vlaa_jax import rollout
from vlaa_jax.models import qwen2_5_vl as q

STOP, PAD = 2, 0
# (text tokens before, images (h, w) in pixels, text tokens after) per prompt
SHAPES = ((3, (), 0), (40, ((56, 84),), 5), (6, ((224, 308), (56, 56)), 9), (150, (), 0),
          (2, ((140, 420),), 1), (20, ((28, 28),), 60), (9, (), 3))

pytestmark = pytest.mark.parametrize("tiny_hf", [False], indirect=True, ids=["untied"])


def make_prompts(cfg: dict, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    rs = np.random.RandomState(seed)
    v = cfg["vision_config"]
    proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=4096 * 28 * 28, patch_size=v["patch_size"],
                                    merge_size=v["spatial_merge_size"], temporal_patch_size=v["temporal_patch_size"])
    specials = [cfg[k] for k in hf_models.TINY_IDS]
    text = lambda n: [t for t in rs.randint(3, 497, size=n) if t not in specials]  # noqa: E731
    out = []
    for before, images, after in SHAPES:
        ids, pvs, grids = text(before), [], []
        for h, w in images:
            o = proc(images=[Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8))], return_tensors="np")
            pvs.append(o["pixel_values"].astype(np.float32))
            grids.append(o["image_grid_thw"])
            ids += [cfg["vision_start_token_id"]] + [cfg["image_token_id"]] * (int(np.prod(grids[-1])) // 4) + \
                [cfg["vision_end_token_id"]] + text(3)
        ids += text(after)
        out.append((np.asarray(ids, np.int32), np.concatenate(pvs) if pvs else None,
                    np.concatenate(grids) if grids else None))
    return out


@pytest.fixture(scope="module")
def setup(tiny_hf):
    model = q.from_pretrained(tiny_hf.hf_dir)
    graphdef, state = nnx.split(model)
    prompts = make_prompts(tiny_hf.config)
    source = rollout.PromptSource.from_prompts(model.config, prompts, pad_id=PAD)
    return dict(model=model, graphdef=graphdef, state=state, prompts=prompts, source=source, ref=tiny_hf)


def engine(s, slots: int, **kw) -> rollout.Engine:
    kw.setdefault("stop_ids", (STOP,))
    return rollout.Engine(s["graphdef"], s["model"].config, slots=slots, pad_id=PAD, **kw)


def static(s, **kw) -> rollout.Generation:
    """The static sampler on all prompts in one batch (the source's layout of every prompt)."""
    batch = s["source"].layout(np.arange(len(s["prompts"])), 1)
    kw.setdefault("stop_ids", (STOP,))
    return rollout.generate(s["graphdef"], s["state"], batch, pad_id=PAD, **kw)


def hf_greedy(s, prompt, max_new_tokens: int) -> np.ndarray:
    ids, pv, grid = prompt
    cfg = s["ref"].config
    kw = dict(input_ids=torch.from_numpy(ids[None].astype(np.int64)),
              attention_mask=torch.ones((1, len(ids)), dtype=torch.int64),
              mm_token_type_ids=torch.from_numpy((ids[None] == cfg["image_token_id"]).astype(np.int64)))
    if pv is not None:
        kw.update(pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid.astype(np.int64)))
    with torch.no_grad():
        out = s["ref"].model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=STOP,
                                      pad_token_id=PAD)
    return out[0, len(ids):].numpy()


def test_greedy_equals_hf_and_static_with_slots_reused(setup):
    """Greedy, a pool of 2 slots for 7 prompts of very different lengths and images: every row equals HF
    `generate` of its prompt alone and the static sampler's row, token for token."""
    gen, stats = engine(setup, 2, sampling=rollout.SamplingConfig(temperature=0)).generate(
        setup["state"], setup["source"], max_new_tokens=24)
    assert stats.prefill_calls >= 4 and stats.requests == 7        # the 2 slots were refilled
    ref = static(setup, max_new_tokens=24, sampling=rollout.SamplingConfig(temperature=0))
    np.testing.assert_array_equal(gen.tokens, ref.tokens)
    np.testing.assert_array_equal(gen.lengths, ref.lengths)
    np.testing.assert_array_equal(gen.stopped, ref.stopped)
    # a pool of another size multiplies other batch shapes: float32 sums may differ in the last bit
    np.testing.assert_allclose(gen.logprobs, ref.logprobs, atol=1e-5)
    for r, prompt in enumerate(setup["prompts"]):
        hf = hf_greedy(setup, prompt, 24)
        hits = np.flatnonzero(hf == STOP)
        n = hits[0] + 1 if len(hits) else len(hf)
        np.testing.assert_array_equal(gen.tokens[r, :n], hf[:n], err_msg=f"prompt {r}")
        assert gen.lengths[r] == n and gen.stopped[r] == bool(len(hits))
        assert (gen.tokens[r, n:] == PAD).all() and (gen.logprobs[r, n:] == 0).all()
    assert stats.tokens == gen.lengths.sum() and 0 < stats.utilisation <= 1
    assert stats.decode_steps <= stats.slot_steps <= stats.decode_steps * 2   # 2 slots, then 1 (compacted)


def test_sampled_tokens_do_not_depend_on_the_pool(setup):
    """Same seed, n = 3, pools of 3 and 21 slots (one prompt at a time, all at once; the pool compacted
    as rows finish, or not) and the static sampler: the same tokens and log-probs for every request row."""
    kw = dict(num_samples=3, max_new_tokens=20, rng=7)
    sampling = rollout.SamplingConfig(temperature=1.0, top_k=50)
    runs = [engine(setup, S, sampling=sampling, compact=c).generate(setup["state"], setup["source"], **kw)
            for S, c in ((3, True), (21, True), (21, False))]
    outs = [g for g, _ in runs]
    ref = static(setup, sampling=sampling, **kw)
    for gen in outs:
        np.testing.assert_array_equal(gen.tokens, ref.tokens)
        np.testing.assert_array_equal(gen.lengths, ref.lengths)
        np.testing.assert_allclose(gen.logprobs, ref.logprobs, atol=1e-5)
    assert len({tuple(g.lengths) for g in outs}) == 1 and len(set(ref.lengths)) > 1   # rows end at different steps
    # a later row offset continues the numbering: prompt 1's rows alone = rows 3..5 of the whole call
    one = rollout.PromptSource.from_prompts(setup["model"].config, setup["prompts"][1:2], pad_id=PAD)
    part, _ = engine(setup, 3, sampling=sampling).generate(setup["state"], one, row_offset=3, **kw)
    np.testing.assert_array_equal(part.tokens, ref.tokens[3:6])


def test_stops_and_limits_at_every_position(setup):
    """A stop id ends a row right after its first occurrence, at whatever step that is, and a row's own
    max_new_tokens ends it there (truncated, not stopped); the other rows are unaffected."""
    greedy = rollout.SamplingConfig(temperature=0)
    free, _ = engine(setup, 3, sampling=greedy, stop_ids=()).generate(setup["state"], setup["source"],
                                                                      max_new_tokens=12)
    assert (free.lengths == 12).all() and not free.stopped.any()
    row = free.tokens[3]
    for k in range(12):
        stop = int(row[k])
        first = int(np.flatnonzero(row == stop)[0])
        gen, _ = engine(setup, 3, sampling=greedy, stop_ids=(stop,)).generate(
            setup["state"], setup["source"], max_new_tokens=12)
        assert gen.lengths[3] == first + 1 and gen.stopped[3], k
        np.testing.assert_array_equal(gen.tokens[3, :first + 1], row[:first + 1])
        assert (gen.tokens[3, first + 1:] == PAD).all()
        for r in range(7):      # every row: up to its first stop, the free run's tokens
            hits = np.flatnonzero(free.tokens[r] == stop)
            n = hits[0] + 1 if len(hits) else 12
            assert gen.lengths[r] == n and gen.stopped[r] == bool(len(hits))
    limits = np.arange(1, 8)
    gen, stats = engine(setup, 2, sampling=greedy, stop_ids=()).generate(
        setup["state"], setup["source"], max_new_tokens=limits)
    np.testing.assert_array_equal(gen.lengths, limits)
    assert gen.tokens.shape == (7, 7) and not gen.stopped.any()
    for r in range(7):
        np.testing.assert_array_equal(gen.tokens[r, :limits[r]], free.tokens[r, :limits[r]])
    assert stats.tokens == limits.sum()


def test_refilling_beats_static_slot_steps(setup):
    """Rows with very different limits: the engine's slot-steps are far fewer than a static batch's."""
    limits = np.array([40, 2, 3, 2, 4, 3, 2])
    gen, stats = engine(setup, 2, stop_ids=()).generate(setup["state"], setup["source"], max_new_tokens=limits)
    fixed = rollout.static_stats(gen.lengths, [2, 2, 2, 1], stats.wall_s)
    assert stats.tokens == fixed.tokens == limits.sum()
    assert fixed.slot_steps == 2 * (40 + 3 + 4) + 2
    # row 0 decodes beside the others' refills (2 slots), then alone on a compacted pool of 1 slot
    assert stats.slot_steps <= 40 + 16 and stats.utilisation > 0.9 > 0.6 > fixed.utilisation
    wide, wide_stats = engine(setup, 2, stop_ids=(), compact=False).generate(
        setup["state"], setup["source"], max_new_tokens=limits)
    np.testing.assert_array_equal(wide.tokens, gen.tokens)
    assert wide_stats.slot_steps == 2 * wide_stats.decode_steps > stats.slot_steps


def test_bad_requests_fail_clearly(setup):
    with pytest.raises(ValueError, match=r"request row 0 needs 72 cache slots .* holds 64"):
        engine(setup, 2, cache_len=64).generate(setup["state"], rollout.PromptSource.from_prompts(
            setup["model"].config, setup["prompts"][:1], pad_id=PAD), max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine(setup, 2).generate(setup["state"], setup["source"], max_new_tokens=np.arange(7))
    with pytest.raises(ValueError, match=r"prompts \[1\] have no tokens"):
        rollout.PromptSource.from_prompts(setup["model"].config, [(np.ones(3), None, None), (np.zeros(0), None, None)],
                                          pad_id=PAD)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)], ids=["1x8x1", "2x2x2"])
def test_sharded_equals_single_device(setup, mesh_shape):
    """Slots split over the data-parallel devices of a mesh of 8 CPU devices: the single-device tokens."""
    from vlaa_jax import sharding as shd
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = shd.make_mesh(mesh_shape)
    dp = shd.data_parallel_size(mesh, "fsdp_tp")
    kw = dict(num_samples=2, max_new_tokens=10, rng=3)
    sampling = rollout.SamplingConfig(temperature=0.9)
    single, _ = engine(setup, 2 * dp, sampling=sampling).generate(setup["state"], setup["source"], **kw)
    graphdef, state = nnx.split(q.from_pretrained(setup["ref"].hf_dir, mesh=mesh, rules="fsdp_tp"))
    sharded_engine = rollout.Engine(graphdef, setup["model"].config, slots=2 * dp, stop_ids=(STOP,), pad_id=PAD,
                                    sampling=sampling, mesh=mesh, rules="fsdp_tp")
    sharded, _ = sharded_engine.generate(state, setup["source"], **kw)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_array_equal(sharded.lengths, single.lengths)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-4)
