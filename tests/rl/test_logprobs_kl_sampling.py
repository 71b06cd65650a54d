"""Chunked log-probs vs the plain full computation; KL controllers; dynamic-sampling filter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlaa_jax.rl import (AdaptiveKLController, FixedKLController, filter_zero_variance_groups,
                         make_kl_controller, token_logprobs)


def full_reference(hidden, w, targets, temperature=1.0):
    logits = jnp.einsum("bld,vd->blv", hidden, w, preferred_element_type=jnp.float32) / temperature
    logsm = jax.nn.log_softmax(logits, -1)
    logp = jnp.take_along_axis(logsm, targets[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logsm) * logsm, -1)
    return logp, ent


@pytest.fixture(scope="module")
def lp_inputs():
    rng = np.random.default_rng(0)
    B, L, D, V = 3, 13, 16, 97
    hidden = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(V, D)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (B, L)), jnp.float32)
    return hidden, w, targets, mask


@pytest.mark.parametrize("chunk", [1, 5, 13, 1000])  # 13 = L exactly; 5 leaves a padded tail
def test_chunked_logprobs_values_and_gradients(lp_inputs, chunk):
    hidden, w, targets, mask = lp_inputs
    logp, ent = jax.jit(lambda h, w: token_logprobs(h, w, targets, chunk_size=chunk, temperature=0.8))(hidden, w)
    ref_logp, ref_ent = full_reference(hidden, w, targets, 0.8)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)

    cot = jnp.asarray(np.random.default_rng(1).normal(size=logp.shape), jnp.float32)

    def f(h, w):
        lp, en = token_logprobs(h, w, targets, mask, chunk_size=chunk)
        return jnp.sum(lp * cot) + 0.3 * jnp.sum(en * cot)

    def f_ref(h, w):
        lp, en = full_reference(h, w, targets)
        return jnp.sum(lp * cot * mask) + 0.3 * jnp.sum(en * cot * mask)

    g = jax.jit(jax.grad(f, argnums=(0, 1)))(hidden, w)
    g_ref = jax.grad(f_ref, argnums=(0, 1))(hidden, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_masked_positions_are_zero_and_padding_targets_are_safe(lp_inputs):
    hidden, w, targets, mask = lp_inputs
    bad_targets = jnp.where(mask > 0, targets, -100)  # e.g. an ignore index in padding
    logp, ent = token_logprobs(hidden, w, bad_targets, mask, chunk_size=8)
    assert np.all(np.asarray(logp)[np.asarray(mask) == 0] == 0)
    assert np.all(np.asarray(ent)[np.asarray(mask) == 0] == 0)
    ref_logp, _ = full_reference(hidden, w, targets)
    np.testing.assert_allclose(logp, ref_logp * mask, rtol=1e-5, atol=1e-5)


def test_memory_stays_chunked_in_forward_and_gradient():
    """XLA's own buffer accounting: the full-logits version needs >= B*L*V*4 bytes of temporaries,
    the chunked one a small fraction of it, for the value and for the gradient."""
    B, L, D, V = 2, 256, 32, 4096
    full_bytes = B * L * V * 4  # 8 MiB
    h = jax.ShapeDtypeStruct((B, L, D), jnp.float32)
    w = jax.ShapeDtypeStruct((V, D), jnp.float32)
    t = jax.ShapeDtypeStruct((B, L), jnp.int32)

    def temp_bytes(fn):
        analysis = jax.jit(fn).lower(h, w, t).compile().memory_analysis()
        if analysis is None:
            pytest.skip("backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    # 16 positions x 1024 vocabulary rows a block: 128 KiB logits blocks (the default block here is the
    # whole 4096-row vocabulary: 512 KiB, whose gradient with the float32 d lm_head is ~2.2 MiB)
    chunked = lambda h, w, t: jnp.sum(token_logprobs(h, w, t, chunk_size=16, vocab_block=1024)[0])
    plain = lambda h, w, t: jnp.sum(full_reference(h, w, t)[0])
    grad = lambda f: (lambda h, w, t: jax.grad(f, argnums=(0, 1))(h, w, t))
    assert temp_bytes(plain) >= full_bytes
    assert temp_bytes(grad(plain)) >= full_bytes
    assert temp_bytes(chunked) < full_bytes / 4
    assert temp_bytes(grad(chunked)) < full_bytes / 4


def _primitive_counts(jaxpr, counts=None):
    """Primitive name -> count over a closed jaxpr and every jaxpr nested in it (loops, remat)."""
    import collections
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for sub in jax.core.jaxprs_in_params(eqn.params):
            _primitive_counts(sub, counts)
    return counts


def test_gradient_recomputes_each_block_and_scatters_nothing():
    """The hand-written backward (`logprobs._head_bwd`): per vocabulary block one projection for the
    forward's statistics, one to recompute the logits and two for d hidden and d lm_head, plus one dot of
    the hidden states with their targets' rows; the target's gradient is a select, no scatter-add into a
    zeroed [B, L, V] buffer, with one chunk or several."""
    B, L, D, V = 2, 24, 16, 512
    h = jnp.zeros((B, L, D), jnp.float32)
    w = jnp.zeros((V, D), jnp.float32)
    t = jnp.zeros((B, L), jnp.int32)

    def counts(chunk):
        f = lambda h, w: jnp.sum(token_logprobs(h, w, t, chunk_size=chunk, vocab_block=128)[0])
        return _primitive_counts(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(h, w).jaxpr)

    for chunk in (L, 8):
        c = counts(chunk)
        assert c["dot_general"] == 5, c
        assert not any("scatter" in name for name in c), c


def test_data_parallel_sharding_is_kept():
    """B sharded over 8 devices: same numbers, the output stays sharded over B, and the hidden
    states are never all-gathered (only the lm_head gradient is reduced)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(2)
    B, L, D, V = 8, 12, 16, 64
    hidden = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(V, D)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
    data = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    f = lambda h, w, t: token_logprobs(h, w, t, chunk_size=5)[0]
    fn = jax.jit(f, in_shardings=(data, rep, data), out_shardings=data)
    args = (jax.device_put(hidden, data), jax.device_put(w, rep), jax.device_put(targets, data))
    np.testing.assert_allclose(fn(*args), full_reference(hidden, w, targets)[0], rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda h, w, t: jnp.sum(f(h, w, t)), argnums=(0, 1)),
                   in_shardings=(data, rep, data), out_shardings=(data, rep))
    for compiled in (fn.lower(*args).compile(), grad.lower(*args).compile()):
        assert "all-gather" not in compiled.as_text()


def test_adaptive_kl_controller_openrlhf_rule():
    c = make_kl_controller("adaptive", 1e-3, target=5e-4, horizon=10000)
    assert isinstance(c, AdaptiveKLController)
    # KL above target by 50% -> error clipped at +0.2; 2048 samples -> mult = 1 + 0.2 * 2048 / 10000
    c1 = c.update(7.5e-4, 2048)
    np.testing.assert_allclose(c1.value, 1e-3 * (1 + 0.2 * 2048 / 10000))
    # KL at 90% of target -> error -0.1
    c2 = c1.update(4.5e-4, 1000)
    np.testing.assert_allclose(c2.value, c1.value * (1 - 0.1 * 1000 / 10000))
    assert c.value == 1e-3  # pure: the original is unchanged
    # a pytree: jit-able update, flatten/unflatten round trip for checkpoints
    leaves, treedef = jax.tree_util.tree_flatten(c)
    assert len(leaves) == 3 and jax.tree_util.tree_unflatten(treedef, leaves) == c
    cj = jax.jit(lambda c, kl, n: c.update(kl, n))(c, jnp.float32(7.5e-4), jnp.float32(2048))
    np.testing.assert_allclose(float(cj.value), c1.value, rtol=1e-6)

    f = make_kl_controller("fixed", 0.04)
    assert isinstance(f, FixedKLController) and f.update(1.0, 100).value == 0.04
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", 1e-3)
    with pytest.raises(ValueError, match="kind"):
        make_kl_controller("pid", 1e-3)


def test_dynamic_sampling_filter():
    r = np.array([[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0], [0.5, 0.5, 0.2, 0.5]])
    res = filter_zero_variance_groups(r)
    assert res.num_groups == 4 and res.num_dropped_groups == 2 and res.num_kept_groups == 2
    np.testing.assert_array_equal(res.kept_indices, [4, 5, 6, 7, 12, 13, 14, 15])
    # flat with ids, interleaved; a group of one is dropped
    flat = np.array([1.0, 0.0, 1.0, 1.0, 0.3])
    ids = np.array([7, 9, 7, 9, 11])
    res = filter_zero_variance_groups(flat, ids)
    np.testing.assert_array_equal(res.kept_indices, [1, 3])
    assert (res.num_groups, res.num_kept_groups, res.num_dropped_groups) == (3, 1, 2)
    # atol: tiny spreads count as zero variance
    assert filter_zero_variance_groups(np.array([[0.5, 0.5 + 1e-9]]), atol=1e-6).num_dropped_groups == 1
    with pytest.raises(ValueError, match="group_ids"):
        filter_zero_variance_groups(flat)
