"""The GRPO trainer at scale settings, in process on a (2, 1, 4) mesh of the 8 test devices (data-parallel
size 2): micro-batched static generate calls and the continuous engine with pools of several sizes give
the one-call tokens, the prompt batches take a bounded set of shapes, the reference is a bf16 copy sharded like the params (its log-probs: test_grpo_reference.py), and
the config's attention kernel reaches the model that trains and samples."""
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import grpo as grpo_config
from data_pipeline import buckets
from data_pipeline.model_inputs import PATCH_MULTIPLE, round_up
from vlaa_jax.models.qwen2_5_vl.layout import row_length
from vlaa_jax.rollout import Generation, concat_generations
from vlaa_jax.train import config_check, grpo_step, grpo_trainer

PROMPTS = 8
MAX_PIXELS = 224 * 224   # demo images (112..336 px a side) resize to many grids of up to 256 patches


def _config(demo_data_dir: str, tokenizer_dir: str):
    c = grpo_config.get_config("demo")
    c.data.dir = demo_data_dir
    c.data.min_pixels, c.data.max_pixels = 56 * 56, MAX_PIXELS
    c.data.max_prompt_length = 256            # room for an image of 64 tokens
    c.model.tokenizer_dir = tokenizer_dir
    c.model.attention_impl = "cudnn"          # XLA on the CPU: the setting must still reach the model
    c.model.tiny.embedding_init_std = 1.0     # a peaked random policy: greedy argmax far from ties
    c.sharding.mesh_shape, c.sharding.rules = (2, 1, 4), "fsdp"
    c.grpo.rollout_batch_prompts, c.grpo.max_new_tokens = PROMPTS, 8
    c.grpo.eval_prompts = 0
    c.train.progress_bar = False
    return c


@pytest.fixture(scope="module")
def trainer(demo_data_dir, qwen_tokenizer_dir, tmp_path_factory):
    c = _config(demo_data_dir, qwen_tokenizer_dir)
    config_check.validate(c, grpo_config.get_config("demo"))
    return grpo_trainer.GRPOTrainer(c, str(tmp_path_factory.mktemp("grpo_rollout")))


@pytest.fixture(scope="module")
def loader(trainer):
    loader = trainer.run.loader(trainer.config.data.train_split, batch_size=PROMPTS, mode="grpo", shuffle=False,
                                num_epochs=None)
    yield loader
    loader.close()


@pytest.fixture(scope="module")
def prompts(loader):
    return next(loader)   # a PromptBatch


@contextlib.contextmanager
def _settings(trainer, **changes):
    """The trainer's GRPO step with other settings (e.g. grpo.rollout_micro_batch) for a while."""
    fn = trainer.step_fn
    saved, fn.settings = fn.settings, dataclasses.replace(fn.settings, **changes)
    try:
        yield
    finally:
        fn.settings = saved


def _rollout(trainer, prompts, micro: int = 0, *, greedy: bool = True, n: int = 1, slots: int = 0):
    """A static rollout in calls of `micro` prompts, or (slots > 0) a continuous one over `slots` slots."""
    engine = "continuous" if slots else "static"
    with _settings(trainer, rollout_micro_batch=micro, rollout_engine=engine, rollout_slots=slots):
        return trainer.step_fn.rollout(trainer.run.params, prompts, jax.random.key(3), n=n, greedy=greedy)


def test_micro_batched_rollout_gives_the_one_call_tokens(trainer, prompts):
    one = _rollout(trainer, prompts, 0)
    assert one.tokens.shape == (PROMPTS, trainer.config.grpo.max_new_tokens)
    assert one.mask.sum() > 2 * PROMPTS  # responses of several tokens: the comparison means something
    np.testing.assert_array_equal(one.prompt_index, np.arange(PROMPTS))
    assert len(one.texts) == PROMPTS
    programs = trainer.step_fn.rollout_programs
    before = len(programs)
    for micro in (4, 2):
        got = _rollout(trainer, prompts, micro)
        np.testing.assert_array_equal(got.tokens, one.tokens)
        np.testing.assert_array_equal(got.mask, one.mask)
        np.testing.assert_allclose(got.logprobs, one.logprobs, atol=1e-4)
        assert got.texts == one.texts
    # Two new prompt-batch shapes (4 and 2 prompts per call); the same calls again compile nothing new.
    assert len(programs) == before + 2
    _rollout(trainer, prompts, 4)
    assert len(programs) == before + 2
    for slots in (8, 2):      # the continuous engine: all rows at once / one row per device, refilled
        got = _rollout(trainer, prompts, slots=slots)
        np.testing.assert_array_equal(got.tokens, one.tokens)
        np.testing.assert_allclose(got.logprobs, one.logprobs, atol=1e-4)
        assert got.stats.slots == slots and got.stats.tokens == one.mask.sum()
    assert got.stats.prefill_calls >= PROMPTS // 2 and 0 < got.stats.utilisation <= 1


def test_micro_batched_sampled_rollout_gives_the_one_call_samples(trainer, prompts):
    """Sampled (n = 2): each call continues the row numbering of the PRNG streams, so the samples do not
    depend on how the prompts are split into calls."""
    with _settings(trainer, temperature=50.0):        # the peaked test policy, flattened
        one = _rollout(trainer, prompts, 0, greedy=False, n=2)
        got = [_rollout(trainer, prompts, 2, greedy=False, n=2), _rollout(trainer, prompts, greedy=False, n=2, slots=4)]
    np.testing.assert_array_equal(one.prompt_index, np.repeat(np.arange(PROMPTS), 2))
    assert len({tuple(t) for t in one.tokens}) > 1
    for g in got:
        np.testing.assert_array_equal(g.tokens, one.tokens)
        np.testing.assert_allclose(g.logprobs, one.logprobs, atol=1e-4)


def test_rollout_prompt_batches_take_a_bounded_set_of_shapes(trainer, loader):
    """Prompts with images of many sizes: every call's image groups are padded to one of the loader's
    pixel buckets for their prompts, so the shapes seen stay within buckets x prompt lengths."""
    micro, fn = 4, trainer.step_fn
    per_group = micro // fn.image_groups(micro)
    keys, lengths, totals, patch_rows = set(), set(), set(), set()
    with _settings(trainer, rollout_micro_batch=micro):
        for _ in range(12):
            p = next(loader)
            for batch in fn.rollout_batches(p):
                keys.add(grpo_step.program_key(batch, n=4, greedy=False))
                lengths.add(batch["input_ids"].shape)
                patch_rows.add(batch["pixel_values"].shape[-2])
            totals.update(sum(map(len, p.patches[i:i + per_group])) for i in range(0, PROMPTS, per_group))
    table = set(buckets.pixel_buckets(per_group, MAX_PIXELS, trainer.run.mcfg.vision))
    # The images vary in size: rounding each group's patches up to a multiple of 64 would give shapes
    # outside the bucket set (one compile each).
    assert {round_up(t, PATCH_MULTIPLE) for t in totals} - table
    assert patch_rows <= table, (patch_rows, table)
    rows_shapes = {row_length(n) for n in range(1, MAX_PIXELS // 196 + 1)}
    assert len(keys) <= len(table) * len(lengths) * (len(rows_shapes) + 1)


def test_rollout_micro_batch_must_split_over_the_data_parallel_devices(demo_data_dir, tmp_path):
    c = _config(demo_data_dir, "qwen")
    c.grpo.rollout_engine = "static"
    c.grpo.rollout_micro_batch = 1   # divides the 8 prompts, not the data-parallel size 2
    config_check.validate(c, grpo_config.get_config("demo"))
    with pytest.raises(config_check.ConfigError, match=r"'grpo\.rollout_micro_batch'.*data-parallel size 2"):
        grpo_trainer.GRPOTrainer(c, str(tmp_path))
    c.grpo.rollout_engine, c.grpo.rollout_slots = "continuous", 5   # not a multiple of the 2 devices
    with pytest.raises(config_check.ConfigError, match=r"'grpo\.rollout_slots'.*data-parallel size 2"):
        grpo_trainer.GRPOTrainer(c, str(tmp_path))
    assert not (tmp_path / "tokenizer").exists()  # refused before anything was built


def test_reference_is_a_bf16_copy_sharded_like_the_params(trainer):
    params, ref = jax.tree.leaves(trainer.run.params), jax.tree.leaves(trainer.ref_params)
    assert trainer.config.grpo.ref_dtype == "bfloat16" and len(params) == len(ref)
    for p, r in zip(params, ref):
        assert p.dtype == jnp.float32 and r.dtype == jnp.bfloat16 and r.shape == p.shape
        assert r.sharding.is_equivalent_to(p.sharding, p.ndim)
        np.testing.assert_allclose(np.asarray(r, np.float32), np.asarray(p), rtol=2 ** -8, atol=1e-30)


def test_attention_impl_reaches_the_trainers_model(trainer):
    """model.attention_impl (cudnn; XLA on the CPU) in the trainer's model config, in the model it
    trains and in the graph the rollout engine samples with (model_config's branches: tests/test_main.py)."""
    assert trainer.run.mcfg.attention_impl == "cudnn"
    model = nnx.merge(trainer.run.graphdef, trainer.run.params, trainer.run.rest)
    assert model.config.attention_impl == "cudnn"
    fn = trainer.step_fn  # its graph is what `GRPOStep.rollout` hands to rollout.generate
    assert nnx.merge(fn.graphdef, trainer.run.params, fn.rest).config.attention_impl == "cudnn"


def test_concat_generations_pads_narrower_parts():
    a = Generation(np.full((2, 3), 7, np.int32), np.full((2, 3), -1.0, np.float32), np.array([3, 3], np.int32),
                   np.array([True, False]))
    b = Generation(np.full((1, 2), 5, np.int32), np.full((1, 2), -2.0, np.float32), np.array([2], np.int32),
                   np.array([True]))
    out = concat_generations([a, b], pad_id=9)
    np.testing.assert_array_equal(out.tokens, [[7, 7, 7], [7, 7, 7], [5, 5, 9]])
    np.testing.assert_array_equal(out.logprobs, [[-1, -1, -1], [-1, -1, -1], [-2, -2, 0]])
    np.testing.assert_array_equal(out.mask, [[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(out.stopped, [True, False, True])
    assert out.logits is None
