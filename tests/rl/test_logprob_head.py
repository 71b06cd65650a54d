"""The fused log-prob head (`token_logprobs`: chunks of positions x blocks of the vocabulary, hand-written
backward) against a plain full-logits computation written here: values and gradients w.r.t. the hidden
states and the output projection, with masks, temperature, chunk sizes and vocabulary blocks that do and do
not divide the length and the vocabulary; float32 to ~1e-5, bfloat16 to its rounding; data-parallel and
vocabulary-sharded meshes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlaa_jax.rl import logprobs as lp_lib
from vlaa_jax.rl import token_logprobs


def plain(hidden, w, targets, mask=None, temperature=1.0):
    """Textbook: full float32 logits, log_softmax, the target's entry; zero where mask == 0."""
    logits = jnp.einsum("bld,vd->blv", hidden, w, preferred_element_type=jnp.float32) / temperature
    logsm = jax.nn.log_softmax(logits, -1)
    logp = jnp.take_along_axis(logsm, targets[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logsm) * logsm, -1)
    if mask is not None:
        logp, ent = logp * mask, ent * mask
    return logp, ent


def inputs(B, L, D, V, seed=0, scale=0.5, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, L, D)), dtype)
    w = jnp.asarray(rng.normal(size=(V, D)) * scale, dtype)
    targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (B, L)), jnp.float32)
    cots = tuple(jnp.asarray(rng.normal(size=(B, L)), jnp.float32) for _ in range(2))
    return hidden, w, targets, mask, cots


def close(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-30))


def check(fn_kwargs, hidden, w, targets, mask, cots, temperature, rtol=1e-5, ref_inputs=None):
    """Values and the gradient of <cot_logp, logp> + <cot_ent, entropy> w.r.t. (hidden, w)."""
    def ours(h, w):
        return token_logprobs(h, w, targets, mask, temperature=temperature, **fn_kwargs)

    def ref(h, w):
        return plain(h, w, targets, mask, temperature)

    def scalar(f):
        return lambda h, w: sum(jnp.sum(o * c) for o, c in zip(f(h, w), cots))

    rh, rw = ref_inputs or (hidden, w)
    for a, b in zip(jax.jit(ours)(hidden, w), ref(rh, rw)):
        close(a, b, rtol)
    grads = jax.jit(jax.grad(scalar(ours), argnums=(0, 1)))(hidden, w)
    ref_grads = jax.grad(scalar(ref), argnums=(0, 1))(rh, rw)
    for g, x in zip(grads, (hidden, w)):
        assert g.dtype == x.dtype and g.shape == x.shape
    for a, b in zip(grads, ref_grads):
        close(a, b, rtol)
    return grads


@pytest.mark.parametrize("V", [97, 120])                 # prime: padded blocks; 120: divisor blocks
@pytest.mark.parametrize("chunk", [1, 5, 13, 64])        # 13 = L; 5 leaves a padded tail; 64 > L
@pytest.mark.parametrize("block", [None, 7, 16, 1000])   # None: the default; 1000 > V: one block
def test_values_and_gradients_match_full_logits(V, chunk, block):
    hidden, w, targets, mask, cots = inputs(3, 13, 16, V, seed=V + chunk)
    check(dict(chunk_size=chunk, vocab_block=block), hidden, w, targets, mask, cots, temperature=0.7)


def test_large_logits_and_unit_temperature():
    """Logits of magnitude ~100 (the online max keeps exp finite) and no mask."""
    hidden, w, targets, _, cots = inputs(2, 9, 8, 50, seed=3, scale=12.0)
    check(dict(chunk_size=4, vocab_block=8), hidden, w, targets, None, cots, temperature=1.0)


@pytest.mark.parametrize("which", [0, 1])
def test_gradient_of_one_output_only(which):
    """Only log-probs (the policy-gradient loss) or only entropies reach the loss: the other's
    cotangent is zero."""
    hidden, w, targets, mask, cots = inputs(2, 11, 8, 40, seed=4)
    cots = tuple(c if i == which else jnp.zeros_like(c) for i, c in enumerate(cots))
    check(dict(chunk_size=4, vocab_block=9), hidden, w, targets, mask, cots, temperature=0.9)


def test_bfloat16_inputs():
    """bfloat16 hidden states and projection: float32 outputs, gradients in the inputs' dtype, equal to the
    plain computation on the same bfloat16 inputs up to bfloat16 rounding of the gradients."""
    hidden, w, targets, mask, cots = inputs(2, 10, 16, 64, seed=5, dtype=jnp.bfloat16)
    check(dict(chunk_size=3, vocab_block=16), hidden, w, targets, mask, cots, temperature=0.8, rtol=1e-2)
    logp, ent = token_logprobs(hidden, w, targets, mask, chunk_size=3, vocab_block=16)
    assert logp.dtype == ent.dtype == jnp.float32
    ref = plain(hidden, w, targets, mask)
    close(logp, ref[0], 1e-5)                 # the logits themselves accumulate in float32
    close(ent, ref[1], 1e-5)


def test_masked_positions_are_zero_with_any_target():
    hidden, w, targets, mask, _ = inputs(2, 7, 8, 30, seed=6)
    bad = jnp.where(mask > 0, targets, -100)   # an ignore index in padding
    logp, ent = token_logprobs(hidden, w, bad, mask, chunk_size=3, vocab_block=8)
    assert np.all(np.asarray(logp)[np.asarray(mask) == 0] == 0)
    assert np.all(np.asarray(ent)[np.asarray(mask) == 0] == 0)
    g = jax.grad(lambda h: jnp.sum(token_logprobs(h, w, bad, mask, chunk_size=3, vocab_block=8)[0]))(hidden)
    assert np.all(np.asarray(g)[np.asarray(mask) == 0] == 0)


def test_vocab_blocks():
    assert lp_lib._vocab_blocks(151936, 2048) == (128, 1187)     # 151,936 = 128 x 1187: no padding
    assert lp_lib._vocab_blocks(120, 16) == (8, 15)
    assert lp_lib._vocab_blocks(97, 10) == (10, 10)             # prime: 3 padding rows
    assert lp_lib._vocab_blocks(97, 1000) == (1, 97)


def test_one_chunk_gradient_holds_one_block_of_logits():
    """All positions in one chunk: neither the value nor the gradient holds the [B, L, V] logits (XLA's
    buffer accounting), and nothing is scattered."""
    B, L, D, V = 2, 256, 32, 4096
    full_bytes = B * L * V * 4  # 8 MiB
    h, w = jax.ShapeDtypeStruct((B, L, D), jnp.float32), jax.ShapeDtypeStruct((V, D), jnp.float32)
    t = jax.ShapeDtypeStruct((B, L), jnp.int32)
    f = lambda h, w, t: jnp.sum(token_logprobs(h, w, t, chunk_size=L, vocab_block=256)[0])
    for fn in (f, jax.grad(f, argnums=(0, 1))):
        analysis = jax.jit(fn).lower(h, w, t).compile().memory_analysis()
        if analysis is None:
            pytest.skip("backend gives no memory analysis")
        assert analysis.temp_size_in_bytes < full_bytes / 4
    jaxpr = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(
        jnp.zeros((B, L, D)), jnp.zeros((V, D)), jnp.zeros((B, L), jnp.int32))
    assert "scatter" not in str(jaxpr)


def _mesh(shape, names):
    if len(jax.devices()) < int(np.prod(shape)):
        pytest.skip(f"needs {int(np.prod(shape))} (simulated) devices")
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:int(np.prod(shape))])


@pytest.mark.parametrize("w_spec", [P(), P("tensor", None)])
def test_sharded_batch_and_vocabulary(w_spec):
    """Rows over 2 data-parallel devices, the projection replicated or its vocabulary over 2 tensor devices:
    the same values and gradients, the outputs still sharded over rows, and the hidden states never
    all-gathered."""
    mesh = _mesh((2, 2), ("data", "tensor"))
    hidden, w, targets, mask, cots = inputs(4, 9, 16, 64, seed=7)
    data, ws = NamedSharding(mesh, P("data")), NamedSharding(mesh, w_spec)

    def scalar(h, w, t, m):
        outs = token_logprobs(h, w, t, m, chunk_size=4, vocab_block=16, temperature=0.8)
        return sum(jnp.sum(o * c) for o, c in zip(outs, cots))

    fn = jax.jit(lambda h, w, t, m: token_logprobs(h, w, t, m, chunk_size=4, vocab_block=16, temperature=0.8),
                 in_shardings=(data, ws, data, data), out_shardings=(data, data))
    grad = jax.jit(jax.grad(scalar, argnums=(0, 1)), in_shardings=(data, ws, data, data), out_shardings=(data, ws))
    args = (jax.device_put(hidden, data), jax.device_put(w, ws), jax.device_put(targets, data),
            jax.device_put(mask, data))
    for a, b in zip(fn(*args), plain(hidden, w, targets, mask, 0.8)):
        close(a, b, 1e-5)
    ref = jax.grad(lambda h, w: sum(jnp.sum(o * c) for o, c in zip(plain(h, w, targets, mask, 0.8), cots)),
                   argnums=(0, 1))(hidden, w)
    for a, b in zip(grad(*args), ref):
        close(a, b, 1e-5)
    for compiled in (fn.lower(*args).compile(), grad.lower(*args).compile()):
        gathers = [line for line in compiled.as_text().splitlines() if " all-gather(" in line]
        assert not any("[4,9,16]" in g or "[4,12,16]" in g for g in gathers), gathers
