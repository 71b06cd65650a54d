"""GRPO as pure functions: group advantages, the clipped policy loss, loss aggregation, metrics.

Everything here is jit-able and works on log-prob arrays [B, L] (see logprobs.py for getting them
from the model). One sequence per row; `mask` [B, L] is 1 on response tokens, 0 on prompt/padding.

Gradient accumulation / data parallelism
-----------------------------------------
Every aggregation mode is "a sum over the batch divided by a normaliser":
  token-mean              sum_{i,t} m l / N_tokens
  seq-mean-token-mean     sum_i (sum_t m l / n_i) / N_seqs          (original GRPO)
  seq-mean-token-sum      sum_i (sum_t m l) / N_seqs
  seq-mean-token-sum-norm sum_i (sum_t m l / max_response_length) / N_seqs   (Dr. GRPO)
where n_i is the number of response tokens of sequence i and N_seqs counts only rows with n_i > 0
(all-padding rows are ignored). By default N comes from the arrays passed in. When one optimiser
step is split into micro-batches, pass `normalizer=loss_normalizer(full_minibatch_mask, mode)`
(computed once on the host, or in-jit from the whole mask) to every micro-batch call: the micro-batch
losses (and their gradients) then SUM to the loss of the whole minibatch, i.e. token-mean is over the
global batch, not a mean of per-micro-batch means. Inside one jit over a globally sharded batch the
sums are already global and no normaliser is needed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vlaa_jax.rl.kl import KL_ESTIMATORS, kl_penalty

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm")
ADVANTAGE_MODES = ("grpo", "drgrpo", "batch")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Loss hyper-parameters (hashable, so it can be a static jit argument)."""

    clip_low: float = 0.2            # ratio lower bound 1 - clip_low (OpenRLHF default eps 0.2; paper: not given)
    clip_high: float = 0.2           # ratio upper bound 1 + clip_high (DAPO clip-higher uses 0.28)
    dual_clip: float | None = None   # c > 1: caps -A * ratio at -A * c for A < 0 (None = off)
    ratio_level: str = "token"       # "token" (PPO/GRPO) or "sequence" (GSPO: length-normalised seq ratio)
    kl_estimator: str = "k3"         # k1 | k2 | k3 | low_var_kl (k3 == low_var_kl), see kl.py
    kl_coef: float = 1e-3            # beta; paper (App. C): adaptive controller starting at 1e-3
    loss_agg_mode: str = "seq-mean-token-mean"  # one of LOSS_AGG_MODES; OpenRLHF's at the time of the paper
    max_response_length: int | None = None  # Dr. GRPO normaliser (tokens); None -> mask.shape[-1]
    entropy_coef: float = 0.0        # entropy bonus (0 = off; entropy is still reported when given)
    log_ratio_clamp: float = 20.0    # log(pi/pi_old) clamped to +-this before exp
    advantage_mode: str = "grpo"     # grpo | drgrpo | batch (see group_advantages)
    advantage_eps: float = 1e-6      # added to the std in group_advantages

    def __post_init__(self):
        # Each message starts with the field's name: config_check turns it into the config key.
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.ratio_level not in ("token", "sequence"):
            raise ValueError(f"ratio_level must be 'token' or 'sequence', got {self.ratio_level!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.advantage_mode not in ADVANTAGE_MODES:
            raise ValueError(f"advantage_mode must be one of {ADVANTAGE_MODES}, got {self.advantage_mode!r}")
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must lie in [0, 1) (the ratio's lower bound is 1 - clip_low), got {self.clip_low}")
        if not self.clip_high >= 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if not self.advantage_eps > 0.0:  # 0 would divide a group of equal rewards by its std 0
            raise ValueError(f"advantage_eps must be > 0, got {self.advantage_eps}")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not self.log_ratio_clamp > 0.0:
            raise ValueError(f"log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.max_response_length is not None and self.max_response_length <= 0:
            raise ValueError(f"max_response_length must be positive, got {self.max_response_length}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "GRPOConfig":
        """From a dict / ml_collections.ConfigDict; unknown keys are an error naming them."""
        items = dict(config.items()) if hasattr(config, "items") else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(f"unknown GRPO config keys {unknown}; known: {sorted(names)}")
        return cls(**items)


# ----------------------------------------------------------------------------------------- advantages
def group_advantages(rewards: jax.Array | np.ndarray, group_ids: jax.Array | np.ndarray | None = None,
                     *, mode: str = "grpo", eps: float = 1e-6,
                     num_groups: int | None = None) -> jax.Array:
    """Advantages from per-sample rewards grouped by prompt.

    rewards: [num_prompts, n] (one row per group), or [B] with `group_ids` [B] (any ints; when the ids
    are traced, they must lie in [0, num_groups) and num_groups must be given).
      grpo:   (r - group mean) / (group std + eps), std unbiased (ddof=1, as torch.std)
      drgrpo: r - group mean (Dr. GRPO: no std scaling)
      batch:  (r - group mean) / (std of all rewards in the batch, ddof=1 + eps)
    A group of one sample gets advantage 0 in every mode. Returns float32 (float64 for float64 input
    under jax.enable_x64) in the shape of rewards.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"advantage mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    r = jnp.asarray(rewards)
    r = r.astype(jnp.promote_types(r.dtype, jnp.float32))
    if r.ndim == 2:
        n = r.shape[1]
        mean = jnp.mean(r, axis=1, keepdims=True)
        centered = r - mean
        var = jnp.sum(jnp.square(centered), axis=1, keepdims=True) / max(n - 1, 1)
        count = jnp.full_like(mean, n)
    elif r.ndim == 1:
        if group_ids is None:
            raise ValueError("1-D rewards need group_ids (or pass rewards as [num_prompts, n])")
        if num_groups is None:
            ids_np = np.asarray(group_ids)  # concrete ids only: remap arbitrary ids to 0..G-1
            _, ids_np = np.unique(ids_np, return_inverse=True)
            ids = jnp.asarray(ids_np.reshape(-1), jnp.int32)
            num_groups = int(ids_np.max()) + 1 if ids_np.size else 0
        else:
            ids = jnp.asarray(group_ids, jnp.int32)
        count_g = jax.ops.segment_sum(jnp.ones_like(r), ids, num_segments=num_groups)
        mean_g = jax.ops.segment_sum(r, ids, num_segments=num_groups) / jnp.maximum(count_g, 1.0)
        centered = r - mean_g[ids]
        sq_g = jax.ops.segment_sum(jnp.square(centered), ids, num_segments=num_groups)
        var = (sq_g / jnp.maximum(count_g - 1.0, 1.0))[ids]
        count = count_g[ids]
    else:
        raise ValueError(f"rewards must be [B] or [num_prompts, n], got shape {r.shape}")

    if mode == "drgrpo":
        adv = centered
    elif mode == "grpo":
        adv = centered / (jnp.sqrt(var) + eps)
    else:
        total = r.size
        batch_std = jnp.sqrt(jnp.sum(jnp.square(r - jnp.mean(r))) / max(total - 1, 1))
        adv = centered / (batch_std + eps)
    return jnp.where(count > 1, adv, 0.0)


# ---------------------------------------------------------------------------------------- aggregation
def _seq_mask_counts(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    n_tok = jnp.sum(mask, axis=-1)
    return n_tok, (n_tok > 0).astype(n_tok.dtype)


def loss_normalizer(mask: jax.Array | np.ndarray, loss_agg_mode: str) -> jax.Array:
    """The denominator of `aggregate_loss` for this mask: number of valid tokens for token-mean,
    number of sequences with at least one valid token otherwise. Compute it on the whole minibatch
    and pass it to every micro-batch (see the module docstring)."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    m = jnp.asarray(mask)
    m = m.astype(jnp.promote_types(m.dtype, jnp.float32))
    if loss_agg_mode == "token-mean":
        return jnp.sum(m)
    return jnp.sum(_seq_mask_counts(m)[1])


def aggregate_loss(token_loss: jax.Array, mask: jax.Array, loss_agg_mode: str,
                   normalizer: jax.Array | float | None = None,
                   max_response_length: int | None = None) -> jax.Array:
    """Reduces a per-token loss [B, L] to a scalar (formulas in the module docstring)."""
    m = jnp.asarray(mask).astype(token_loss.dtype)
    x = jnp.where(m > 0, token_loss, 0.0)
    if normalizer is None:
        normalizer = loss_normalizer(m, loss_agg_mode)
    denom = jnp.maximum(jnp.asarray(normalizer).astype(token_loss.dtype), 1.0)
    if loss_agg_mode == "token-mean":
        return jnp.sum(x) / denom
    seq_sum = jnp.sum(x, axis=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        n_tok, _ = _seq_mask_counts(m)
        per_seq = seq_sum / jnp.maximum(n_tok, 1.0)
    elif loss_agg_mode == "seq-mean-token-sum":
        per_seq = seq_sum
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        per_seq = seq_sum / float(max_response_length or m.shape[-1])
    else:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    return jnp.sum(per_seq) / denom


# ------------------------------------------------------------------------------------------- the loss
def _masked_stats(x, m, count):
    safe = jnp.maximum(count, 1.0)
    mean = jnp.sum(jnp.where(m > 0, x, 0.0)) / safe
    var = jnp.sum(jnp.where(m > 0, jnp.square(x - mean), 0.0)) / safe
    has = count > 0
    mx = jnp.where(has, jnp.max(jnp.where(m > 0, x, -jnp.inf)), 0.0)
    mn = jnp.where(has, jnp.min(jnp.where(m > 0, x, jnp.inf)), 0.0)
    return mean, jnp.sqrt(var), mx, mn


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
              advantages: jax.Array, mask: jax.Array, cfg: GRPOConfig, *,
              kl_coef: jax.Array | float | None = None, entropy: jax.Array | None = None,
              normalizer: jax.Array | float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped-surrogate GRPO loss (+ beta * KL to the reference, - entropy_coef * entropy).

    logp, old_logp, ref_logp: [B, L] log-probs of the sampled tokens under the policy being trained,
    the policy that sampled them, and the reference (None: no KL term, no reference model at all).
    advantages: [B] (broadcast over tokens) or [B, L]. mask: [B, L], 1 on response tokens.
    kl_coef: overrides cfg.kl_coef (pass the KL controller's value as an array so it does not retrace).
    entropy: per-token entropy [B, L] (for the metric and the optional bonus).
    normalizer: global denominator for micro-batching, see `loss_normalizer` and the module docstring.

    Returns (loss, metrics). Metrics are means over this call's valid tokens (sequences for
    response_length), except "loss"/"pg_loss"/"kl_loss", which use the same normaliser as the loss.
    """
    f32 = jnp.promote_types(jnp.asarray(logp).dtype, jnp.float32)  # float64 under jax.enable_x64
    m = jnp.asarray(mask, f32)
    valid = m > 0  # padding may hold anything (even inf/nan): zero it before any arithmetic
    logp = jnp.where(valid, logp.astype(f32), 0.0)
    old_logp = jax.lax.stop_gradient(jnp.where(valid, old_logp.astype(f32), 0.0))
    if ref_logp is not None:
        ref_logp = jnp.where(valid, ref_logp.astype(f32), 0.0)
    adv = jnp.asarray(advantages, f32)
    adv = adv[:, None] if adv.ndim == 1 else adv
    adv = jax.lax.stop_gradient(jnp.broadcast_to(adv, logp.shape))
    n_tok, seq_valid = _seq_mask_counts(m)
    num_tokens = jnp.sum(m)

    log_ratio = logp - old_logp
    if cfg.ratio_level == "sequence":  # GSPO: s_i = exp(mean_t log ratio), gradient through each token
        seq_log_ratio = jnp.sum(jnp.where(m > 0, log_ratio, 0.0), axis=-1) / jnp.maximum(n_tok, 1.0)
        log_ratio = logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(seq_log_ratio)[:, None]
    log_ratio = jnp.clip(log_ratio, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)

    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = jnp.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if cfg.dual_clip is not None:
        pg3 = -adv * cfg.dual_clip
        dual_clipped = (adv < 0) & (pg > pg3)
        pg = jnp.where(adv < 0, jnp.minimum(pg, pg3), pg)
    token_loss = pg

    agg = lambda x: aggregate_loss(x, m, cfg.loss_agg_mode, normalizer, cfg.max_response_length)
    tmean = lambda x: jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(num_tokens, 1.0)
    metrics: dict[str, jax.Array] = {}
    metrics["pg_loss"] = agg(pg)

    if ref_logp is not None:
        beta = jnp.asarray(cfg.kl_coef if kl_coef is None else kl_coef, f32)
        kl = kl_penalty(logp, jax.lax.stop_gradient(ref_logp), cfg.kl_estimator)
        token_loss = token_loss + beta * kl
        metrics["kl_loss"] = agg(kl)
        metrics["kl"] = tmean(kl)
        metrics["kl_coef"] = beta
    if entropy is not None:
        entropy = jnp.where(valid, entropy.astype(f32), 0.0)
        if cfg.entropy_coef:
            token_loss = token_loss - cfg.entropy_coef * entropy
        metrics["entropy"] = jax.lax.stop_gradient(tmean(entropy))

    loss = agg(token_loss)
    sg = jax.lax.stop_gradient
    ratio_s, log_ratio_s = sg(ratio), sg(log_ratio)
    metrics["loss"] = loss
    metrics["clipfrac"] = tmean(clipped.astype(f32))
    metrics["clipfrac_high"] = tmean(((adv > 0) & (ratio_s > 1.0 + cfg.clip_high)).astype(f32))
    metrics["clipfrac_low"] = tmean(((adv < 0) & (ratio_s < 1.0 - cfg.clip_low)).astype(f32))
    if cfg.dual_clip is not None:
        metrics["dual_clipfrac"] = tmean(dual_clipped.astype(f32))
    metrics["approx_kl"] = tmean(ratio_s - 1.0 - log_ratio_s)  # k3 estimate of KL(pi_old || pi)
    r_mean, r_std, r_max, r_min = _masked_stats(ratio_s, m, num_tokens)
    metrics.update(ratio_mean=r_mean, ratio_std=r_std, ratio_max=r_max, ratio_min=r_min)
    a_mean, a_std, a_max, a_min = _masked_stats(adv, m, num_tokens)
    metrics.update(advantage_mean=a_mean, advantage_std=a_std, advantage_max=a_max, advantage_min=a_min)
    num_seqs = jnp.sum(seq_valid)
    l_mean, _, l_max, l_min = _masked_stats(n_tok, seq_valid, num_seqs)
    metrics.update(response_length_mean=l_mean, response_length_max=l_max, response_length_min=l_min)
    metrics["num_tokens"] = num_tokens
    metrics["num_seqs"] = num_seqs
    metrics = {k: sg(v) for k, v in metrics.items()}
    return loss, metrics
