"""The GRPO step's hand-offs on the tiny demo model (one CPU device): PromptBatch -> Rollout -> ScoredRollout ->
TrainBatch -> update, each produced once; the one decision point for old-policy log-probs; the sampler's
log-probs are the training forward's (so grpo.old_logprobs="sampler" is sound)."""
import dataclasses

import jax
import numpy as np
import pytest

from configs import grpo as grpo_config
from vlaa_jax.train import grpo_step, grpo_trainer

PROMPTS, SAMPLES = 8, 2   # 8: the test session's devices (data-parallel size)


def lower_case_reward(texts, records, image_hw):
    """A dense reward that differs between samples (advantages are not all zero)."""
    assert len(records) == len(image_hw) == len(texts)
    r = np.array([sum(c.islower() for c in t) / max(len(t), 1) for t in texts], np.float32)
    return r, {"all/mean": float(r.mean())}


@pytest.fixture(scope="module")
def trainer(demo_data_dir, qwen_tokenizer_dir, tmp_path_factory):
    c = grpo_config.get_config("demo")
    del c.warm_start
    c.data.dir, c.model.tokenizer_dir = demo_data_dir, qwen_tokenizer_dir
    c.model.tiny.embedding_init_std = 0.5      # a peaked random policy: rewards differ within a group
    c.grpo.rollout_batch_prompts, c.grpo.num_samples, c.grpo.max_new_tokens = PROMPTS, SAMPLES, 8
    c.grpo.eval_prompts, c.train.progress_bar = 0, False
    c.train.batch_size, c.train.grad_accum_steps = 8, 1   # two updates per rollout batch: off-policy
    t = grpo_trainer.GRPOTrainer(c, str(tmp_path_factory.mktemp("grpo_step")), reward_fn=lower_case_reward)
    t.setup_training()
    return t


@pytest.fixture(scope="module")
def scored(trainer):
    prompts = next(trainer.loader)
    fn = trainer.step_fn
    return fn.score(fn.rollout(trainer.run.params, prompts, jax.random.key(1), n=SAMPLES))


def test_old_logprob_source_is_decided_in_one_place(trainer):
    s = trainer.settings
    assert s.updates_per_step == 2 and grpo_step.old_logprob_source(s) == "recompute"
    assert grpo_step.old_logprob_source(dataclasses.replace(s, updates_per_step=1)) == "update"
    sampler = dataclasses.replace(s, old_logprobs="sampler")
    assert grpo_step.old_logprob_source(sampler) == "sampler"
    assert grpo_step.old_logprob_source(dataclasses.replace(sampler, top_p=0.9)) == "recompute"  # truncated dist.


def test_rollout_and_scores_are_typed_hand_offs(trainer, scored):
    r = scored.rollout
    rows = PROMPTS * SAMPLES
    assert r.prompt_index.tolist() == np.repeat(np.arange(PROMPTS), SAMPLES).tolist()
    assert r.tokens.shape == r.mask.shape == r.logprobs.shape == (rows, 8) and len(r.texts) == rows
    assert (r.logprobs[r.mask == 0] == 0).all() and (r.logprobs[r.mask > 0] < 0).all()
    np.testing.assert_allclose(scored.rewards, lower_case_reward(r.texts, [None] * rows, [None] * rows)[0])


def test_sampler_logprobs_are_the_training_forward(trainer, scored):
    """The recomputed old-policy log-probs equal the sampler's (fp32 tiny model): with
    grpo.old_logprobs="sampler" the forward is skipped and the ratio barely moves."""
    fn, run = trainer.step_fn, trainer.run
    batch = fn.train_batch(scored, run.params, trainer.ref_params, kl_coef=1e-3)
    m = batch.response_mask > 0
    np.testing.assert_allclose(batch.old_logp[m], scored.rollout.logprobs[m], atol=2e-4)
    # The reference is the initial policy as a bf16 copy: close, not equal.
    assert batch.ref_logp is not None and 0 < np.abs(batch.ref_logp - batch.old_logp)[m].max() < 0.2
    assert batch.advantages.shape == (PROMPTS * SAMPLES,) and np.abs(batch.advantages).max() > 0
    np.testing.assert_allclose(batch.advantages.reshape(PROMPTS, SAMPLES).mean(axis=1), 0, atol=1e-6)
    fn_sampler = dataclasses.replace(fn, settings=dataclasses.replace(fn.settings, old_logprobs="sampler"))
    from_sampler = fn_sampler.train_batch(scored, run.params, trainer.ref_params, kl_coef=1e-3)
    assert from_sampler.old_logp is scored.rollout.logprobs
    # The controller's input, one definition: KL(old || ref) per token; small while the policy is the reference.
    assert 0 < fn.rollout_kl(batch, []) < 1e-3


def test_update_consumes_the_train_batch(trainer, scored):
    fn, run = trainer.step_fn, trainer.run
    batch = fn.train_batch(scored, run.params, trainer.ref_params, kl_coef=1e-3)
    params, opt_state, result = fn.update(run.params, run.opt_state, batch, run.rng)
    run.params, run.opt_state = params, opt_state
    assert set(grpo_step.UPDATE_METRICS) <= set(result.metrics)
    assert np.isfinite(result.metrics["loss"]) and result.metrics["grad_norm"] > 0
    assert result.kl == fn.rollout_kl(batch, [])   # measured on the rollout batch's old / ref log-probs
