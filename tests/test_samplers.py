"""Samplers against the exact Gaussian-data oracle (closed forms in gaussian_oracle.py)."""

import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion as d

FULL = d.create_diffusion("cosine", 1000)
PARAMS = {"abar": FULL.alphas_cumprod}
MU, STD = 0.3, oracle.DATA_STD
B = 512


def cond_for(batch, mu=MU):
    return {"mu": jnp.full((batch,), mu, jnp.float32)}


def x_T(batch=B, dims=4, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, dims))


def table(respacing, **kw):
    return d.create_diffusion("cosine", 1000, timestep_respacing=respacing, **kw)


def ddim(tab, noise, model=oracle.eps_model, rng=1, **kw):
    kw.setdefault("clip_denoised", False)
    return d.ddim_sample_loop(
        model, tab, PARAMS, noise, jax.random.key(rng), cond_for(len(noise)), **kw
    )


def max_err(x, ref):
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)))


def test_ddim_follows_the_exact_ode_at_first_order():
    noise = x_T()
    errs = {}
    for r in ("ddim50", "ddim250"):
        tab = table(r)
        errs[r] = max_err(ddim(tab, noise), oracle.exact_ode_endpoint(tab, noise, MU))
    assert errs["ddim250"] < 0.02
    assert 3.0 < errs["ddim50"] / errs["ddim250"] < 7.0  # 5x the steps, ~5x less error


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    tab, noise = table("ddim25"), x_T()
    np.testing.assert_array_equal(ddim(tab, noise, rng=1), ddim(tab, noise, rng=2))
    a, b = ddim(tab, noise, rng=1, eta=1.0), ddim(tab, noise, rng=2, eta=1.0)
    assert float(jnp.abs(a - b).mean()) > 0.05


@pytest.mark.parametrize(
    "model,mean_type", [(oracle.x0_model, "start_x"), (oracle.v_model, "velocity")]
)
def test_parameterisations_sample_alike(model, mean_type):
    noise = x_T()
    ref = ddim(table("ddim25"), noise)
    np.testing.assert_allclose(
        ddim(table("ddim25", mean_type=mean_type), noise, model=model), ref, atol=2e-4
    )


def test_ddpm_samples_the_data_distribution():
    noise = x_T(2048, 8)
    x = d.p_sample_loop(
        oracle.eps_model,
        FULL,
        PARAMS,
        noise,
        jax.random.key(3),
        cond_for(2048),
        clip_denoised=False,
    )
    # 16384 draws: the standard error of the mean is 0.004, of the std ~0.003.
    assert float(x.mean()) == pytest.approx(MU, abs=0.015)
    assert float(x.std()) == pytest.approx(STD, abs=0.015)
    # Respaced ancestral sampling keeps the mean (fixed-small variance narrows the spread slightly).
    x100 = d.p_sample_loop(
        oracle.eps_model,
        table("100"),
        PARAMS,
        noise,
        jax.random.key(3),
        cond_for(2048),
        clip_denoised=False,
    )
    assert float(x100.mean()) == pytest.approx(MU, abs=0.015)
    assert 0.45 < float(x100.std()) < 0.51


def test_dpm_solver_pp_2m_20_steps():
    """DPM-Solver++(2M) with 20 steps: within 5e-3 of the exact ODE, within 0.03 of DDIM-250.

    The 0.03 is DDIM-250's own first-order error on the extreme draws (~0.025 here).
    """
    noise = x_T()
    tab20 = table("ddim20")
    x = d.dpm_solver_pp_2m_loop(
        oracle.eps_model, tab20, PARAMS, noise, cond_for(B), clip_denoised=False
    )
    exact = oracle.exact_ode_endpoint(tab20, noise, MU)
    assert max_err(x, exact) < 5e-3
    ref = np.asarray(ddim(table("ddim250"), noise))
    assert max_err(x, ref) < 0.03
    assert float(np.mean(np.abs(np.asarray(x) - ref))) < 0.015
    assert max_err(x, exact) < 0.1 * max_err(ddim(tab20, noise), exact)  # beats DDIM at 20 steps


def test_ddim_inversion_round_trip():
    x0 = MU + STD * jax.random.normal(jax.random.key(4), (B, 4))
    tab = table("ddim50")
    kw = dict(clip_denoised=False)
    z = d.ddim_reverse_sample_loop(oracle.eps_model, tab, PARAMS, x0, cond_for(B), **kw)
    assert float(z.std()) == pytest.approx(1.0, abs=0.05)  # a latent, not the image
    plain = max_err(ddim(tab, z), np.asarray(x0))
    z_fp = d.ddim_reverse_sample_loop(
        oracle.eps_model, tab, PARAMS, x0, cond_for(B), fixed_point_iters=3, **kw
    )
    refined = max_err(ddim(tab, z_fp), np.asarray(x0))
    assert plain < 0.1
    assert refined < 1e-3


def test_classifier_guidance_shifts_to_the_tilted_distribution():
    """grad log p(y | x_t) that turns N(mu, s^2) into N(mu2, s^2) at every noise level."""
    mu2 = -0.4
    abar_full = np.asarray(FULL.alphas_cumprod)

    def cond_fn(x, t_model, cond):
        abar = jnp.take(jnp.asarray(abar_full), t_model)[:, None]
        a = jnp.sqrt(abar)
        return a * (mu2 - cond["mu"][:, None]) / (abar * STD**2 + 1 - abar)

    noise = x_T()
    tab = table("ddim50")
    # condition_score turns eps into the mu2 oracle's eps exactly: DDIM must follow the mu2 path.
    x = ddim(tab, noise, cond_fn=cond_fn)
    mu2_path = d.ddim_sample_loop(
        oracle.eps_model,
        tab,
        PARAMS,
        noise,
        jax.random.key(0),
        cond_for(B, mu2),
        clip_denoised=False,
    )
    np.testing.assert_allclose(x, mu2_path, atol=1e-4)
    assert max_err(x, oracle.exact_ode_endpoint(tab, noise, MU)) > 0.5
    xa = d.p_sample_loop(
        oracle.eps_model,
        FULL,
        PARAMS,
        x_T(2048),
        jax.random.key(5),
        cond_for(2048),
        clip_denoised=False,
        cond_fn=cond_fn,
    )
    assert float(xa.mean()) == pytest.approx(mu2, abs=0.03)


def test_clip_denoised_bounds_the_samples():
    noise = 3.0 * x_T()
    x = d.ddim_sample_loop(
        oracle.eps_model,
        table("ddim10"),
        PARAMS,
        noise,
        jax.random.key(0),
        cond_for(B, 0.9),
        clip_range=0.5,
    )
    assert float(jnp.abs(x).max()) <= 0.5 + 1e-6
