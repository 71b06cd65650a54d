"""GRPO moves the policy the right way (and the wrong way when told to).

Toy task: the reward is the fraction of ASCII lower-case letters in the response (tests/train/runner.py
`toy_reward`), so a tiny random model earns it by emitting particular tokens. Its embedding is drawn with
std 0.5 so the random policy is peaked enough that samples of one prompt differ in reward (with HF's
0.02 the policy is near-uniform over 151,936 tokens and group advantages are all noise). Same seed,
same data; only the sign of the reward (hence of the group advantages) differs between the two runs.
"""
import numpy as np

from tests.train.helpers import run_trainer

# 3 steps: with 10 the rewards were 0.27 then 0.83 from step 2 on (up) and 0.27 then 0.0-0.08 (down): the
# update's direction shows from the first update. 3 is the length (and the learning rate the same) of the
# `grpo_toy_run` fixture's run, whose compiled steps these runs share (the embedding's std is init only).
ARGS = ("--steps", "3", "--checkpoint_every", "0", "--toy_reward", "--set", "optim.learning_rate=1e-3",
        "--set", "model.tiny.embedding_init_std=0.5")


def test_grpo_raises_reward_and_negated_reward_lowers_it(demo_data_dir, jax_cache_dir, tmp_path):
    up = run_trainer("grpo", tmp_path / "up", demo_data_dir, *ARGS, cache_dir=jax_cache_dir)
    down = run_trainer("grpo", tmp_path / "down", demo_data_dir, *ARGS, "--negate", cache_dir=jax_cache_dir)
    r_up = np.array([h["reward"] for h in up["reward_history"]])
    r_down = -np.array([h["reward"] for h in down["reward_history"]])  # it was trained on -toy_reward
    assert r_up[0] == r_down[0]  # same seed, same first rollout
    assert r_up[1:].mean() > r_up[0] + 0.15, r_up                  # rises (the toy task's noise is ~0.1)
    assert r_down[1:].mean() < r_down[0], r_down                   # falls (it may start near 0)
    assert r_up[1:].mean() - r_down[1:].mean() > 0.3, (r_up, r_down)  # and the two runs part ways
