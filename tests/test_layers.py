"""Fast paths of the shared layers against closed forms: GroupNorm and both attention paths."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models.layers import GroupNorm32, attention


def _np_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D)) v per batch and head in float64, masked keys excluded."""
    logits = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknd->bqnd", weights, v)


def _qkv(rng, b=2, lq=256, lk=300, n=3, d=8):
    q, k, v = (rng.standard_normal((b, length, n, d)) for length in (lq, lk, lk))
    mask = rng.random((b, lk)) > 0.3
    mask[:, -1] = True
    return q, k, v, mask


@pytest.mark.parametrize("implementation", ["dense", "blocked"])
def test_attention_matches_closed_form(implementation):
    q, k, v, mask = _qkv(np.random.default_rng(0))
    want = _np_attention(q, k, v, mask)
    got = attention(
        *(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
        jnp.asarray(mask),
        implementation=implementation,
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=2e-5)
    # A masked key must not matter: changing its value leaves the output unchanged.
    v2 = np.where(mask[:, :, None, None], v, 1e3)
    again = attention(
        *(jnp.asarray(a, jnp.float32) for a in (q, k, v2)),
        jnp.asarray(mask),
        implementation=implementation,
    )
    np.testing.assert_allclose(np.asarray(again), np.asarray(got), atol=1e-6)


def test_blocked_attention_gradients_match_dense():
    q, k, v, mask = (jnp.asarray(a) for a in _qkv(np.random.default_rng(1), lq=128, lk=140))
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    weights = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention(q, k, v, mask, implementation=impl) * weights)

    dense = jax.grad(loss("dense"), argnums=(0, 1, 2))(q, k, v)
    blocked = jax.grad(loss("blocked"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(dense, blocked, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(q, k, v, mask, implementation="flash")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_matches_flax_and_closed_form(dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 6, 5, 64)) * 3 + 2).astype(np.float32)
    scale, bias = rng.standard_normal(64), rng.standard_normal(64)
    params = {
        "params": {
            "norm": {
                "scale": jnp.asarray(scale, jnp.float32),
                "bias": jnp.asarray(bias, jnp.float32),
            }
        }
    }
    ours = GroupNorm32().apply(params, jnp.asarray(x, dtype))
    assert ours.dtype == dtype
    groups = x.astype(np.float64).reshape(2, 30, 32, 2)
    mean, var = groups.mean((1, 3), keepdims=True), groups.var((1, 3), keepdims=True)
    want = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
    tol = 2e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(ours, np.float32), want, atol=tol, rtol=tol)
    flax_norm = nn.GroupNorm(num_groups=32, epsilon=1e-5)
    reference = flax_norm.apply({"params": params["params"]["norm"]}, jnp.asarray(x))
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=2e-5)
    with pytest.raises(ValueError, match="do not split into 32 groups"):
        GroupNorm32().init(jax.random.key(0), jnp.zeros((1, 2, 2, 48)))
