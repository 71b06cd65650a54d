"""GRPO with the paper's mixed reward (arXiv 2504.11468 sec. 4, appendix C; OpenRLHF-style loop).

One trainer step = one rollout batch, in this order:
  prompts (loader) -> rollout: `num_samples` responses per prompt (generate.py), `grpo.rollout_micro_batch`
  prompts per generate call, images padded to the loader's pixel buckets -> mixed rewards on
  the host (vlaa_jax.rewards) -> group advantages (vlaa_jax.rl.grpo) -> old-policy log-probs
  (recomputed with the training forward; on-policy, when a rollout batch gets exactly one update, the
  update's own log-probs held constant instead) and reference log-probs (frozen initial policy, a
  `grpo.ref_dtype` copy: bf16 by default; skipped when beta = 0) -> `update_epochs` passes of shuffled
  minibatches of `train.batch_size` samples, each one jitted sharded update with gradient accumulation
  and the global loss normaliser -> KL controller update -> metrics, rollout samples, checkpoint.
`GRPOTrainer.evaluate_prompts` (the run's before/after table) scores greedy answers per verifier type
(benchmarks: mode=eval, vlaa_jax.eval); rollouts' behaviour metrics (vlaa_jax.eval.behaviour) are logged;
`generate_samples` (mode=generate) prints a few sampled responses.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlaa_jax import sharding as shd
from vlaa_jax.eval.behaviour import behaviour_metrics
from vlaa_jax.rl import grpo as grpo_lib
from vlaa_jax.rl.kl import kl_penalty, make_kl_controller
from vlaa_jax.rl.sampling import filter_zero_variance_groups
from vlaa_jax.train import common, loop
from vlaa_jax.train import step as step_lib
from vlaa_jax.train.config_check import ConfigError
from vlaa_jax.train.generate import concat_generations, generate

RewardFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], tuple[np.ndarray, dict[str, float]]]
RECORD_KEYS = ("id", "source", "question", "ground_truth", "verifier_type")


# ------------------------------------------------------------------------------------ host batches
@dataclasses.dataclass
class Prompts:
    """A loader GRPO batch split per row (one image per prompt, as VLAA-Thinking has)."""
    ids: np.ndarray        # [B, Lp] left-padded
    mask: np.ndarray       # [B, Lp]
    positions: np.ndarray  # [3, B, Lp]
    deltas: np.ndarray     # [B, 1]
    patches: list          # B arrays [p_b, 1176]
    grids: np.ndarray      # [B, 3]
    records: list          # B dicts for the reward (id, question, ground_truth, verifier_type, ...)
    image_hw: list         # B (original_hw, resized_hw)

    @classmethod
    def from_loader(cls, batch: Mapping[str, Any]) -> "Prompts":
        b = int(np.asarray(batch["example_mask"]).sum())
        grids = np.asarray(batch["image_grid_thw"])[:b]
        sizes = np.prod(grids, axis=1)
        if (sizes <= 0).any():
            raise ValueError("GRPO prompts need exactly one image each (a prompt without image was found)")
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        pv = np.asarray(batch["pixel_values"])
        records = [{k: batch[k][i] for k in RECORD_KEYS} for i in range(b)]
        return cls(ids=np.asarray(batch["input_ids"])[:b], mask=np.asarray(batch["attention_mask"])[:b],
                   positions=np.asarray(batch["position_ids"])[:, :b], deltas=np.asarray(batch["rope_deltas"])[:b],
                   patches=[pv[offsets[i]:offsets[i + 1]] for i in range(b)], grids=grids, records=records,
                   image_hw=[(tuple(batch["image_hw"][i]), tuple(batch["resized_hw"][i])) for i in range(b)])

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, src: np.ndarray, mcfg, *, num_patches: int | None = None,
             responses: np.ndarray | None = None, response_mask: np.ndarray | None = None,
             full_rows: bool | tuple[int, int] = True, groups: int = 1) -> dict:
        """Host batch of prompts `src` (indices, repeats allowed), optionally followed by responses.

        Response tokens sit at columns [Lp, Lp + T); the k-th valid token of a row has M-RoPE position
        k + rope_delta on all three axes (how they were generated). The images form `groups` image
        groups of len(src) // groups consecutive rows (`common.grouped_vision_fields`), each padded to
        `num_patches` patches (default: the largest group's, rounded up to 64)."""
        ids, mask, pos = self.ids[src], self.mask[src], self.positions[:, src]
        out = {"rope_deltas": self.deltas[src]}
        if responses is not None:
            t = responses.shape[1]
            start = mask.sum(axis=1) + self.deltas[src][:, 0]
            resp_pos = (start[:, None] + np.arange(t)[None]).astype(np.int32)
            ids = np.concatenate([ids, responses], axis=1)
            mask = np.concatenate([mask, response_mask], axis=1)
            pos = np.concatenate([pos, np.broadcast_to(resp_pos[None], (3,) + resp_pos.shape)], axis=2)
        if len(src) % groups:
            raise ValueError(f"{groups} image groups do not divide {len(src)} prompt rows")
        member = np.arange(len(src)) // (len(src) // groups)          # one image per prompt
        patches = np.concatenate([self.patches[i] for i in src], axis=0)
        out.update(input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
                   position_ids=pos.astype(np.int32))
        out.update(common.grouped_vision_fields(
            patches, self.grids[src], member, groups, mcfg, full_rows=full_rows,
            num_patches=num_patches or common.bucket(max(
                sum(len(self.patches[i]) for i in src[member == g]) for g in range(groups)), 64)))
        return out

    def max_patches(self) -> int:
        return max(len(p) for p in self.patches)


# ------------------------------------------------------------------------------------------- loss
def response_logprobs(model: Any, batch: Mapping[str, jax.Array], *, chunk_size: int, temperature: float
                      ) -> tuple[jax.Array, jax.Array]:
    """(log-probs, entropies) [B, T] of the response tokens (the last T columns) under the policy's
    temperature-scaled distribution, the one they were sampled from."""
    from vlaa_jax.rl.logprobs import token_logprobs
    t = batch["response_mask"].shape[1]
    hidden = common.hidden_states(model, batch)
    length = hidden.shape[1]
    h = hidden[:, length - t - 1:length - 1]
    targets = batch["input_ids"][:, length - t:]
    return token_logprobs(h, common.lm_head(model), targets, batch["response_mask"], chunk_size=chunk_size,
                          temperature=temperature)


def grpo_loss_fn(model: Any, batch: Mapping[str, jax.Array], *, cfg: grpo_lib.GRPOConfig, chunk_size: int,
                 temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss of a micro-batch. Without `old_logp` in the batch the update is on-policy (the
    parameters are those that sampled the rollout): the old-policy log-probs are this forward's own,
    held constant (ratio exactly 1), so no separate old-policy forward is needed (as TRL and verl do).
    Adds `kl_sum` (sum of the per-token KL to the reference over the valid tokens), from which the
    trainer measures KL(old || ref) per token for the KL controller in that case."""
    logp, entropy = response_logprobs(model, batch, chunk_size=chunk_size, temperature=temperature)
    old_logp = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
    loss, metrics = grpo_lib.grpo_loss(logp, old_logp, batch.get("ref_logp"), batch["advantages"],
                                       batch["response_mask"], cfg, kl_coef=batch["kl_coef"], entropy=entropy,
                                       normalizer=batch["loss_normalizer"])
    if "kl" in metrics:
        metrics["kl_sum"] = metrics["kl"] * metrics["num_tokens"]
    return loss, metrics


def update_patch_bucket(patches: int, micro_batch: int, max_pixels: int) -> int:
    """Pixel rows of an update micro-batch: the loader's pixel buckets for `micro_batch` one-image rows
    (worst case / 8, / 4, / 2, / 1), so a run compiles its forward / update for at most four pixel
    shapes (rounding to multiples of 64 gave up to worst / 64 shapes, one compile each)."""
    from data_pipeline.loader import _pick_bucket, default_pixel_buckets
    buckets = default_pixel_buckets(micro_batch, max_pixels)
    if patches > buckets[-1]:  # images larger than data.max_pixels (not from this config's loader)
        return common.bucket(patches, 64)
    return _pick_bucket(patches, buckets, "update micro-batch pixel rows")


def update_full_rows(max_patches: int, micro_batch: int, patches: int) -> tuple[int, int] | bool:
    """Per-image full-attention rows of one shape for every update micro-batch (one image per row, none
    over `max_patches`): (micro_batch, power of two >= max_patches), or False (dense) where that is no
    cheaper than attending over all `patches` of the micro-batch."""
    from vlaa_jax.models.qwen2_5_vl.layout import row_length
    lr = row_length(max_patches)
    return (micro_batch, lr) if micro_batch * lr * lr < patches * patches else False


def rollout_chunks(num_prompts: int, micro_batch: int) -> list[np.ndarray]:
    """Prompt indices of each generate call: consecutive runs of `micro_batch` (0: all in one call)."""
    size = min(micro_batch or num_prompts, num_prompts)
    return [np.arange(i, min(i + size, num_prompts)) for i in range(0, num_prompts, size)]


def check_rollout_micro_batch(config: ml_collections.ConfigDict, mesh: Any, rules: Any) -> None:
    """A ConfigError unless each rollout generate call (`grpo.rollout_micro_batch` prompts, or the whole
    `grpo.rollout_batch_prompts`) splits evenly over the data-parallel devices: checked before any model
    is built, where generate would otherwise fail on the first step."""
    g = config.grpo
    key = "grpo.rollout_micro_batch" if g.rollout_micro_batch else "grpo.rollout_batch_prompts"
    try:
        shd.check_batch_divisible(g.rollout_micro_batch or g.rollout_batch_prompts, mesh, rules,
                                  what="prompts per rollout generate call")
    except ValueError as e:
        raise ConfigError(f"config key {key!r}: {e}") from e


def program_key(batch: Mapping[str, np.ndarray], *, n: int, greedy: bool) -> tuple:
    """What makes generate compile a new program for a prompt batch: its field shapes and the static
    options this trainer varies (samples per prompt, greedy)."""
    return tuple(sorted((k, np.shape(v)) for k, v in batch.items())), n, greedy


def reference_params(params: Any, ref_dtype: str) -> Any:
    """The frozen reference policy: a copy of `params` (the trained ones are donated each update) with
    floating leaves in `ref_dtype` ("param": as stored), each leaf sharded like its parameter. A bf16
    copy of fp32 master weights halves the reference's memory; the model casts to the compute dtype."""
    dtype = None if ref_dtype == "param" else jnp.dtype(ref_dtype)

    def cast(x: jax.Array) -> jax.Array:
        return x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else jnp.copy(x)

    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


# --------------------------------------------------------------------------------------- trainer
class GRPOTrainer:
    """Holds a run's pieces between steps; `train()` is the loop."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, reward_fn: RewardFn | None = None):
        self.config, self.workdir = config, os.path.abspath(workdir)
        g = config.grpo
        check_rollout_micro_batch(config, *common.make_mesh(config))
        init_path = None
        if g.warm_start_sft_steps and config.mode == "grpo":  # eval / generate use the model as given
            init_path = warm_start(config, self.workdir)
        self.run = loop.Run.setup(config, self.workdir, model_path=init_path)
        self.loss_cfg = grpo_lib.GRPOConfig.from_config(g.loss)
        tok = self.run.tokenizer
        self.eos_ids = tuple(sorted({tok.convert_tokens_to_ids("<|im_end|>"),
                                     tok.convert_tokens_to_ids("<|endoftext|>")}))
        self.pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
        self._mixed = None
        self.reward_fn = reward_fn or self._mixed_reward
        self.use_ref = g.init_kl_coef > 0
        # The reference is the initial policy (a copy: the trained params are donated each update).
        self.ref_params = reference_params(self.run.params, g.ref_dtype) if self.use_ref else None
        self.rollout_programs: set = set()  # shapes + static options of the generate calls so far

    # -- pieces --------------------------------------------------------------------------------
    def image_groups(self, rows: int) -> int:
        """Image groups of a batch of `rows` prompt rows: the data-parallel size (each device encodes only
        its own rows' images) when it divides the rows, else one group."""
        dp = shd.data_parallel_size(self.run.mesh, self.run.rules)
        return dp if rows % dp == 0 else 1

    def _mixed_reward(self, responses, records, image_hw=None):
        from vlaa_jax.rewards.mixed import MixedReward, RewardConfig
        if self._mixed is None:
            self._mixed = MixedReward(RewardConfig.from_config(self.config.reward))
        return self._mixed(responses, records, image_hw)

    def rollout(self, prompts: Prompts, rng: jax.Array, *, n: int, greedy: bool = False):
        """n responses per prompt (greedy: temperature 0), in generate calls of `grpo.rollout_micro_batch`
        prompts (`rollout_batches`; each call continues the row numbering of the PRNG streams, so the
        samples do not depend on the micro-batch). Returns (prompt index per row, Generation, decoded
        response texts)."""
        g, run = self.config.grpo, self.run
        parts, rows = [], 0
        for batch in self.rollout_batches(prompts):
            self.rollout_programs.add(program_key(batch, n=n, greedy=greedy))
            parts.append(generate(run.graphdef, run.params, run.rest, batch, rng=rng, row_offset=rows,
                                  num_samples=n, max_new_tokens=g.max_new_tokens,
                                  temperature=0.0 if greedy else g.temperature, top_p=g.top_p,
                                  eos_ids=self.eos_ids, pad_id=self.pad_id, mesh=run.mesh, rules=run.rules))
            rows += len(batch["input_ids"]) * n
        gen = concat_generations(parts, self.pad_id)
        texts = run.tokenizer.batch_decode([t[m > 0] for t, m in zip(gen.tokens, gen.mask)],
                                           skip_special_tokens=True)
        return np.repeat(np.arange(len(prompts)), n), gen, texts

    def rollout_batches(self, prompts: Prompts) -> list[dict]:
        """The host prompt batches of a rollout, `grpo.rollout_micro_batch` prompts each (0: all), in order.
        Each image group is padded to one of the loader's pixel buckets for its number of prompts
        (`update_patch_bucket`), with per-image full-attention rows of power-of-two length
        (`update_full_rows`): a run compiles a bounded set of generate programs, where rounding the patch
        count to a multiple of 64 compiled a new one on most steps when image sizes vary."""
        out = []
        for idx in rollout_chunks(len(prompts), self.config.grpo.rollout_micro_batch):
            groups = self.image_groups(len(idx))
            per_group = len(idx) // groups
            most = max(sum(len(prompts.patches[i]) for i in part) for part in np.split(idx, groups))
            p = update_patch_bucket(most, per_group, self.config.data.max_pixels)
            full_rows = update_full_rows(max(len(prompts.patches[i]) for i in idx), per_group, p)
            out.append(prompts.rows(idx, self.run.mcfg, num_patches=p, full_rows=full_rows, groups=groups))
        return out

    def score(self, prompts: Prompts, src: np.ndarray, texts: Sequence[str]):
        records = [prompts.records[i] for i in src]
        if self.reward_fn is self._mixed_reward:
            return self._mixed_reward(texts, records, [prompts.image_hw[i] for i in src])
        return self.reward_fn(texts, records)

    def _forward_logprobs(self, params, batches: list[dict]) -> np.ndarray:
        run, g = self.run, self.config.grpo
        if not hasattr(self, "_logprob_fn"):
            self._logprob_fn = jax.jit(lambda p, r, b: response_logprobs(
                run.model(p, r), b, chunk_size=g.logprob_chunk, temperature=g.temperature)[0])
        out = []
        for b in batches:
            fields = {k: v for k, v in b.items() if k not in ("old_logp", "ref_logp", "advantages", "kl_coef",
                                                               "loss_normalizer")}
            dev = common.put_batch(fields, run.mesh, run.rules, batch_size=fields["input_ids"].shape[0])
            with shd.activate(run.mesh, run.rules):
                out.append(np.asarray(jax.device_get(self._logprob_fn(params, run.rest, dev))))
        return np.concatenate(out, axis=0)

    # -- the loop --------------------------------------------------------------------------------
    def setup_training(self) -> int:
        """Loader, optimiser, jitted update and KL controller; restores the workdir's latest checkpoint.
        Returns the step to continue after (0 for a fresh run)."""
        config, run, g, t = self.config, self.run, self.config.grpo, self.config.train
        self.loader = run.loader(config.data.train_split, batch_size=g.rollout_batch_prompts, mode="grpo")
        samples_per_step = g.rollout_batch_prompts * g.num_samples
        self.updates_per_step = g.update_epochs * samples_per_step // t.batch_size
        self.num_steps = t.num_steps or max(
            1, self.loader.num_records * config.data.num_epochs // g.rollout_batch_prompts)
        run.init_training(total_updates=self.num_steps * self.updates_per_step, kl_coef=g.init_kl_coef)
        self.micro = t.batch_size // t.grad_accum_steps
        # A single optimiser update per rollout batch sees the sampling parameters: on-policy.
        self.on_policy = self.updates_per_step == 1
        self.train_step = make_grpo_step(config, run.graphdef, run.tx, run.params, run.rest, run.mesh, run.rules)
        start = run.restore(self.loader)
        self.kl_ctl = make_kl_controller(g.kl_controller, run.kl_coef, g.kl_target, g.kl_horizon)
        return start

    def step(self, step: int, prompts: Prompts) -> tuple[dict, dict]:
        """One GRPO step on a rollout batch of prompts: rollout, rewards, advantages, updates, KL
        controller. Returns (the step's metrics row, {src, texts, rewards} for the samples log)."""
        run, g = self.run, self.config.grpo
        t0 = time.time()
        run.rng, sample_key, perm_key = jax.random.split(run.rng, 3)
        src, gen, texts = self.rollout(prompts, sample_key, n=g.num_samples)
        t_rollout = time.time() - t0
        rewards, stats = self.score(prompts, src, texts)
        t_reward = time.time() - t0 - t_rollout
        adv = np.asarray(grpo_lib.group_advantages(
            rewards.reshape(len(prompts), g.num_samples), mode=self.loss_cfg.advantage_mode,
            eps=self.loss_cfg.advantage_eps)).reshape(-1)
        if g.negate_advantages:
            adv = -adv
        resp_mask = gen.mask.copy()
        if g.dynamic_sampling:
            kept = filter_zero_variance_groups(rewards.reshape(len(prompts), g.num_samples))
            drop = np.ones(len(src), bool)
            drop[kept.kept_indices] = False
            resp_mask[drop] = 0
        metrics, kl_measured = self.update(self.train_step, prompts, src, gen.tokens, resp_mask, adv,
                                           perm_key, self.micro)
        finite = run.check_finite(step, metrics)
        if self.use_ref and finite:
            self.kl_ctl = self.kl_ctl.update(kl_measured, len(src))
            run.kl_coef = float(self.kl_ctl.value)
        dt = time.time() - t0
        row = {
            "reward": float(rewards.mean()), "accuracy": float((rewards >= 1.0).mean()),
            **{f"reward/{k[:-5]}": v for k, v in stats.items() if k.endswith("/mean") and k != "all/mean"},
            "extract_fail": stats.get("extract_fail", 0) / max(len(src), 1),
            "response_length": float(gen.mask.sum(axis=1).mean()),
            "lr": float(run.schedule(max((step - 1) * self.updates_per_step, 0))),
            "kl_coef_next": run.kl_coef, "kl_rollout": kl_measured,
            "tokens_per_s": float(gen.mask.sum() + prompts.mask.sum() * g.num_samples) / max(dt, 1e-9),
            "time/rollout_s": t_rollout, "time/reward_s": t_reward,
            "time/update_s": dt - t_rollout - t_reward, "skipped_nonfinite": run.skipped,
            "compiles/rollout": len(self.rollout_programs),
            **_defined(behaviour_metrics(texts, lengths=gen.mask.sum(axis=1), correct=rewards >= 1.0)),
            **{k: float(v) for k, v in metrics.items()}}
        return row, {"src": src, "texts": texts, "rewards": rewards}

    def train(self) -> dict:
        config, run, g, t = self.config, self.run, self.config.grpo, self.config.train
        start = self.setup_training()
        loader, steps = self.loader, self.num_steps
        before = self.eval_before(start)
        writer = run.writer(steps, start, key_metrics=("reward", "kl", "lr"), description="grpo")
        history = []
        try:
            for step in range(start + 1, steps + 1):
                prompts = Prompts.from_loader(next(loader))
                writer.write_data_ids(step, [r["id"] for r in prompts.records])
                row, out = self.step(step, prompts)
                src, texts, rewards = out["src"], out["texts"], out["rewards"]
                history.append({"step": step, "reward": row["reward"]})
                if step % t.log_every == 0 or step == steps:
                    writer.write_scalars(step, row)
                    writer.write_samples(step, [
                        {"prompt": prompts.records[src[i]]["question"], "response": texts[i],
                         "reward": float(rewards[i]), "ground_truth": prompts.records[src[i]]["ground_truth"],
                         "verifier_type": prompts.records[src[i]]["verifier_type"]}
                        for i in range(min(g.log_samples, len(src)))])
                writer.advance()
                run.maybe_save(step, last=step == steps, data_state=loader.get_state())
        finally:
            writer.close()
            run.finish_saves()
        after = self.evaluate_prompts() if g.eval_prompts else None
        summary = {"mode": "grpo", "steps": steps, "resumed_from": start, "reward_history": history,
                   "eval_before": before, "eval_after": after, "eval_prompts": g.eval_prompts,
                   "eval_split": config.data.eval_split or config.data.train_split, "skipped_nonfinite": run.skipped,
                   "kl_coef": run.kl_coef, "data": loader.summary()}
        if t.export_hf:
            summary.update(run.export())
        run.print_summary(summary_lines(summary))
        return summary

    def update(self, train_step, prompts: Prompts, src, tokens, resp_mask, adv, key, micro: int):
        """Old/ref log-probs, then `update_epochs` x minibatches of optimiser updates. Returns
        (mean of the updates' metrics, measured KL(old || ref) per token)."""
        run, g, t = self.run, self.config.grpo, self.config.train
        n = len(src)
        # Image groups: one per data-parallel device (each encodes its own rows' images), of `per_group`
        # one-image rows, padded to the loader's pixel buckets for that many rows.
        groups = self.image_groups(micro)
        per_group = micro // groups
        p = update_patch_bucket(prompts.max_patches() * per_group, per_group, self.config.data.max_pixels)
        full_rows = update_full_rows(prompts.max_patches(), per_group, p)
        build = lambda idx: prompts.rows(src[idx], run.mcfg, num_patches=p, responses=tokens[idx],
                                         response_mask=resp_mask[idx], full_rows=full_rows, groups=groups)
        # One update per rollout batch: it is on-policy, the loss takes the old log-probs from its own
        # forward (grpo_loss_fn); otherwise they are recomputed here before the first update.
        on_policy = self.on_policy
        # Old-policy and reference log-probs over the whole rollout batch, micro-batch by micro-batch.
        chunks = [np.arange(i, min(i + micro, n)) for i in range(0, n, micro)]
        fwd = [dict(build(c), response_mask=resp_mask[c]) for c in chunks] if (self.use_ref or not on_policy) else []
        old_logp = None if on_policy else self._forward_logprobs(run.params, fwd)
        ref_logp = self._forward_logprobs(self.ref_params, fwd) if self.use_ref else None
        kl_measured = 0.0
        if self.use_ref and not on_policy:
            kl_tok = np.asarray(kl_penalty(jnp.asarray(old_logp), jnp.asarray(ref_logp),
                                           self.loss_cfg.kl_estimator))
            kl_measured = float((kl_tok * resp_mask).sum() / max(resp_mask.sum(), 1))
        all_metrics = []
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint64))
        for _ in range(g.update_epochs):
            order = rng.permutation(n)
            for s in range(0, n, t.batch_size):
                mb = order[s:s + t.batch_size]
                norm = float(grpo_lib.loss_normalizer(resp_mask[mb], self.loss_cfg.loss_agg_mode))
                micro_batches = []
                for m in range(t.grad_accum_steps):
                    idx = mb[m * micro:(m + 1) * micro]
                    b = build(idx)
                    b.update(response_mask=resp_mask[idx], advantages=adv[idx].astype(np.float32),
                             kl_coef=np.float32(run.kl_coef), loss_normalizer=np.float32(max(norm, 1.0) / t.grad_accum_steps))
                    if old_logp is not None:
                        b["old_logp"] = old_logp[idx]
                    if ref_logp is not None:
                        b["ref_logp"] = ref_logp[idx]
                    b.pop("rope_deltas")
                    micro_batches.append(b)
                host = micro_batches[0] if t.grad_accum_steps == 1 else step_lib.stack_micro_batches(micro_batches)
                dev = common.put_batch(host, run.mesh, run.rules, batch_size=micro,
                                       micro_batched=t.grad_accum_steps > 1)
                run.params, run.opt_state, metrics = train_step(run.params, run.opt_state, run.rest, dev)
                all_metrics.append(jax.device_get(metrics))
        if self.use_ref and on_policy:  # KL(old || ref) per token = the update's KL over the whole batch
            kl_sum = float(np.mean([np.asarray(m["kl_sum"]) for m in all_metrics])) * t.grad_accum_steps
            kl_measured = kl_sum / max(float(resp_mask.sum()), 1.0)
        keys = ("loss", "grad_norm", "pg_loss", "kl", "kl_loss", "entropy", "clipfrac", "approx_kl",
                "ratio_mean", "advantage_std")
        mean = {k: float(np.mean([np.asarray(m[k]) for m in all_metrics])) for k in keys if k in all_metrics[0]}
        return mean, kl_measured

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate_prompts(self) -> dict[str, float]:
        """Greedy answers to the first `grpo.eval_prompts` prompts of the eval split: reward per type."""
        config, g = self.config, self.config.grpo
        split = config.data.eval_split or config.data.train_split
        loader = self.run.loader(split, batch_size=g.eval_prompts, mode="grpo", shuffle=False, num_epochs=None)
        prompts = Prompts.from_loader(next(loader))
        loader.close()
        src, gen, texts = self.rollout(prompts, jax.random.key(0), n=1, greedy=True)
        rewards, stats = self.score(prompts, src, texts)
        out = {"all": float(rewards.mean())}
        out.update({k[:-5]: float(v) for k, v in stats.items() if k.endswith("/mean") and k != "all/mean"})
        out["extract_fail"] = float(stats.get("extract_fail", 0)) / max(len(src), 1)
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


def make_grpo_step(config: ml_collections.ConfigDict, graphdef: Any, tx: Any, params: Any, rest: Any, mesh: Any,
                   rules: Any, *, micro_batches: int | None = None) -> step_lib.TrainStep:
    """The GRPO trainer's jitted update (`grpo_loss_fn` with the config's loss, chunk and temperature;
    frozen parts from the config); benchmarks build this one too. micro_batches: default
    train.grad_accum_steps."""
    g = config.grpo
    loss_cfg = grpo_lib.GRPOConfig.from_config(g.loss)
    return step_lib.make_train_step(
        graphdef, lambda model, batch: grpo_loss_fn(
            model, batch, cfg=loss_cfg, chunk_size=g.logprob_chunk, temperature=g.temperature),
        tx, params, rest, mesh, rules, micro_batches=micro_batches or config.train.grad_accum_steps,
        trainable=common.trainable_mask(config, params))


def _defined(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drops NaN metrics (undefined this step, e.g. the accuracy of reflective responses when there are
    none): TensorBoard would warn on every step and the plots would show gaps anyway."""
    return {k: v for k, v in metrics.items() if np.isfinite(v)}


def warm_start(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Demo only: `grpo.warm_start_sft_steps` SFT updates (configs/sft.py:demo recipe, same model and
    data) in workdir/warm_start, so the tiny random model learns the answer format before GRPO.
    Resumable like any run; returns the exported model directory."""
    from configs import sft as sft_configs
    from vlaa_jax.train import sft
    sub = os.path.join(workdir, "warm_start")
    model_dir = os.path.join(sub, "model")
    done = os.path.join(sub, "DONE")
    if os.path.isfile(done):
        return model_dir
    c = sft_configs.get_config("demo")
    with c.unlocked():
        c.seed = config.seed
        c.model = config.model.copy_and_resolve_references()
        c.data.source, c.data.dir = config.data.source, common.data_dir(config, workdir)
        c.train.num_steps = config.grpo.warm_start_sft_steps
        c.train.eval_every = 0
        c.train.checkpoint_every = 0
        c.train.progress_bar = config.train.progress_bar
        c.train.export_hf = False
    if config.model.tokenizer_dir == "qwen":
        with c.unlocked():
            c.model.tokenizer_dir = "qwen"
    summary = sft.train(c, sub, export=True, hf=False)
    if jax.process_index() == 0:
        with open(os.path.join(sub, "summary.json"), "w") as f:
            json.dump(summary, f, default=str)
        open(done, "w").close()
    return model_dir


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
    prompts = Prompts.from_loader(next(loader))
    src, gen, texts = trainer.rollout(prompts, jax.random.key(config.seed), n=config.grpo.num_samples)
    rewards, _ = trainer.score(prompts, src, texts)
    rows = [{"question": prompts.records[s]["question"], "response": t, "reward": float(r)}
            for s, t, r in zip(src, texts, rewards)]
    trainer.run.print_summary([json.dumps(r, ensure_ascii=False) for r in rows])
    return {"samples": rows}
