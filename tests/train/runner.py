"""Runs a shortened trainer in its own process for the tests (1 CPU device, as a user's run).

    python -m tests.train.runner --mode sft|grpo --workdir DIR --data_dir DIR [--steps N]
        [--checkpoint_every K] [--kill_during_save_at S] [--toy_reward] [--negate] [--set key=value ...]

--kill_during_save_at S: the process SIGKILLs itself inside Orbax's asynchronous finalisation of the
step-S checkpoint (all files written to the temporary directory, not yet renamed): a real crash in the
middle of an async save, at a deterministic point.
--nan_steps 2,3: (SFT) the loss of those steps is NaN.
--toy_reward: reward = fraction of ASCII lower-case letters in the response text (a dense reward the
policy can earn by preferring particular tokens; the real verifiers give a random tiny model 0).
--negate: the reward's negative (GRPO's group advantages of -r are exactly minus those of r, so the
policy is trained AWAY from the reward: a sanity check of the update's direction).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def toy_reward(texts, records, image_hw):
    import numpy as np
    r = np.array([sum(c.isascii() and c.islower() for c in t) / max(len(t), 1) for t in texts], np.float32)
    return r, {"all/mean": float(r.mean())}


def negated(reward_fn):
    def reward(texts, records, image_hw):
        r, stats = reward_fn(texts, records, image_hw)
        return -r, {k: -v if k.endswith("/mean") else v for k, v in stats.items()}
    return reward


def test_config(mode: str, data_dir: str, steps: int, checkpoint_every: int):
    from configs import grpo, sft
    c = (sft if mode == "sft" else grpo).get_config("demo")
    c.data.dir = data_dir
    c.train.num_steps = steps
    c.train.checkpoint_every = checkpoint_every
    c.train.keep_checkpoints = 10
    c.train.progress_bar = False
    c.train.export_hf = False
    c.train.log_every = 1
    c.optim.warmup_ratio = 0.0
    c.optim.learning_rate, c.optim.min_learning_rate, c.optim.b2 = 3e-3, 3e-4, 0.99
    if mode == "sft":
        c.train.batch_size, c.train.grad_accum_steps = 4, 2
        c.train.eval_every = 0
        c.data.max_length = 256
    else:
        g = c.grpo  # pinned here so that tuning the demo preset does not change the tests
        g.rollout_batch_prompts, g.num_samples, g.max_new_tokens = 2, 4, 8
        g.temperature, g.top_p, g.init_kl_coef, g.kl_controller = 1.0, 1.0, 1e-3, "adaptive"
        g.eval_prompts = 0
        del c.warm_start  # the trainer alone (the SFT warm-start stage is vlaa_jax.main's)
        c.train.batch_size, c.train.grad_accum_steps = 4, 2
        c.optim.learning_rate, c.optim.min_learning_rate = 1e-3, 1e-4
    return c


def _kill_inside_finalize(step: int) -> None:
    from orbax.checkpoint._src.path import atomicity
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if os.path.basename(str(self.get_final())) == str(step):
            print(f"KILLING during async save of step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def _nan_at(sft_module, steps: set) -> None:
    """Makes the loss of the given SFT steps NaN: their loss normaliser becomes NaN (a real NaN that
    flows through the loss and the backward pass of the jitted step)."""
    import numpy as np
    original = sft_module.host_batch
    calls = {"n": 0}

    def host_batch(batches, mcfg, groups=None):
        calls["n"] += 1
        batch, tokens = original(batches, mcfg, groups=groups)
        if calls["n"] in steps:
            batch["loss_normalizer"] = np.full_like(batch["loss_normalizer"], np.nan)
        return batch, tokens

    sft_module.host_batch = host_batch


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("sft", "grpo"), required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--checkpoint_every", type=int, default=3)
    p.add_argument("--kill_during_save_at", type=int, default=0)
    p.add_argument("--toy_reward", action="store_true")
    p.add_argument("--negate", action="store_true")
    p.add_argument("--nan_steps", default="", help="SFT: comma-separated steps whose loss (and hence "
                   "gradients) become NaN, injected through the batch's loss normaliser")
    p.add_argument("--set", action="append", default=[], help="dotted.key=json_value")
    a = p.parse_args(argv)
    from absl import flags, logging
    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.WARNING)
    c = test_config(a.mode, a.data_dir, a.steps, a.checkpoint_every)
    for item in a.set:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = c
        for q in parents:
            node = node[q]
        node[leaf] = json.loads(value)
    if a.kill_during_save_at:
        _kill_inside_finalize(a.kill_during_save_at)
    from vlaa_jax.train import config_check, grpo_trainer, sft
    if a.nan_steps:
        _nan_at(sft, {int(x) for x in a.nan_steps.split(",")})
    from configs import grpo as grpo_configs, sft as sft_configs
    reference = (sft_configs if a.mode == "sft" else grpo_configs).get_config("demo")
    if "warm_start" in reference and "warm_start" not in c:
        del reference.warm_start
    config_check.validate(c, reference)
    if a.mode == "sft":
        summary = sft.train(c, a.workdir)
    else:
        reward_fn = toy_reward if a.toy_reward else None
        if a.negate:
            if reward_fn is None:
                raise SystemExit("--negate needs --toy_reward")
            reward_fn = negated(reward_fn)
        summary = grpo_trainer.train(c, a.workdir, reward_fn=reward_fn)
    print("SUMMARY " + json.dumps(summary, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
