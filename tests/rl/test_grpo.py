"""GRPO loss, aggregation and advantages against an independent float64 NumPy implementation."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlaa_jax.rl import (GRPOConfig, LOSS_AGG_MODES, aggregate_loss, group_advantages, grpo_loss,
                         loss_normalizer)


# ------------------------------------------------------------------ independent NumPy reference (f64)
def np_kl(logp, ref, est):
    if est == "k1":
        return logp - ref
    if est == "k2":
        return 0.5 * (logp - ref) ** 2
    d = np.clip(ref - logp, -20, 20)
    return np.clip(np.exp(d) - d - 1, -10, 10)


def np_grpo_loss(logp, old, ref, adv, mask, cfg, beta, normalizer=None, entropy=None):
    logp, old, mask = (np.asarray(x, np.float64) for x in (logp, old, mask))
    B, L = logp.shape
    A = np.broadcast_to(np.asarray(adv, np.float64).reshape(B, -1), (B, L))
    n = mask.sum(1)
    if cfg.ratio_level == "token":
        lr = logp - old
    else:
        seq = np.array([sum(logp[i, t] - old[i, t] for t in range(L) if mask[i, t]) / max(n[i], 1)
                        for i in range(B)])
        lr = np.repeat(seq[:, None], L, axis=1)
    ratio = np.exp(np.clip(lr, -20, 20))
    loss = np.maximum(-A * ratio, -A * np.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    if cfg.dual_clip is not None:
        loss = np.where(A < 0, np.minimum(loss, -A * cfg.dual_clip), loss)
    if ref is not None:
        loss = loss + beta * np_kl(logp, np.asarray(ref, np.float64), cfg.kl_estimator)
    if entropy is not None and cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * np.asarray(entropy, np.float64)
    return np_aggregate(loss, mask, cfg.loss_agg_mode, normalizer, cfg.max_response_length)


def np_aggregate(loss, mask, mode, normalizer=None, max_len=None):
    B, L = loss.shape
    rows = [[loss[i, t] for t in range(L) if mask[i, t]] for i in range(B)]
    rows_nonempty = [r for r in rows if r]
    if mode == "token-mean":
        total = sum(sum(r) for r in rows)
        return total / (normalizer if normalizer is not None else sum(len(r) for r in rows))
    if mode == "seq-mean-token-mean":
        per = [sum(r) / len(r) for r in rows_nonempty]
    elif mode == "seq-mean-token-sum":
        per = [sum(r) for r in rows_nonempty]
    else:
        per = [sum(r) / (max_len or L) for r in rows_nonempty]
    return sum(per) / (normalizer if normalizer is not None else len(rows_nonempty))


def random_batch(rng, B=6, L=9, spread=0.4, dtype=np.float64):
    logp = -rng.uniform(0.05, 3.0, (B, L))
    old = logp + rng.uniform(-spread, spread, (B, L))
    ref = logp + rng.uniform(-spread, spread, (B, L))
    adv = rng.normal(size=B)
    lengths = rng.integers(1, L + 1, B)
    lengths[-1] = 0  # an all-padding row must be ignored
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.float64)
    # garbage in padding positions must not leak into anything
    logp = np.where(mask > 0, logp, 7.0)
    old = np.where(mask > 0, old, -np.inf)
    ref = np.where(mask > 0, ref, np.nan)
    return [x.astype(dtype) for x in (logp, old, ref, adv)] + [mask.astype(dtype)]


CONFIGS = [
    GRPOConfig(loss_agg_mode=mode, ratio_level=level, dual_clip=dual, kl_estimator=est,
               clip_low=0.2, clip_high=0.28, max_response_length=12, entropy_coef=0.01)
    for mode, level, dual, est in itertools.product(
        LOSS_AGG_MODES, ("token", "sequence"), (None, 3.0), ("k1", "k2", "k3"))
    # keep the product lean: every mode x level x dual, estimators cycled
    if (LOSS_AGG_MODES.index(mode) + (level == "sequence") + (dual is not None)) % 3
    == ("k1", "k2", "k3").index(est)
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss_agg_mode}-{c.ratio_level}-"
                         f"dual{c.dual_clip}-{c.kl_estimator}")
def test_loss_matches_numpy_float64(cfg):
    rng = np.random.default_rng(abs(hash(str(cfg))) % 2**32)
    logp, old, ref, adv, mask = random_batch(rng)
    ent = rng.uniform(0, 2, logp.shape)
    with jax.enable_x64(True):
        loss, metrics = jax.jit(grpo_loss, static_argnames="cfg")(
            jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
            jnp.asarray(mask), cfg=cfg, kl_coef=0.05, entropy=jnp.asarray(ent))
        assert loss.dtype == jnp.float64
        want = np_grpo_loss(logp, old, ref, adv, mask, cfg, 0.05, entropy=ent)
        np.testing.assert_allclose(float(loss), want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(float(metrics["loss"]), want, rtol=0, atol=1e-6)
        # without reference: no KL term at all
        loss_noref, m2 = grpo_loss(jnp.asarray(logp), jnp.asarray(old), None, jnp.asarray(adv),
                                   jnp.asarray(mask), cfg)
        np.testing.assert_allclose(float(loss_noref), np_grpo_loss(logp, old, None, adv, mask, cfg, 0.0),
                                   atol=1e-6)
        assert "kl" not in m2


def test_loss_float32_close_to_float64_reference():
    rng = np.random.default_rng(0)
    logp, old, ref, adv, mask = random_batch(rng, B=16, L=64)
    for mode in LOSS_AGG_MODES:
        cfg = GRPOConfig(loss_agg_mode=mode, dual_clip=3.0)
        loss, _ = grpo_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, mask)), cfg=cfg)
        assert loss.dtype == jnp.float32
        np.testing.assert_allclose(float(loss), np_grpo_loss(logp, old, ref, adv, mask, cfg, cfg.kl_coef),
                                   rtol=1e-5, atol=1e-6)


def test_hand_computed_clipping():
    # ratios 1.5 and 0.5 (old logp = 0), clip 0.2: A=+1 -> -min(r, clip r); A=-1 -> max(r, clip r)
    logp = jnp.log(jnp.array([[1.5, 0.5], [1.5, 0.5]]))
    old = jnp.zeros((2, 2))
    mask = jnp.ones((2, 2))
    cfg = GRPOConfig(loss_agg_mode="token-mean", clip_low=0.2, clip_high=0.2)
    loss, m = grpo_loss(logp, old, None, jnp.array([1.0, -1.0]), mask, cfg)
    # tokens: (-1.2, -0.5) and (1.5, 0.8) -> mean 0.15
    np.testing.assert_allclose(float(loss), (-1.2 - 0.5 + 1.5 + 0.8) / 4, atol=1e-6)
    # clip active at (A>0, r=1.5) and (A<0, r=0.5)
    np.testing.assert_allclose(float(m["clipfrac"]), 0.5, atol=1e-7)
    np.testing.assert_allclose(float(m["clipfrac_high"]), 0.25, atol=1e-7)
    np.testing.assert_allclose(float(m["clipfrac_low"]), 0.25, atol=1e-7)
    np.testing.assert_allclose(float(m["ratio_max"]), 1.5, rtol=1e-6)
    np.testing.assert_allclose(float(m["ratio_min"]), 0.5, rtol=1e-6)

    # dual clip: A=-1, r=4 -> max(4, 1.2) = 4, capped at c=3
    cfg = GRPOConfig(loss_agg_mode="token-mean", dual_clip=3.0)
    loss, m = grpo_loss(jnp.log(jnp.array([[4.0]])), jnp.zeros((1, 1)), None, jnp.array([-1.0]),
                        jnp.ones((1, 1)), cfg)
    np.testing.assert_allclose(float(loss), 3.0, rtol=1e-6)
    assert float(m["dual_clipfrac"]) == 1.0

    # GSPO: sequence ratio = exp(mean log ratio) = exp((log 1.5 + log 0.5)/2) = sqrt(0.75) ~ 0.866
    cfg = GRPOConfig(loss_agg_mode="seq-mean-token-mean", ratio_level="sequence")
    loss, _ = grpo_loss(jnp.log(jnp.array([[1.5, 0.5]])), jnp.zeros((1, 2)), None, jnp.array([1.0]),
                        jnp.ones((1, 2)), cfg)
    np.testing.assert_allclose(float(loss), -np.sqrt(0.75), rtol=1e-6)


def test_kl_estimators_hand_values():
    from vlaa_jax.rl import kl_penalty
    logp, ref = jnp.array([np.log(0.5)]), jnp.array([np.log(0.25)])
    # log r = ref - logp = -log 2
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), [np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), [0.5 * np.log(2) ** 2], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3"), [0.5 - 1 + np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "low_var_kl"), [0.5 - 1 + np.log(2)], rtol=1e-6)
    # clamped: ref far above policy
    assert float(kl_penalty(jnp.array([-50.0]), jnp.array([0.0]), "k3")[0]) == 10.0
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k4")


def test_aggregation_modes_hand_computed_and_where_they_differ():
    loss = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    want = {"token-mean": 10 / 4, "seq-mean-token-mean": (2 + 4) / 2, "seq-mean-token-sum": (6 + 4) / 2,
            "seq-mean-token-sum-norm": (6 / 8 + 4 / 8) / 2}
    for mode, w in want.items():
        np.testing.assert_allclose(float(aggregate_loss(loss, mask, mode, max_response_length=8)), w)
    # sum-norm without max_response_length uses the padded length L=4
    np.testing.assert_allclose(float(aggregate_loss(loss, mask, "seq-mean-token-sum-norm")), (6 / 4 + 4 / 4) / 2)

    # equal lengths n == L == max_len: every mean-type mode agrees; token-sum is n times larger
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(5, 7)))
    full = jnp.ones((5, 7))
    vals = {m: float(aggregate_loss(x, full, m, max_response_length=7)) for m in LOSS_AGG_MODES}
    np.testing.assert_allclose(vals["seq-mean-token-mean"], vals["token-mean"], rtol=1e-6)
    np.testing.assert_allclose(vals["seq-mean-token-sum-norm"], vals["token-mean"], rtol=1e-6)
    np.testing.assert_allclose(vals["seq-mean-token-sum"], 7 * vals["token-mean"], rtol=1e-6)
    # unequal lengths: token-mean weights long answers more than seq-mean-token-mean
    ragged = (jnp.arange(7)[None] < jnp.array([[1], [7], [3], [7], [2]])).astype(jnp.float32)
    vals = {m: float(aggregate_loss(x, ragged, m, max_response_length=7)) for m in LOSS_AGG_MODES}
    assert abs(vals["seq-mean-token-mean"] - vals["token-mean"]) > 1e-3
    assert abs(vals["seq-mean-token-sum-norm"] - vals["token-mean"]) > 1e-3
    # sum-norm == token-sum / max_len exactly
    np.testing.assert_allclose(vals["seq-mean-token-sum-norm"], vals["seq-mean-token-sum"] / 7, rtol=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_gradient_matches_finite_differences(mode):
    rng = np.random.default_rng(3)
    B, L = 4, 5
    cfg = GRPOConfig(loss_agg_mode=mode, dual_clip=3.0, kl_estimator="k3", max_response_length=6,
                     clip_low=0.2, clip_high=0.3)
    with jax.enable_x64(True):
        logp, old, ref, adv, mask = random_batch(rng, B, L, spread=0.6)
        # keep ratios away from the clip kinks so the central difference is valid
        r = np.exp(logp - old)
        for edge in (0.8, 1.3):
            near = np.abs(r - edge) < 1e-3
            logp = np.where(near, logp + 5e-3, logp)
        f = jax.jit(lambda lp: grpo_loss(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                         jnp.asarray(mask), cfg, kl_coef=0.1)[0])
        g = np.asarray(jax.grad(f)(jnp.asarray(logp)))
        h = 1e-6
        fd = np.zeros_like(logp)
        for i, t in itertools.product(range(B), range(L)):
            e = np.zeros_like(logp)
            e[i, t] = h
            fd[i, t] = (float(f(jnp.asarray(logp + e))) - float(f(jnp.asarray(logp - e)))) / (2 * h)
        np.testing.assert_allclose(g, fd, atol=1e-6)
        assert np.all(g[mask == 0] == 0)
        assert np.all(np.isfinite(g))


def test_on_policy_first_step_is_reinforce_with_baseline():
    """With old = current (ratio 1) and ref = current, the gradient wrt the model parameters equals
    the REINFORCE-with-baseline gradient -sum_i A_i grad log pi(y_i) / N (advantages are the
    baseline-subtracted rewards)."""
    from vlaa_jax.rl import token_logprobs
    rng = np.random.default_rng(4)
    B, L, D, V = 4, 6, 8, 11
    hidden = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    w0 = jnp.asarray(rng.normal(size=(V, D)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, L)))
    mask = (jnp.arange(L)[None] < jnp.array([[6], [3], [1], [5]])).astype(jnp.float32)
    rewards = jnp.array([[1.0, 0.0], [0.0, 0.0]]).reshape(-1)
    adv = group_advantages(rewards.reshape(2, 2))
    adv = adv.reshape(-1)
    for mode in LOSS_AGG_MODES:
        cfg = GRPOConfig(loss_agg_mode=mode, kl_estimator="k3", max_response_length=L)

        def loss_fn(w):
            lp, _ = token_logprobs(hidden, w, targets, mask, chunk_size=5)
            sg = jax.lax.stop_gradient(lp)
            return grpo_loss(lp, sg, sg, adv, mask, cfg, kl_coef=0.5)[0]

        def reinforce(w):
            lp, _ = token_logprobs(hidden, w, targets, mask, chunk_size=5)
            return aggregate_loss(-adv[:, None] * lp, mask, mode, max_response_length=L)

        np.testing.assert_allclose(jax.jit(jax.grad(loss_fn))(w0), jax.jit(jax.grad(reinforce))(w0),
                                   atol=1e-6)
        # and the loss value at ratio 1 is -agg(A)
        np.testing.assert_allclose(float(jax.jit(loss_fn)(w0)),
                                   float(aggregate_loss(-jnp.broadcast_to(adv[:, None], (B, L)), mask,
                                                        mode, max_response_length=L)), atol=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batch_accumulation_equals_full_batch(mode):
    rng = np.random.default_rng(5)
    logp, old, ref, adv, mask = (jnp.asarray(x, jnp.float32) for x in random_batch(rng, B=8, L=10))
    cfg = GRPOConfig(loss_agg_mode=mode, max_response_length=16)
    f = lambda lp, o, r, a, m, n=None: grpo_loss(lp, o, r, a, m, cfg, normalizer=n)[0]
    step = jax.jit(jax.value_and_grad(f))
    full, g_full = step(logp, old, ref, adv, mask)
    norm = loss_normalizer(mask, mode)
    total, grads = 0.0, []
    for s in range(0, 8, 2):
        sl = slice(s, s + 2)
        v, g = step(logp[sl], old[sl], ref[sl], adv[sl], mask[sl], norm)
        total += float(v)
        grads.append(g)
    np.testing.assert_allclose(total, float(full), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(grads), g_full, rtol=1e-5, atol=1e-7)
    # the naive mean of micro-batch means is a different (wrong) number for ragged batches
    naive = np.mean([float(step(logp[s:s + 2], old[s:s + 2], ref[s:s + 2], adv[s:s + 2], mask[s:s + 2])[0])
                     for s in range(0, 8, 2)])
    assert abs(naive - float(full)) > 1e-4


def test_metrics_lengths_and_entropy():
    logp = jnp.zeros((3, 4))
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    ent = jnp.array([[1.0, 2.0, 3.0, 99.0], [4.0, 99, 99, 99], [99.0] * 4])
    _, m = grpo_loss(logp, logp, logp, jnp.array([1.0, -1.0, 5.0]), mask, GRPOConfig(), entropy=ent)
    assert float(m["response_length_mean"]) == 2.0
    assert float(m["response_length_max"]) == 3.0 and float(m["response_length_min"]) == 1.0
    assert float(m["num_seqs"]) == 2.0 and float(m["num_tokens"]) == 4.0
    np.testing.assert_allclose(float(m["entropy"]), 2.5)
    np.testing.assert_allclose(float(m["advantage_mean"]), (3 * 1.0 - 1.0) / 4)
    assert float(m["advantage_max"]) == 1.0 and float(m["advantage_min"]) == -1.0
    assert float(m["kl"]) == 0.0 and float(m["approx_kl"]) == 0.0 and float(m["ratio_mean"]) == 1.0


# ------------------------------------------------------------------------------------------ advantages
def np_group_adv(r, mode, eps=1e-6):
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    batch_std = r.std(ddof=1) if r.size > 1 else 0.0
    for i, row in enumerate(r):
        if row.size < 2:
            continue
        c = row - row.mean()
        out[i] = c if mode == "drgrpo" else c / ((row.std(ddof=1) if mode == "grpo" else batch_std) + eps)
    return out


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "batch"])
def test_group_advantages_matches_numpy(mode):
    rng = np.random.default_rng(6)
    r = rng.integers(0, 2, (6, 4)).astype(np.float64) * rng.uniform(0.2, 1.0, (6, 4))
    r[0] = 1.0  # zero-variance group -> all zeros
    want = np_group_adv(r, mode)
    np.testing.assert_allclose(group_advantages(r, mode=mode), want, rtol=1e-5, atol=1e-6)
    # flat rewards with shuffled arbitrary group ids give the same numbers
    perm = rng.permutation(24)
    ids = np.repeat(np.array([17, 3, 99, 5, 42, 8]), 4)[perm]
    got = group_advantages(r.reshape(-1)[perm], ids, mode=mode)
    np.testing.assert_allclose(got, want.reshape(-1)[perm], rtol=1e-5, atol=1e-6)
    # jitted with traced ids in [0, G)
    dense = np.repeat(np.arange(6), 4)[perm]
    got = jax.jit(lambda x, g: group_advantages(x, g, mode=mode, num_groups=6))(r.reshape(-1)[perm], dense)
    np.testing.assert_allclose(got, want.reshape(-1)[perm], rtol=1e-5, atol=1e-6)


def test_group_advantages_hand_and_singletons():
    # rewards (1, 0, 0, 0): mean .25, unbiased std = sqrt(.75/3) = .5 -> (1.5, -.5, -.5, -.5)
    np.testing.assert_allclose(group_advantages(np.array([[1.0, 0, 0, 0]])), [[1.5, -0.5, -0.5, -0.5]],
                               rtol=1e-5)
    # a group of one gets 0 in every mode (and no NaN from ddof=1)
    for mode in ("grpo", "drgrpo", "batch"):
        a = group_advantages(np.array([1.0, 0.0, 1.0]), np.array([0, 1, 1]), mode=mode)
        assert float(a[0]) == 0.0 and np.all(np.isfinite(a))
        assert np.all(np.asarray(group_advantages(np.array([[3.0]]), mode=mode)) == 0.0)
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(np.array([1.0, 2.0]))


def test_config_from_dict_and_errors():
    cfg = GRPOConfig.from_config({"clip_high": 0.28, "loss_agg_mode": "token-mean"})
    assert cfg.clip_high == 0.28 and hash(cfg)
    with pytest.raises(ValueError, match="unknown GRPO config keys"):
        GRPOConfig.from_config({"clip_hihg": 0.28})
    with pytest.raises(ValueError, match="loss_agg_mode"):
        GRPOConfig(loss_agg_mode="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        GRPOConfig(dual_clip=0.5)


def test_configs_from_the_grpo_preset():
    """The trainer's config (configs/grpo.py, ml_collections) builds our dataclasses as it is."""
    from configs import grpo as grpo_configs
    from vlaa_jax.rewards import RewardConfig
    for preset in grpo_configs.PRESETS:
        c = grpo_configs.get_config(preset)
        loss_cfg = GRPOConfig.from_config(c.grpo.loss)
        assert loss_cfg.loss_agg_mode == c.grpo.loss.loss_agg_mode
        reward_cfg = RewardConfig.from_config(c.reward)
        assert reward_cfg.math_timeout_s == c.reward.math_timeout_s
