"""Exact denoisers for Gaussian data, the closed-form oracle of the sampler tests.

Data x_0 ~ N(mu, s^2 I), mu per example (from cond["mu"]). Under q, x_t ~ N(a mu, a^2 s^2 + sigma^2)
with a = sqrt(abar_t), sigma = sqrt(1 - abar_t), and E[x_0 | x_t] = mu + a s^2 / (a^2 s^2 + sigma^2)
(x_t - a mu). The probability-flow ODE keeps z = (x_t - a mu) / sqrt(a^2 s^2 + sigma^2) constant, so
a deterministic sampler started at x_T must return mu + a_0 s^2 z / sqrt(a_0^2 s^2 + sigma_0^2).
"""

import jax.numpy as jnp
import numpy as np

DATA_STD = 0.5


def _coefs(abar_full, t, x):
    abar = jnp.take(abar_full, t).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def _mu(cond, x):
    return cond["mu"].reshape((-1,) + (1,) * (x.ndim - 1))


def posterior_x0(abar_full, x, t, mu, std=DATA_STD):
    a, sig = _coefs(abar_full, t, x)
    return mu + a * std**2 / (a * a * std**2 + sig**2) * (x - a * mu)


def eps_model(params, x, t, cond):
    """An eps-predicting model_fn; params = {"abar": the original chain's alphas_cumprod}."""
    a, sig = _coefs(params["abar"], t, x)
    return (x - a * posterior_x0(params["abar"], x, t, _mu(cond, x))) / sig


def x0_model(params, x, t, cond):
    return posterior_x0(params["abar"], x, t, _mu(cond, x))


def v_model(params, x, t, cond):
    a, sig = _coefs(params["abar"], t, x)
    x0 = posterior_x0(params["abar"], x, t, _mu(cond, x))
    return (a * x - x0) / sig  # v = a eps - sig x0 = (a x - x0) / sig


def learned_range_eps_model(params, x, t, cond):
    """An eps oracle with a learned-range output: variance channels = cond["v"] broadcast."""
    eps = eps_model(params, x, t, cond)
    v = jnp.broadcast_to(cond["v"].reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
    return jnp.concatenate([eps, v], axis=-1)


def exact_ode_endpoint(table, x_T, mu, std=DATA_STD):
    """What a perfect deterministic sampler over `table` returns from x_T (float64 NumPy)."""
    abar = np.asarray(table.alphas_cumprod, np.float64)
    a_T, a_0 = np.sqrt(abar[-1]), np.sqrt(abar[0])
    x_T = np.asarray(x_T, np.float64)
    z = (x_T - a_T * mu) / np.sqrt(a_T**2 * std**2 + 1 - abar[-1])
    return mu + a_0 * std**2 * z / np.sqrt(a_0**2 * std**2 + 1 - abar[0])
