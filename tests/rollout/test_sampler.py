"""The rollout sampler vs HF `generate` and vs full forwards of our own model (float32, CPU).

Prompts: the fixtures' batch of two rows with images of different sizes, left-padded; `prompt_batch`
pads it further to the 64-token / 256-patch buckets, so bucket padding is exercised everywhere.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

from vlaa_jax import rollout
from vlaa_jax.models import qwen2_5_vl as q
from vlaa_jax.models.qwen2_5_vl.model import Qwen25VL
from vlaa_jax.rollout import sampler as sampler_lib

TINY_STOP = 2   # the tiny config's eos id
TINY_PAD = 0


@dataclasses.dataclass
class Setup:
    model: Qwen25VL
    graphdef: nnx.GraphDef
    state: nnx.State
    prompts: dict
    ref: object


def _setup(ref) -> Setup:
    model = q.from_pretrained(ref.hf_dir)
    graphdef, state = nnx.split(model)
    b = ref.batches["left"]
    prompts = rollout.prompt_batch(model.config, b.input_ids, b.attention_mask, pixel_values=b.pixel_values,
                                   image_grid_thw=b.image_grid_thw, pad_id=TINY_PAD)
    return Setup(model, graphdef, state, prompts, ref)


@pytest.fixture(scope="module")
def tiny(tiny_hf) -> Setup:
    return _setup(tiny_hf)


untied_only = pytest.mark.parametrize("tiny_hf", [False], indirect=True, ids=["untied"])


def _generate(s: Setup, **kw) -> rollout.Generation:
    kw.setdefault("stop_ids", (TINY_STOP,))
    kw.setdefault("pad_id", TINY_PAD)
    return rollout.generate(s.graphdef, s.state, s.prompts, **kw)


def _hf_greedy(hf_model, batch, max_new_tokens, eos, pad):
    with torch.no_grad():
        out = hf_model.generate(**batch.hf_kwargs(), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=pad)
    return out[:, batch.input_ids.shape[1]:].numpy()


def _check_matches_hf(ours: rollout.Generation, hf_tokens: np.ndarray, stop: int):
    width = hf_tokens.shape[1]
    np.testing.assert_array_equal(ours.tokens[:, :width], hf_tokens)
    for r in range(hf_tokens.shape[0]):
        hits = np.flatnonzero(hf_tokens[r] == stop)
        want = hits[0] + 1 if len(hits) else width
        assert ours.lengths[r] == want and ours.stopped[r] == bool(len(hits))


# ------------------------------------------------------------------------------------ HF parity

def test_greedy_matches_hf_generate(tiny):
    """40 greedy tokens, token for token, for a left-padded batch with images of different sizes."""
    b = tiny.ref.batches["left"]
    hf_tokens = _hf_greedy(tiny.ref.model, b, 40, TINY_STOP, TINY_PAD)
    ours = _generate(tiny, max_new_tokens=40, sampling=rollout.SamplingConfig(temperature=0))
    assert ours.tokens.shape == (2, 40)
    _check_matches_hf(ours, hf_tokens, TINY_STOP)
    assert ours.lengths.min() >= 32   # the comparison covers 32+ tokens per row


def test_remat_model_generates_the_same(tiny):
    """The 3B presets train with remat_policy="full"; the sampler runs the same model (no backward, so no
    remat inside the decode loop) and must give the same tokens."""
    model = q.from_pretrained(tiny.ref.hf_dir, remat_policy="full")
    graphdef, state = nnx.split(model)
    kw = dict(max_new_tokens=12, sampling=rollout.SamplingConfig(temperature=0), stop_ids=(), pad_id=TINY_PAD)
    ours = rollout.generate(graphdef, state, tiny.prompts, **kw)
    ref = _generate(tiny, **kw)
    np.testing.assert_array_equal(ours.tokens, ref.tokens)


@pytest.mark.slow
def test_greedy_matches_hf_generate_3b_shaped(qwen3b_shaped_hf):
    from transformers import Qwen2_5_VLForConditionalGeneration
    s = _setup(qwen3b_shaped_hf)
    eos, pad = 151645, 151643
    out = rollout.generate(s.graphdef, s.state, s.prompts, max_new_tokens=32, stop_ids=(eos,), pad_id=pad,
                           sampling=rollout.SamplingConfig(temperature=0))
    del s
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen3b_shaped_hf.hf_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    hf_tokens = _hf_greedy(hf, qwen3b_shaped_hf.batches["left"], 32, eos, pad)
    _check_matches_hf(out, hf_tokens, eos)
    assert out.lengths.min() == 32


# ------------------------------------------------------------------- cache path vs full forward

def _full_logits(s: Setup, out: rollout.Generation, num_samples: int) -> np.ndarray:
    """Logits of one full forward (no cache) over prompt + generated tokens, at the generated slots:
    [R, T, V], where slot t predicts token t."""
    p = s.prompts
    rep = lambda x: np.repeat(x, num_samples, axis=0)  # noqa: E731
    ids = np.concatenate([rep(p["input_ids"]), out.tokens], 1)
    mask = np.concatenate([rep(p["attention_mask"]), out.mask], 1)
    b = s.ref.batches["left"]
    R = ids.shape[0]
    # images of the repeated rows, in row order
    per_row = [[0, 1], [2]]
    pv_rows = np.split(b.pixel_values, np.cumsum(np.prod(b.image_grid_thw, 1))[:-1])
    order = [i for r in range(R) for i in per_row[r // num_samples]]
    logits = np.asarray(s.model(ids, attention_mask=mask, pixel_values=np.concatenate([pv_rows[i] for i in order]),
                                image_grid_thw=b.image_grid_thw[order]))
    L = p["input_ids"].shape[1]
    return logits[:, L - 1:L - 1 + out.tokens.shape[1]]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _at(x, tokens):
    return np.take_along_axis(x, tokens[..., None], -1)[..., 0]


@untied_only
@pytest.mark.parametrize("sampling", [dict(temperature=0.7), dict(temperature=1.3, top_k=20, top_p=0.8)],
                         ids=["T0.7", "T1.3-k20-p0.8"])
def test_cache_logits_and_logprobs_equal_full_forward(tiny, sampling):
    """n = 3 samples per prompt: the logits of the KV-cache path equal a full forward over prompt +
    generated tokens; the returned log-probs are those of the processed (T, top-k, top-p) logits of a
    full forward at the chosen tokens; tokens never leave the top-k / top-p set (finite log-probs)."""
    cfg = rollout.SamplingConfig(**sampling)
    out = _generate(tiny, max_new_tokens=12, num_samples=3, sampling=cfg, rng=5, return_logits=True)
    assert out.tokens.shape == (6, 12) and out.logits.shape == (6, 12, 512)
    full = _full_logits(tiny, out, 3)
    m = out.mask.astype(bool)
    assert m.sum() > 30
    # the KV-cache path's logits (every step, every row) equal the full forward's
    rel = np.abs(out.logits[m] - full[m]).max() / np.abs(full[m]).max()
    assert rel < 1e-4, rel
    processed = np.asarray(rollout.process_logits(full, cfg.temperature, top_k=cfg.top_k,
                                                  top_p=cfg.top_p if cfg.top_p < 1 else None))
    pol_ref = _at(_log_softmax(processed.astype(np.float64)), out.tokens)
    assert np.isfinite(out.logprobs[m]).all() and np.isfinite(pol_ref[m]).all()
    np.testing.assert_allclose(out.logprobs[m], pol_ref[m], atol=2e-4)
    assert (out.logprobs[~m] == 0).all()
    assert (out.tokens[~m] == TINY_PAD).all()


# ------------------------------------------------------------------------------- stopping

@untied_only
def test_stop_ids_and_truncation(tiny):
    greedy = rollout.SamplingConfig(temperature=0)
    free = _generate(tiny, max_new_tokens=20, sampling=greedy, stop_ids=())
    assert free.tokens.shape == (2, 20) and (free.lengths == 20).all() and free.truncated.all()
    stop = int(free.tokens[0, 5])
    out = _generate(tiny, max_new_tokens=20, sampling=greedy, stop_ids=(stop, 10_000))
    for r in range(2):
        hits = np.flatnonzero(free.tokens[r] == stop)
        n = hits[0] + 1 if len(hits) else 20
        assert out.lengths[r] == n and out.stopped[r] == bool(len(hits))
        np.testing.assert_array_equal(out.tokens[r, :n], free.tokens[r, :n])
        assert (out.tokens[r, n:] == TINY_PAD).all()
    assert out.lengths[0] <= 6 and out.stopped[0]


# -------------------------------------------------------------------------- randomness

@untied_only
def test_seeded_sampling_is_reproducible(tiny):
    cfg = rollout.SamplingConfig(temperature=1.0)
    a = _generate(tiny, max_new_tokens=10, num_samples=2, sampling=cfg, rng=3)
    b = _generate(tiny, max_new_tokens=10, num_samples=2, sampling=cfg, rng=3)
    c = _generate(tiny, max_new_tokens=10, num_samples=2, sampling=cfg, rng=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()
    assert (a.tokens[0] != a.tokens[1]).any()   # the n samples of one prompt differ


def _first_token_logits(s: Setup) -> np.ndarray:
    p = s.prompts
    b = s.ref.batches["left"]
    return np.asarray(s.model(p["input_ids"], attention_mask=p["attention_mask"], pixel_values=b.pixel_values,
                              image_grid_thw=b.image_grid_thw))[:, -1].astype(np.float64)


@untied_only
def test_first_token_distribution_and_filters(tiny):
    """2 x 1500 draws of the first token: chi-square against softmax(logits / T); top-k and top-p draws
    stay inside their sets (computed here in NumPy from the full-forward logits)."""
    n = 1500
    logits = _first_token_logits(tiny)
    T = 1.5
    out = _generate(tiny, max_new_tokens=1, num_samples=n, sampling=rollout.SamplingConfig(temperature=T), rng=11)
    for row in range(2):
        probs = np.exp(_log_softmax(logits[row] / T))
        counts = np.bincount(out.tokens[row * n:(row + 1) * n, 0], minlength=probs.size)
        order = np.argsort(-probs)
        big = order[probs[order] * n >= 5]             # categories with expected count >= 5, rest pooled
        obs = np.append(counts[big], n - counts[big].sum())
        exp = np.append(probs[big] * n, n - probs[big].sum() * n)
        stat, pval = scipy.stats.chisquare(obs, exp)
        assert pval > 1e-4, (row, stat, pval)
    # top-k: only the k largest; top-p: only the nucleus
    k = 7
    out = _generate(tiny, max_new_tokens=1, num_samples=400, sampling=rollout.SamplingConfig(temperature=2.0, top_k=k),
                    rng=12)
    for row in range(2):
        allowed = set(np.argsort(-logits[row])[:k].tolist())
        drawn = set(out.tokens[row * 400:(row + 1) * 400, 0].tolist())
        assert drawn <= allowed and len(drawn) > 1
    p = 0.6
    out = _generate(tiny, max_new_tokens=1, num_samples=400, sampling=rollout.SamplingConfig(temperature=2.0, top_p=p),
                    rng=13)
    for row in range(2):
        probs = np.exp(_log_softmax(logits[row] / 2.0))
        order = np.argsort(-probs)
        before = np.cumsum(probs[order]) - probs[order]
        allowed = set(order[before < p].tolist())
        drawn = set(out.tokens[row * 400:(row + 1) * 400, 0].tolist())
        assert drawn <= allowed and len(drawn) > 1


# ------------------------------------------------------------------------- prefill sharing

@untied_only
def test_n_samples_share_one_prefill(tiny, monkeypatch):
    """The traced program runs the model on the prompt (and encodes the images) once, at the prompt
    batch size, and decodes B * n rows; and sample 0 of each prompt with greedy equals n = 1."""
    calls = []
    forward = Qwen25VL.forward

    def spy(self, input_ids, *args, **kw):
        calls.append((tuple(input_ids.shape), kw.get("pixel_values") is not None))
        return forward(self, input_ids, *args, **kw)

    monkeypatch.setattr(Qwen25VL, "forward", spy)
    sampler_lib._compiled.cache_clear()
    L = tiny.prompts["input_ids"].shape[1]
    out = _generate(tiny, max_new_tokens=6, num_samples=4, sampling=rollout.SamplingConfig(temperature=0))
    assert calls == [((2, L), True), ((8, 1), False)]
    _ = _generate(tiny, max_new_tokens=6, num_samples=4, sampling=rollout.SamplingConfig(temperature=0))
    assert len(calls) == 2   # compiled once for this bucket: no retrace
    monkeypatch.undo()
    one = _generate(tiny, max_new_tokens=6, sampling=rollout.SamplingConfig(temperature=0))
    np.testing.assert_array_equal(out.tokens, np.repeat(one.tokens, 4, axis=0))
    sampler_lib._compiled.cache_clear()


# ------------------------------------------------------------------------------- sharding

@untied_only
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)], ids=["1x8x1", "2x2x2"])
def test_sharded_greedy_equals_single_device(tiny, mesh_shape):
    """8 prompts (the two rows four times) on a mesh of 8 CPU devices give the single-device tokens, with
    the images in one image group per data-parallel device (each prefills its own rows' images)."""
    from vlaa_jax import sharding as shd
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    b = tiny.ref.batches["left"]
    ids, mask = np.tile(b.input_ids, (4, 1)), np.tile(b.attention_mask, (4, 1))
    prompts = rollout.prompt_batch(tiny.model.config, ids, mask, pixel_values=np.tile(b.pixel_values, (4, 1)),
                                   image_grid_thw=np.tile(b.image_grid_thw, (4, 1)), pad_id=TINY_PAD)
    kw = dict(max_new_tokens=16, num_samples=2, sampling=rollout.SamplingConfig(temperature=0.9), rng=1,
              stop_ids=(TINY_STOP,), pad_id=TINY_PAD)
    single = rollout.generate(tiny.graphdef, tiny.state, prompts, **kw)
    mesh = shd.make_mesh(mesh_shape)
    dp = shd.data_parallel_size(mesh, "fsdp_tp")
    grouped = rollout.prompt_batch(tiny.model.config, ids, mask, pixel_values=np.tile(b.pixel_values, (4, 1)),
                                   image_grid_thw=np.tile(b.image_grid_thw, (4, 1)), pad_id=TINY_PAD, groups=dp)
    assert grouped["pixel_values"].shape[0] == dp and grouped["vision_window_index"].shape[0] == dp
    spec = shd.batch_shardings(grouped, mesh, "fsdp_tp", batch_size=8)["pixel_values"].spec
    assert spec[0] is not None                   # image groups split over the data-parallel devices
    graphdef, state = nnx.split(q.from_pretrained(tiny.ref.hf_dir, mesh=mesh, rules="fsdp_tp"))
    sharded = rollout.generate(graphdef, state, grouped, mesh=mesh, rules="fsdp_tp", **kw)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_array_equal(sharded.lengths, single.lengths)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-4)
    # rows are independent of the batch: the first prompt's samples equal those of the 2-row batch
    np.testing.assert_array_equal(single.tokens[:2], _generate(tiny, **{**kw, "stop_ids": (TINY_STOP,)}).tokens[:2])


# ----------------------------------------------------------------------------------- host layout

@untied_only
def test_prompt_batch_buckets_and_repads(tiny):
    """Right- or left-padded input gives the same left-padded bucketed batch; positions and deltas
    agree with HF's get_rope_index on the real tokens."""
    ref = tiny.ref
    right = ref.batches["right"]
    p = rollout.prompt_batch(tiny.model.config, right.input_ids, right.attention_mask,
                             pixel_values=right.pixel_values, image_grid_thw=right.image_grid_thw, pad_id=TINY_PAD)
    for k, v in tiny.prompts.items():
        np.testing.assert_array_equal(p[k], v, err_msg=k)
    L0 = ref.batches["left"].input_ids.shape[1]
    L = p["input_ids"].shape[1]
    assert L % 64 == 0 and p["pixel_values"].shape[0] == 1 and p["pixel_values"].shape[1] % 256 == 0
    hf_pos, hf_deltas = ref.positions["left"]
    valid = ref.batches["left"].attention_mask.astype(bool)
    np.testing.assert_array_equal(p["position_ids"][:, :, L - L0:][:, valid], hf_pos[:, valid])
    np.testing.assert_array_equal(p["rope_deltas"], hf_deltas)
    with pytest.raises(ValueError, match="no tokens"):
        rollout.prompt_batch(tiny.model.config, np.zeros((1, 4)), np.zeros((1, 4)), pad_id=0)


# ---------------------------------------------------------------------- decode layout / prefill

def test_prefill_last_only_matches_hf(tiny):
    """`rollout.prefill` (top layer for the last token only; head from the model or from its decode
    view) gives HF's logits of the last prompt token, and a cache that continues like a full forward
    (checked by the cache tests above)."""
    p = {k: jax.numpy.asarray(v) for k, v in tiny.prompts.items()}
    L = p["input_ids"].shape[1]
    graphdef = tiny.graphdef

    @jax.jit
    def run(state, prompts):
        model = nnx.merge(graphdef, state)
        cache, plain = rollout.prefill(model, prompts, L + 4)
        _, viewed = rollout.prefill(model, prompts, L + 4, head=model.decode_view())
        return cache, plain, viewed

    cache, plain, viewed = run(tiny.state, p)
    ref = tiny.ref.logits["left"][:, -1]
    for got in (plain, viewed):
        rel = np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()
        assert rel < 1e-5, rel
    assert int(cache.index) == L and (np.asarray(cache.segments)[:, :L] == tiny.prompts["attention_mask"]).all()


def test_weight_major_decode_equals_standard(tiny):
    """The CPU decode view (transposed kernels, vocab-major head; tied and untied heads) gives the
    standard layout's tokens and logits at every step (up to float32 summation order)."""
    kw = dict(max_new_tokens=8, num_samples=2, sampling=rollout.SamplingConfig(temperature=0.9), rng=2,
              return_logits=True)
    fast = _generate(tiny, weight_major=True, **kw)
    plain = _generate(tiny, weight_major=False, **kw)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)
    m = plain.mask.astype(bool)
    rel = np.abs(fast.logits[m] - plain.logits[m]).max() / np.abs(plain.logits[m]).max()
    assert rel < 1e-5, rel
    np.testing.assert_allclose(fast.logprobs, plain.logprobs, atol=1e-4)


def test_decode_weights_kept_while_the_weights_stay(tiny):
    """The decode-layout copy is made once per set of weights: the same state reuses it (and gives the same
    tokens as a fresh copy); new arrays (a trainer's update) get a new copy, and the old one is dropped."""
    rollout.release_decode_weights()
    first = rollout.decode_weights(tiny.graphdef, tiny.state)
    assert rollout.decode_weights(tiny.graphdef, tiny.state) is first
    kw = dict(max_new_tokens=6, sampling=rollout.SamplingConfig(temperature=0), weight_major=True)
    reused = _generate(tiny, **kw)
    assert rollout.decode_weights(tiny.graphdef, tiny.state) is first          # generate used the kept copy
    new_state = jax.tree.map(lambda x: x * 1.0 if jnp.issubdtype(x.dtype, jnp.floating) else x + 0, tiny.state)
    second = rollout.decode_weights(tiny.graphdef, new_state)
    assert second is not first
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(second)[0]), np.asarray(jax.tree.leaves(first)[0]))
    rollout.release_decode_weights()
    fresh = _generate(tiny, **kw)
    np.testing.assert_array_equal(reused.tokens, fresh.tokens)
