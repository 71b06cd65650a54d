"""GRPO with the paper's mixed reward (arXiv 2504.11468 sec. 4, appendix C; OpenRLHF-style loop).

One trainer step = one rollout batch: the loader's PromptBatch goes through the hand-offs of
grpo_step.py (rollout -> score -> train batch -> updates), then the KL controller takes the rollout
batch's measured KL, and the step's metrics, rollout samples and checkpoint are written.
`GRPOTrainer.evaluate_prompts` (the run's before/after table) scores greedy answers per verifier type
(benchmarks: mode=eval, vlaa_jax.eval); rollouts' behaviour metrics (vlaa_jax.eval.behaviour) are logged;
`generate_samples` (mode=generate) prints a few sampled responses.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from data_pipeline import tokenizer as tokenizer_lib
from data_pipeline.model_inputs import PromptBatch
from vlaa_jax import sharding as shd
from vlaa_jax.eval.behaviour import behaviour_metrics
from data_pipeline.loader import count_verifier_types
from vlaa_jax.rewards.jax_scorer import RewardModelScorer
from vlaa_jax.rewards.mixed import REWARD_COUNTERS, MixedReward, RewardConfig
from vlaa_jax.rl.kl import KLController, make_kl_controller
from vlaa_jax.train import common, loop
from vlaa_jax.train.config_check import ConfigError
from vlaa_jax.train.grpo_step import (GRPOSettings, GRPOStep, RewardFn, make_grpo_step, old_logprob_source,
                                      reference_params)


def check_rollout_micro_batch(config: ml_collections.ConfigDict, mesh: Any, rules: Any) -> None:
    """A ConfigError unless the rollout splits evenly over the data-parallel devices: each static generate
    call (`grpo.rollout_micro_batch` prompts, or the whole `grpo.rollout_batch_prompts`), or the continuous
    engine's `grpo.rollout_slots` (a multiple of the data-parallel size). Checked before any model is
    built, where the rollout would otherwise fail on the first step."""
    g = config.grpo
    if g.rollout_engine == "continuous":
        slots = GRPOSettings.from_config(config).rollout_slots
        dp = shd.data_parallel_size(mesh, rules)
        if slots % dp:
            raise ConfigError(f"config key 'grpo.rollout_slots': {slots} decode slots must be a multiple of the "
                              f"data-parallel size {dp} (each device decodes its share)")
        return
    key = "grpo.rollout_micro_batch" if g.rollout_micro_batch else "grpo.rollout_batch_prompts"
    try:
        shd.check_batch_divisible(g.rollout_micro_batch or g.rollout_batch_prompts, mesh, rules,
                                  what="prompts per rollout generate call")
    except ValueError as e:
        raise ConfigError(f"config key {key!r}: {e}") from e


def check_open_ended_scorer(config: ml_collections.ConfigDict, workdir: str) -> None:
    """A ConfigError when the training split holds open-ended records and `reward.open_ended` chooses no
    scorer: they would all train at reward 0 without anyone having decided so. Reads only the records'
    verifier types (no image, no model): called before anything is built or compiled."""
    if RewardConfig.from_config(config.reward).open_ended_scorer:
        return
    split = config.data.train_split
    counts = count_verifier_types(common.data_source_fields(config, workdir), split)
    n = counts.get("open_ended", 0)
    if n:
        raise ConfigError(
            f"config key 'reward.open_ended': {n} of {sum(counts.values())} records of the training split {split!r} "
            "are open-ended and no scorer is chosen, so every one of them would score 0. Choose: "
            "reward.open_ended='jax_rm' with reward.reward_model_path=DIR (a Qwen2.5-VL reward model, "
            "docs/rewards.md); reward.open_ended='http' with reward.reward_model_url=URL (tools/reward_server.py); "
            "reward.open_ended='none' to train them at reward 0 (counted as reward_counts/open_ended_unscored); "
            "or leave them out of the split's data files")


def open_ended_scorer(cfg: RewardConfig, run: loop.Run) -> RewardModelScorer | None:
    """reward.open_ended='jax_rm': the reward model, frozen, sharded on the policy's mesh (reading the
    policy's image patches); None otherwise (MixedReward makes the HTTP client itself)."""
    if cfg.open_ended_scorer != "jax_rm":
        return None
    try:
        return RewardModelScorer(cfg.reward_model_path, mesh=run.mesh, rules=run.rules, dtype=cfg.reward_model_dtype,
                                 batch_size=cfg.reward_model_batch_size, vision=run.mcfg.vision,
                                 attention_impl=run.mcfg.attention_impl)
    except (OSError, ValueError, KeyError) as e:  # not a reward model directory, no head, wrong shapes, ...
        raise ConfigError(f"config key 'reward.reward_model_path': {e}") from e


class GRPOTrainer:
    """Holds a run's pieces between steps; `train()` is the loop."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, reward_fn: RewardFn | None = None):
        self.config, self.workdir = config, os.path.abspath(workdir)
        self.settings = GRPOSettings.from_config(config)
        check_rollout_micro_batch(config, *common.run_mesh(config))
        self.run = run = loop.Run.setup(config, self.workdir)
        tok = run.tokenizer
        if reward_fn is None:
            reward_cfg = RewardConfig.from_config(config.reward)
            reward_fn = MixedReward(reward_cfg, scorer=open_ended_scorer(reward_cfg, run))
        self.step_fn = GRPOStep(
            self.settings, run.graphdef, run.rest, run.mcfg, run.mesh, run.rules,
            stop_ids=tokenizer_lib.stop_ids(tok), pad_id=tokenizer_lib.pad_id(tok),
            detokenize=lambda seqs: tok.batch_decode(seqs, skip_special_tokens=True),
            reward_fn=reward_fn)
        # The reference is the initial policy (a copy: the trained params are donated each update).
        self.ref_params = reference_params(run.params, config.grpo.ref_dtype) if self.settings.use_ref else None
        g = config.grpo
        self.kl_ctl: KLController = make_kl_controller(g.kl_controller, g.init_kl_coef, g.kl_target, g.kl_horizon)

    # -- the loop --------------------------------------------------------------------------------
    def setup_training(self) -> int:
        """Loader, optimiser, jitted update; restores the workdir's latest checkpoint (and the KL
        controller's coefficient with it). Returns the step to continue after (0 for a fresh run)."""
        config, run, s = self.config, self.run, self.settings
        g = config.grpo
        check_open_ended_scorer(config, self.workdir)
        self.loader = run.loader(config.data.train_split, batch_size=g.rollout_batch_prompts, mode="grpo")
        self.num_steps = config.train.num_steps or max(
            1, self.loader.num_records * config.data.num_epochs // g.rollout_batch_prompts)
        run.init_training(total_updates=self.num_steps * s.updates_per_step)
        self.step_fn.train_step = make_grpo_step(config, run.graphdef, run.tx, run.params, run.rest, run.mesh,
                                                 run.rules)
        start, meta = run.restore(self.loader)
        if start:  # JSON keeps the float64 controller value exactly
            self.kl_ctl = dataclasses.replace(self.kl_ctl, value=float(meta["kl_coef"]))
        return start

    def step(self, step: int, prompts: PromptBatch) -> tuple[dict, Any]:
        """One GRPO step on a rollout batch. Returns (the step's metrics row, the ScoredRollout)."""
        run, s, fn = self.run, self.settings, self.step_fn
        t0 = time.time()
        run.rng, sample_key, perm_key = jax.random.split(run.rng, 3)
        rollout = fn.rollout(run.params, prompts, sample_key, n=s.num_samples)
        t_rollout = time.time() - t0
        scored = fn.score(rollout)
        t_reward = time.time() - t0 - t_rollout
        batch = fn.train_batch(scored, run.params, self.ref_params, float(self.kl_ctl.value))
        run.params, run.opt_state, result = fn.update(run.params, run.opt_state, batch, perm_key)
        if run.check_finite(step, result.metrics) and s.use_ref:
            self.kl_ctl = self.kl_ctl.update(result.kl, len(rollout.texts))
        dt = time.time() - t0
        rewards, stats, mask = scored.rewards, scored.stats, rollout.mask
        row = {
            "reward": float(rewards.mean()), "accuracy": float((rewards >= 1.0).mean()),
            **{f"reward/{k[:-5]}": v for k, v in stats.items() if k.endswith("/mean") and k != "all/mean"},
            "extract_fail": stats.get("extract_fail", 0) / max(len(rewards), 1),
            **{f"reward_counts/{k}": stats[k] for k in REWARD_COUNTERS if k in stats},
            **{f"reward_counts/extract_fail_{k[:-13]}": v for k, v in stats.items()
               if k.endswith("/extract_fail") and stats.get(f"{k[:-13]}/count")},
            "response_length": float(mask.sum(axis=1).mean()),
            "lr": float(run.schedule(max((step - 1) * s.updates_per_step, 0))),
            "kl_coef_next": float(self.kl_ctl.value), "kl_rollout": result.kl,
            "tokens_per_s": float(mask.sum() + prompts.attention_mask.sum() * s.num_samples) / max(dt, 1e-9),
            "time/rollout_s": t_rollout, "time/reward_s": t_reward,
            "time/update_s": dt - t_rollout - t_reward, "skipped_nonfinite": run.skipped,
            "compiles/rollout": len(fn.rollout_programs),
            **{f"rollout/{k}": v for k, v in rollout.stats.metrics().items()},
            **_defined(behaviour_metrics(list(rollout.texts), lengths=mask.sum(axis=1), correct=rewards >= 1.0)),
            **result.metrics}
        return row, scored

    def train(self) -> dict:
        config, run, g, t = self.config, self.run, self.config.grpo, self.config.train
        start = self.setup_training()
        loader, steps = self.loader, self.num_steps
        before = self.eval_before(start)
        writer = run.writer(steps, start, key_metrics=("reward", "kl", "lr"), description="grpo")
        history = []
        try:
            for step in range(start + 1, steps + 1):
                prompts = next(loader)
                writer.write_data_ids(step, [r["id"] for r in prompts.records])
                row, scored = self.step(step, prompts)
                history.append({"step": step, "reward": row["reward"], "samples": len(scored.rewards),
                                **{k: int(scored.stats.get(k, 0)) for k in REWARD_COUNTERS}})
                if step % t.log_every == 0 or step == steps:
                    writer.write_scalars(step, row)
                    writer.write_samples(step, sample_rows(scored, g.log_samples))
                writer.advance()
                run.maybe_save(step, last=step == steps, data_state=loader.get_state(),
                               meta={"kl_coef": float(self.kl_ctl.value)})
        finally:
            writer.close()
            run.finish_saves()
        after = self.evaluate_prompts() if g.eval_prompts else None
        summary = {"mode": "grpo", "steps": steps, "resumed_from": start, "reward_history": history,
                   "eval_before": before, "eval_after": after, "eval_prompts": g.eval_prompts,
                   "eval_split": config.data.eval_split or config.data.train_split, "skipped_nonfinite": run.skipped,
                   "kl_coef": float(self.kl_ctl.value), "old_logprobs": old_logprob_source(self.settings),
                   "data": loader.summary(), "not_scored": not_scored(history)}
        if t.export_hf:
            summary.update(run.export())
        run.print_summary(summary_lines(summary))
        return summary

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate_prompts(self) -> dict[str, float]:
        """Greedy answers to the first `grpo.eval_prompts` prompts of the eval split: reward per type."""
        config, g = self.config, self.config.grpo
        split = config.data.eval_split or config.data.train_split
        loader = self.run.loader(split, batch_size=g.eval_prompts, mode="grpo", shuffle=False, num_epochs=None)
        prompts = next(loader)
        loader.close()
        scored = self.step_fn.score(self.step_fn.rollout(self.run.params, prompts, jax.random.key(0), n=1,
                                                         greedy=True))
        stats, n = scored.stats, len(scored.rewards)
        out = {"all": float(scored.rewards.mean())}
        out.update({k[:-5]: float(v) for k, v in stats.items() if k.endswith("/mean") and k != "all/mean"})
        out["extract_fail"] = float(stats.get("extract_fail", 0)) / max(n, 1)
        return out

    def eval_before(self, start: int) -> dict | None:
        """The before-training table (computed once, kept in the workdir for resumed runs)."""
        if not self.config.grpo.eval_prompts:
            return None
        path = os.path.join(self.workdir, "eval_before.json")
        if start > 0 and os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        before = self.evaluate_prompts()
        if jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump(before, f)
        return before


def sample_rows(scored: Any, limit: int) -> list[dict]:
    """The first `limit` rollouts of a step as samples.jsonl rows (prompt, response, reward, ...)."""
    r = scored.rollout
    rows = []
    for i in range(min(limit, len(r.texts))):
        rec = r.prompts.records[r.prompt_index[i]]
        rows.append({"prompt": rec["question"], "response": r.texts[i], "reward": float(scored.rewards[i]),
                     "ground_truth": rec["ground_truth"], "verifier_type": rec["verifier_type"]})
    return rows


def not_scored(history: list[dict]) -> dict[str, int]:
    """Rewards of the run's steps that are not a verifier's or reward model's judgement (REWARD_COUNTERS:
    zeros given unjudged), per counter, with their total and the number of rewards."""
    out = {k: sum(h.get(k, 0) for h in history) for k in REWARD_COUNTERS}
    return {**out, "total": sum(out.values()), "rewards": sum(h.get("samples", 0) for h in history)}


def _defined(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drops NaN metrics (undefined this step, e.g. the accuracy of reflective responses when there are
    none): TensorBoard would warn on every step and the plots would show gaps anyway."""
    return {k: v for k, v in metrics.items() if np.isfinite(v)}


def summary_lines(s: Mapping[str, Any]) -> list[str]:
    lines = [f"GRPO finished: {s['steps']} steps (resumed from step {s['resumed_from']})"]
    hist = s["reward_history"]
    if hist:
        k = max(1, len(hist) // 4)
        first = np.mean([h["reward"] for h in hist[:k]])
        last = np.mean([h["reward"] for h in hist[-k:]])
        lines.append(f"  rollout reward (mean of first / last {k} steps): {first:.3f} -> {last:.3f}")
    if s["eval_before"] is not None and s["eval_after"] is not None:
        b, a = s["eval_before"], s["eval_after"]
        lines.append(f"  greedy reward on {s['eval_prompts']} fixed prompts of {s['eval_split']!r}, by verifier type:")
        lines.append(f"    {'type':<12}{'before':>8}{'after':>8}")
        for key in [k for k in a if k not in ("all", "extract_fail")] + ["all"]:
            lines.append(f"    {key:<12}{b.get(key, float('nan')):>8.3f}{a.get(key, float('nan')):>8.3f}")
        lines.append(f"    {'no answer':<12}{b.get('extract_fail', 0):>8.2f}{a.get('extract_fail', 0):>8.2f}"
                     "   (fraction without an extractable <answer>)")
    lines.append(f"  KL coefficient now {s['kl_coef']:.3g}; skipped non-finite updates: {s['skipped_nonfinite']}")
    if "not_scored" in s:
        ns = s["not_scored"]
        parts = ", ".join(f"{k} {ns[k]}" for k in REWARD_COUNTERS)
        lines.append(f"  rewards that were not real scores (0 given unjudged): {ns['total']} of {ns['rewards']} "
                     f"({parts})")
    for key in ("model_dir", "hf_dir"):
        if key in s:
            lines.append(f"  {key}: {s[key]}")
    return lines


# ------------------------------------------------------------------------------------- entry points
def train(config: ml_collections.ConfigDict, workdir: str, *, reward_fn: RewardFn | None = None) -> dict:
    return GRPOTrainer(config, workdir, reward_fn=reward_fn).train()


def generate_samples(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """mode=generate: `grpo.num_samples` sampled responses for `grpo.rollout_batch_prompts` prompts."""
    trainer = GRPOTrainer(config, workdir)
    split = config.data.eval_split or config.data.train_split
    loader = trainer.run.loader(split, batch_size=config.grpo.rollout_batch_prompts, mode="grpo",
                                shuffle=False, num_epochs=None)
    prompts = next(loader)
    fn = trainer.step_fn
    scored = fn.score(fn.rollout(trainer.run.params, prompts, jax.random.key(config.seed), n=config.grpo.num_samples))
    r = scored.rollout
    rows = [{"question": prompts.records[s]["question"], "response": t, "reward": float(x)}
            for s, t, x in zip(r.prompt_index, r.texts, scored.rewards)]
    trainer.run.print_summary([json.dumps(row, ensure_ascii=False) for row in rows])
    return {"samples": rows}
