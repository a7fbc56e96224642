"""Loss terms against NumPy references and closed-form properties (SPEC 1.3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion as d
from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion import losses


def np_cdf(x):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_discretized_loglik(x, mean, log_scale):
    inv = np.exp(-log_scale)
    plus, minus = np_cdf(inv * (x - mean + 1 / 255)), np_cdf(inv * (x - mean - 1 / 255))
    out = np.log(np.maximum(plus - minus, 1e-12))
    out = np.where(x < -0.999, np.log(np.maximum(plus, 1e-12)), out)
    return np.where(x > 0.999, np.log(np.maximum(1 - minus, 1e-12)), out)


def np_normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def test_normal_kl_closed_form():
    # KL(N(0,1) || N(1, e^2)) = 0.5 * (-1 + 2 + e^-2 + e^-2)
    assert float(d.normal_kl(0.0, 0.0, 1.0, 2.0)) == pytest.approx(0.5 * (1 + 2 * math.exp(-2)))
    assert float(d.normal_kl(0.3, -1.0, 0.3, -1.0)) == 0.0


def test_discretized_likelihood_matches_numpy_and_normalises():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(4, 256)) / 127.5 - 1
    means = rng.normal(size=(4, 256)) * 0.5
    log_scales = rng.uniform(-6, 0, size=(4, 256))
    ours = d.discretized_gaussian_log_likelihood(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(means, jnp.float32),
        jnp.asarray(log_scales, jnp.float32),
    )
    # Where p > e^-8 float32 resolves CDF(+) - CDF(-) well; deeper tails are rounding noise (in
    # the float32 reference code too) down to the 1e-12 clamp.
    ref64 = np_discretized_loglik(x, means, log_scales)
    likely = ref64 > -8
    assert likely.sum() > 100
    np.testing.assert_allclose(np.asarray(ours)[likely], ref64[likely], rtol=1e-3, atol=1e-3)
    assert float(jnp.min(ours)) >= np.log(1e-12) - 1e-4
    # The 256 bins of one pixel carry the whole probability mass.
    bins = jnp.asarray(np.arange(256) / 127.5 - 1, jnp.float32)
    for mean, log_scale in [(0.1, -2.0), (-0.97, -4.0), (0.4, 0.5)]:
        p = jnp.exp(
            d.discretized_gaussian_log_likelihood(
                bins, jnp.full(256, mean), jnp.full(256, log_scale)
            )
        )
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-4)


def test_discretized_likelihood_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        d.discretized_gaussian_log_likelihood(jnp.zeros(3), jnp.zeros(3), jnp.zeros(2))


def np_vb(table, model_output, x0, x_t, t):
    """guided-diffusion's _vb_terms_bpd for a learned-range eps model, in float64."""
    T = lambda name: np.asarray(getattr(table, name), np.float64)[t][:, None]  # noqa: E731
    eps, v = np.split(model_output, 2, axis=-1)
    c1, c2 = T("posterior_mean_coef1"), T("posterior_mean_coef2")
    true_mean, true_lv = c1 * x0 + c2 * x_t, T("posterior_log_variance_clipped")
    frac = (v + 1) / 2
    lv = frac * np.log(T("betas")) + (1 - frac) * true_lv
    pred_x0 = T("sqrt_recip_alphas_cumprod") * x_t - T("sqrt_recipm1_alphas_cumprod") * eps
    mean = c1 * pred_x0 + c2 * x_t
    kl = np_normal_kl(true_mean, true_lv, mean, lv).mean(-1) / np.log(2)
    nll = -np_discretized_loglik(x0, mean, 0.5 * lv).mean(-1) / np.log(2)
    return np.where(t == 0, nll, kl)


def test_vb_terms_match_numpy():
    table = d.create_diffusion("cosine", 1000, var_type="learned_range")
    rng = np.random.default_rng(1)
    t = np.array([0, 0, 1, 37, 500, 999])
    x0 = rng.integers(0, 256, size=(6, 12)) / 127.5 - 1
    x_t = np.asarray(
        g.q_sample(
            table,
            jnp.asarray(x0, jnp.float32),
            jnp.asarray(t),
            jnp.asarray(rng.normal(size=(6, 12)), jnp.float32),
        ),
        np.float64,
    )
    out = np.concatenate([rng.normal(size=(6, 12)), rng.uniform(-1, 1, size=(6, 12))], -1)
    ours = d.vb_terms_bpd(
        table,
        jnp.asarray(out, jnp.float32),
        jnp.asarray(x0, jnp.float32),
        jnp.asarray(x_t, jnp.float32),
        jnp.asarray(t),
    )
    np.testing.assert_allclose(ours, np_vb(table, out, x0, x_t, t), rtol=2e-3, atol=1e-4)


def _noise_oracle(noise):
    """A 'model' that returns the true noise (closes over it, as a loss function would)."""
    return lambda x_t, t: noise


@pytest.mark.parametrize("mean_type", ["epsilon", "start_x", "velocity"])
def test_mse_is_zero_for_the_true_target(mean_type):
    table = d.create_diffusion("cosine", 1000, mean_type=mean_type)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(k1, (4, 8, 8, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 10, 500, 999])
    target = {"epsilon": noise, "start_x": x0, "velocity": g.get_v(table, x0, noise, t)}[mean_type]
    terms = d.training_losses(table, lambda x_t, tm: target, x0, t, noise)
    np.testing.assert_allclose(terms["mse"], 0.0, atol=1e-10)
    wrong = d.training_losses(table, lambda x_t, tm: target + 0.5, x0, t, noise)
    np.testing.assert_allclose(wrong["mse"], 0.25, rtol=1e-5)
    assert "vb" not in terms and float(terms["nonfinite"].sum()) == 0


def test_hybrid_loss_vb_trains_only_the_variance():
    """d(vb)/d(mean output) = 0 through the stop-gradient; the VB term still sees the variance."""
    table = d.create_diffusion("cosine", 1000, var_type="learned_range", loss_type="rescaled_mse")
    k1, k2 = jax.random.split(jax.random.key(1))
    x0 = jax.random.uniform(k1, (3, 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 100, 700])

    def vb_of(params):
        fn = lambda x_t, tm: jnp.concatenate([params["m"] * x_t, params["v"] * x_t], -1)  # noqa: E731
        return jnp.sum(d.training_losses(table, fn, x0, t, noise)["vb"])

    grads = jax.grad(vb_of)({"m": 0.3, "v": 0.2})
    assert float(grads["m"]) == 0.0 and abs(float(grads["v"])) > 0
    terms = d.training_losses(
        table, lambda x_t, tm: jnp.concatenate([noise, 0 * noise], -1), x0, t, noise
    )
    np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)


def test_rescaled_mse_scales_vb_by_T_over_1000():
    kw = dict(var_type="learned_range")
    plain = d.create_diffusion("cosine", 100, loss_type="mse", **kw)
    rescaled = d.create_diffusion("cosine", 100, loss_type="rescaled_mse", **kw)
    x0 = jax.random.uniform(jax.random.key(2), (2, 6), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(3), x0.shape)
    t = jnp.array([5, 60])
    fn = lambda x_t, tm: jnp.concatenate([0.9 * noise, 0.1 * x_t], -1)  # noqa: E731
    a = d.training_losses(plain, fn, x0, t, noise)["vb"]
    b = d.training_losses(rescaled, fn, x0, t, noise)["vb"]
    np.testing.assert_allclose(b, a * 0.1, rtol=1e-6)
    kl = d.training_losses(
        d.create_diffusion("cosine", 100, loss_type="rescaled_kl", **kw), fn, x0, t, noise
    )
    np.testing.assert_allclose(kl["loss"], a * 100, rtol=1e-5)


def test_min_snr_weights():
    t = jnp.array([0, 500, 999])
    for mean_type, f in [
        ("epsilon", lambda s: np.minimum(s, 5) / s),
        ("start_x", lambda s: np.minimum(s, 5)),
        ("velocity", lambda s: np.minimum(s, 5) / (s + 1)),
    ]:
        table = d.create_diffusion("cosine", 1000, mean_type=mean_type)
        abar = np.asarray(table.alphas_cumprod, np.float64)[np.asarray(t)]
        np.testing.assert_allclose(d.min_snr_weight(table, t, 5.0), f(abar / (1 - abar)), rtol=1e-4)


def test_nonfinite_examples_are_flagged_and_shapes_checked():
    table = d.create_diffusion("cosine", 1000)
    x0 = jnp.zeros((3, 4)).at[1, 0].set(jnp.nan)
    terms = d.training_losses(
        table, lambda x_t, tm: x_t, x0, jnp.array([1, 2, 3]), jnp.zeros((3, 4))
    )
    np.testing.assert_array_equal(terms["nonfinite"], [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="does not fit"):
        d.training_losses(
            table,
            lambda x_t, tm: x_t[:, :2],
            jnp.zeros((3, 4)),
            jnp.array([1, 2, 3]),
            jnp.zeros((3, 4)),
        )
    with pytest.raises(ValueError, match="differ in shape"):
        d.training_losses(
            table, lambda x_t, tm: x_t, jnp.zeros((3, 4)), jnp.array([1, 2, 3]), jnp.zeros((3, 5))
        )


def test_sample_timesteps_is_uniform_over_the_chain():
    table = d.create_diffusion("cosine", 10)
    t = np.asarray(losses.sample_timesteps(jax.random.key(0), 20000, table))
    assert t.min() == 0 and t.max() == 9
    np.testing.assert_allclose(np.bincount(t) / len(t), 0.1, atol=0.01)
