"""`optim.skip_nonfinite`: the same updates as the wrapped optimiser on finite gradients, and on a NaN or
infinity anywhere, zero updates with the moments left bitwise as they were (optax.apply_if_finite's
contract, without its lax.cond)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlaa_jax.train import optim


def _setup():
    rs = np.random.RandomState(0)
    params = {"w": jnp.asarray(rs.randn(8, 4), jnp.float32), "b": jnp.asarray(rs.randn(4), jnp.float32)}
    inner = optim.make_optimizer(params, learning_rate=1e-2, total_steps=10, weight_decay=0.1, max_grad_norm=1.0)
    grads = [{"w": jnp.asarray(rs.randn(8, 4), jnp.float32), "b": jnp.asarray(rs.randn(4), jnp.float32)}
             for _ in range(3)]
    return params, inner, grads


def test_finite_updates_equal_the_inner_optimizer():
    params, inner, grads = _setup()
    tx = optim.skip_nonfinite(inner)
    s_ref, s = inner.init(params), tx.init(params)
    for g in grads:
        u_ref, s_ref = inner.update(g, s_ref, params)
        u, s = jax.jit(tx.update)(g, s, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), u, u_ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), s.inner_state, s_ref)
    assert int(s.total_notfinite) == 0 and bool(s.last_finite)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_gradient_is_dropped(bad):
    params, inner, grads = _setup()
    tx = optim.skip_nonfinite(inner)
    step = jax.jit(tx.update)
    _, s = step(grads[0], tx.init(params), params)
    poisoned = {"w": grads[1]["w"].at[3, 2].set(bad), "b": grads[1]["b"]}
    u, s_bad = step(poisoned, s, params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), s_bad.inner_state, s.inner_state)
    assert int(s_bad.total_notfinite) == 1 and int(s_bad.notfinite_count) == 1 and not bool(s_bad.last_finite)
    # the next finite step trains from the unchanged state, as if the bad one never happened
    u2, s2 = step(grads[2], s_bad, params)
    u_ref, _ = step(grads[2], s, params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), u2, u_ref)
    assert int(s2.notfinite_count) == 0 and int(s2.total_notfinite) == 1


def test_state_matches_apply_if_finite_structure():
    """Checkpoints written with optax.apply_if_finite restore into this state and back."""
    params, inner, _ = _setup()
    ours = jax.tree.structure(optim.skip_nonfinite(inner).init(params))
    theirs = jax.tree.structure(optax.apply_if_finite(inner, max_consecutive_errors=2 ** 30).init(params))
    assert ours == theirs


def test_weight_decay_skips_vectors_of_stacked_layers():
    """Decay on matrices only, by the rank one layer sees: a stacked decoder layer's bias [layers, N] and
    norm scale are vectors (no decay), its kernels [layers, K, N] matrices."""
    from flax import nnx
    from tests.fixtures.hf_models import tiny_hf_config_dict
    from vlaa_jax.models import qwen2_5_vl as q
    from vlaa_jax.train import step as st
    _, params, _ = st.split_model(q.Qwen25VL(q.from_hf_dict(tiny_hf_config_dict()), rngs=nnx.Rngs(0)))
    tx = optim.make_optimizer(params, learning_rate=1e-2, total_steps=10, weight_decay=0.5, max_grad_norm=None)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    attn = updates["language_model"]["layers"]["self_attn"]["q_proj"]
    assert attn["bias"][...].ndim == 2 and float(jnp.abs(attn["bias"][...]).max()) == 0
    assert float(jnp.abs(updates["language_model"]["layers"]["input_layernorm"]["scale"][...]).max()) == 0
    assert float(jnp.abs(attn["kernel"][...]).max()) > 0
    assert float(jnp.abs(updates["language_model"]["embed_tokens"][...]).max()) > 0
