"""The open-ended reward for real: a GRPO step whose open-ended prompts are scored by a (tiny, random) JAX
reward model on the policy's (2, 1, 4) mesh, its counters in metrics.jsonl and TensorBoard, and the run
stopping before anything is built when open-ended records meet no chosen scorer."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from configs import grpo as grpo_config
from data_pipeline.chat import load_tokenizer
from vlaa_jax import sharding as shd
from vlaa_jax.models import reward_model as rm_lib
from vlaa_jax.models.qwen2_5_vl.loading import copy_processor_files
from vlaa_jax.rewards.jax_scorer import RewardModelScorer
from vlaa_jax.rewards.mixed import REWARD_COUNTERS
from vlaa_jax.rewards.open_ended import PromptImage, ScoreRequest
from vlaa_jax.train import common, config_check, grpo_trainer

PROMPTS = 6  # the demo's five sources in turn, in file order: the fifth prompt is open-ended


def _config(demo_data_dir, tokenizer_dir, **reward):
    c = grpo_config.get_config("demo")
    del c.warm_start
    c.data.dir = demo_data_dir                  # data.demo_tasks 'reasoning' layout: all five reward types
    c.data.shuffle = False                      # file order: the sources in turn
    c.model.tokenizer_dir = tokenizer_dir
    c.sharding.mesh_shape, c.sharding.rules = (2, 1, 4), "fsdp"
    c.grpo.rollout_batch_prompts, c.grpo.num_samples, c.grpo.max_new_tokens = PROMPTS, 2, 4
    c.grpo.eval_prompts = 0
    c.train.num_steps, c.train.batch_size, c.train.checkpoint_every = 1, 2 * PROMPTS, 0
    c.train.progress_bar, c.train.export_hf = False, False
    for k, v in reward.items():
        c.reward[k] = v
    return c


@pytest.fixture(scope="module")
def tiny_rm_dir(demo_data_dir, qwen_tokenizer_dir, tmp_path_factory):
    """A random reward model with the demo policy's architecture (real Qwen vocabulary), `score` layout."""
    c = _config(demo_data_dir, qwen_tokenizer_dir)
    mcfg = common.model_config(c, load_tokenizer(qwen_tokenizer_dir))
    rm = rm_lib.random_reward_model(mcfg, seed=3)
    out = str(tmp_path_factory.mktemp("tiny_rm"))
    rm_lib.save_reward_model(out, rm.config, rm.state, rm.head, layout="score")
    copy_processor_files(qwen_tokenizer_dir, out)
    return out


def test_grpo_step_scores_open_ended_prompts_with_the_jax_reward_model(demo_data_dir, qwen_tokenizer_dir,
                                                                        tiny_rm_dir, tmp_path):
    c = _config(demo_data_dir, qwen_tokenizer_dir, open_ended="jax_rm", reward_model_path=tiny_rm_dir,
                reward_model_dtype="float32", reward_model_batch_size=4)
    reference = grpo_config.get_config("demo")
    del reference.warm_start
    config_check.validate(c, reference)
    trainer = grpo_trainer.GRPOTrainer(c, str(tmp_path))
    scorer = trainer.step_fn.reward_fn.scorer
    assert type(scorer).__name__ == "RewardModelScorer" and scorer.dp == 2
    # A random policy writes no <answer> in 4 tokens: its responses become answers made from its tokens,
    # so that the open-ended verifier has answers to send to the reward model.
    trainer.step_fn.detokenize = lambda seqs: [f"<think>t</think><answer>a shape {int(s.sum()) % 97}</answer>"
                                               for s in seqs]
    summary = trainer.train()
    with open(tmp_path / "metrics.jsonl") as f:
        row = [json.loads(line) for line in f][-1]
    assert "reward/open_ended" in row, sorted(row)            # open-ended prompts were in the batch
    assert row["reward_counts/open_ended_unscored"] == 0      # ... and every answer of them scored
    assert scorer.calls >= 1 and len(scorer.programs) >= 1
    for key in REWARD_COUNTERS:
        assert f"reward_counts/{key}" in row
    assert summary["not_scored"]["open_ended_unscored"] == 0
    # the counters reach TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(glob.glob(os.path.join(str(tmp_path), "tb"))[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"reward_counts/{k}" for k in REWARD_COUNTERS} <= tags
    assert any(t.startswith("reward_counts/extract_fail_") for t in tags), sorted(tags)


def test_open_ended_records_without_a_scorer_stop_the_run(demo_data_dir, qwen_tokenizer_dir, tmp_path):
    c = _config(demo_data_dir, qwen_tokenizer_dir, open_ended="")
    with pytest.raises(config_check.ConfigError, match=r"'reward.open_ended': \d+ of \d+ records of the training "
                       r"split 'grpo:train' are open-ended .*'jax_rm'.*'http'.*'none'"):
        grpo_trainer.check_open_ended_scorer(c, str(tmp_path))
    c.reward.open_ended = "none"   # said explicitly: trained at 0, counted
    grpo_trainer.check_open_ended_scorer(c, str(tmp_path))
    c.reward.open_ended, c.reward.reward_model_url = "", "http://127.0.0.1:9/score"   # the old key still works
    grpo_trainer.check_open_ended_scorer(c, str(tmp_path))


def test_a_missing_reward_model_directory_is_a_config_error(demo_data_dir, qwen_tokenizer_dir, tmp_path):
    c = _config(demo_data_dir, qwen_tokenizer_dir, open_ended="jax_rm", reward_model_path=str(tmp_path / "nope"))
    reference = grpo_config.get_config("demo")
    del reference.warm_start
    with pytest.raises(config_check.ConfigError, match="'reward.reward_model_path': must be an HF reward-model"):
        config_check.validate(c, reference)


def test_sharded_batched_scorer_equals_one_row_at_a_time(tiny_rm_dir):
    """RewardModelScorer on the (2, 1, 4) mesh (rows padded to its batch, left-padded, lengths and patches
    bucketed, two image groups) gives each request the score of the reward model called on that row alone."""
    mesh = shd.make_mesh((2, 1, 4))
    scorer = RewardModelScorer(tiny_rm_dir, mesh=mesh, rules="fsdp", dtype="float32", batch_size=4)
    rng = np.random.default_rng(0)
    images = [PromptImage(rng.standard_normal((h * w, 1176)).astype(np.float32), (1, h, w))
              for h, w in ((4, 4), (4, 8), (8, 4))]
    items = [ScoreRequest("Describe the image.", answer, None, f"p{k % 3}", images[k % 3])
             for k, answer in enumerate(["a red square", "two blue circles in the top left corner", "grey", "no",
                                         "a shape", "a very long answer " * 6])]
    got = scorer.score(items)
    assert scorer.calls == 2 and len(got) == len(items)
    alone = rm_lib.load_reward_model(tiny_rm_dir, dtype="float32")
    with jax.default_device(jax.devices()[0]):
        want = []
        for k, it in enumerate(items):
            ids, patches, grid = scorer._row(k, it)
            want.append(float(alone(ids[None], attention_mask=np.ones((1, len(ids)), np.int32), pixel_values=patches,
                                    image_grid_thw=grid[None])[0]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
