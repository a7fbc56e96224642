"""Forward process, posteriors and p(x_{t-1} | x_t) against float64 NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion as d
from unclip_jax.diffusion import gaussian as g

TABLE = d.create_diffusion("cosine", 1000)
ABAR = np.cumprod(1 - d.get_named_beta_schedule("cosine", 1000))
BETAS = d.get_named_beta_schedule("cosine", 1000)


def _data(shape, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.uniform(k1, shape, minval=-1, maxval=1), jax.random.normal(k2, shape)


def _col(v, x):
    return np.asarray(v).reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (5, 16)])
def test_q_sample_and_posterior(shape):
    x0, eps = _data(shape)
    t = jnp.array([0, 1, 500, 999, 250][: shape[0]])
    a = _col(ABAR[t], x0)
    np.testing.assert_allclose(
        g.q_sample(TABLE, x0, t, eps), np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, atol=1e-5
    )
    x_t = g.q_sample(TABLE, x0, t, eps)
    mean, var, logvar = g.q_posterior_mean_variance(TABLE, x0, x_t, t)
    a_prev = _col(np.concatenate([[1.0], ABAR[:-1]])[t], x0)
    b = _col(BETAS[t], x0)
    ref_mean = b * np.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * np.sqrt(1 - b) / (1 - a) * x_t
    np.testing.assert_allclose(mean, ref_mean, atol=2e-5)
    np.testing.assert_allclose(var[..., 0].ravel(), (b * (1 - a_prev) / (1 - a)).ravel(), rtol=2e-5)
    assert logvar.shape[0] == shape[0]


def test_parameterisations_round_trip():
    x0, eps = _data((3, 4, 4, 3))
    t = jnp.array([3, 400, 990])
    x_t = g.q_sample(TABLE, x0, t, eps)
    np.testing.assert_allclose(g.predict_xstart_from_eps(TABLE, x_t, t, eps), x0, atol=2e-4)
    np.testing.assert_allclose(g.predict_eps_from_xstart(TABLE, x_t, t, x0), eps, atol=2e-4)
    v = g.get_v(TABLE, x0, eps, t)
    np.testing.assert_allclose(g.predict_xstart_from_v(TABLE, x_t, t, v), x0, atol=1e-5)


@pytest.mark.parametrize("mean_type", ["epsilon", "start_x", "velocity"])
def test_p_mean_variance_recovers_the_true_posterior(mean_type):
    """Given the true x_0 in any parameterisation, the model mean is q's posterior mean."""
    table = d.create_diffusion("cosine", 1000, mean_type=mean_type)
    x0, eps = _data((3, 6))
    t = jnp.array([1, 300, 800])
    x_t = g.q_sample(table, x0, t, eps)
    target = {"epsilon": eps, "start_x": x0, "velocity": g.get_v(table, x0, eps, t)}[mean_type]
    out = g.p_mean_variance(table, target, x_t, t)
    true_mean, _, true_logvar = g.q_posterior_mean_variance(table, x0, x_t, t)
    np.testing.assert_allclose(out["pred_xstart"], x0, atol=3e-4)
    np.testing.assert_allclose(out["mean"], true_mean, atol=3e-4)
    np.testing.assert_allclose(out["log_variance"], jnp.broadcast_to(true_logvar, x0.shape))


def test_variance_types():
    t = jnp.array([0, 10, 999])
    x = jnp.zeros((3, 2))
    post_log_clipped = np.log(np.asarray(TABLE.posterior_variance)[[1, 10, 999]])
    lr = d.create_diffusion("cosine", var_type="learned_range")
    # v = -1 gives the clipped posterior log-variance, v = +1 gives log beta_t.
    _, lo = g.model_variance(lr, -jnp.ones((3, 2)), x, t)
    _, hi = g.model_variance(lr, jnp.ones((3, 2)), x, t)
    np.testing.assert_allclose(lo[:, 0], post_log_clipped, rtol=1e-5)
    np.testing.assert_allclose(hi[:, 0], np.log(BETAS[[0, 10, 999]]), rtol=1e-5, atol=1e-7)
    large = d.create_diffusion("cosine", var_type="fixed_large")
    _, log_large = g.model_variance(large, None, x, t)
    ref = np.log([float(TABLE.posterior_variance[1]), BETAS[10], BETAS[999]])
    np.testing.assert_allclose(log_large[:, 0], ref, rtol=1e-5, atol=1e-7)
    learned = d.create_diffusion("cosine", var_type="learned")
    var, _ = g.model_variance(learned, jnp.full((3, 2), -3.0), x, t)
    np.testing.assert_allclose(var, np.exp(-3.0), rtol=1e-6)


def test_learned_range_needs_even_channels():
    table = d.create_diffusion("cosine", var_type="learned_range")
    with pytest.raises(ValueError, match="2C channels"):
        g.p_mean_variance(table, jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([1, 2]))


def test_denoised_fn_runs_before_the_clamp():
    seen = {}

    def denoised_fn(x0, t_model, cond):
        seen["max"] = jnp.max(x0)
        seen["t"] = t_model
        return x0 * cond["k"][:, None]

    table = d.create_diffusion("cosine", timestep_respacing="ddim10")
    x_t = jnp.full((2, 3), 5.0)
    out = g.p_mean_variance(
        table,
        jnp.zeros((2, 3)),
        x_t,
        jnp.array([9, 9]),
        cond={"k": jnp.array([0.1, 1.0])},
        clip_denoised=True,
        denoised_fn=denoised_fn,
    )
    assert float(seen["max"]) > 1.0  # the hook saw the unclamped x0
    np.testing.assert_array_equal(seen["t"], [900, 900])  # original-chain timesteps
    x0_raw = float(5.0 * table.sqrt_recip_alphas_cumprod[9])
    np.testing.assert_allclose(out["pred_xstart"][0], min(0.1 * x0_raw, 1.0), rtol=1e-5)
    np.testing.assert_allclose(out["pred_xstart"][1], 1.0)
