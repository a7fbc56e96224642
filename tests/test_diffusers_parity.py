"""Parity with diffusers' schedulers, from fixtures made by fixtures/make_diffusion_fixtures.py.

No torch here: the fixture holds diffusers' numbers (float32) and the inputs that produced them.
"""

import pathlib

import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion as d
from unclip_jax.diffusion import gaussian as g

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "diffusion_parity.npz")
PARAMS = {"abar": d.create_diffusion("cosine", 1000).alphas_cumprod}


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.mark.parametrize("ours,theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_alphas_cumprod(ours, theirs):
    table = d.create_diffusion(ours, 1000)
    # diffusers accumulates the product in float32 (1e-5 relative by t = 999); ours in float64.
    np.testing.assert_allclose(table.alphas_cumprod, FIXTURE[f"alphas_cumprod_{theirs}"], rtol=2e-5)


@pytest.mark.parametrize(
    "name,mean_type,var_type,clip",
    [("unclip_prior", "start_x", "fixed_small", 5.0),
     ("unclip_decoder", "epsilon", "learned_range", 1.0)],
)  # fmt: skip
def test_unclip_scheduler_steps(name, mean_type, var_type, clip):
    """One ancestral step on the 25-step respaced chain equals UnCLIPScheduler.step."""
    table = d.create_diffusion("cosine", 1000, timestep_respacing="25", mean_type=mean_type,
                               var_type=var_type)  # fmt: skip
    np.testing.assert_array_equal(np.sort(FIXTURE[f"{name}_timesteps"]), table.timestep_map)
    get = lambda key: FIXTURE[f"{name}_{key}"]  # noqa: E731
    for k, t_orig in enumerate(get("t")):
        i = int(np.searchsorted(np.asarray(table.timestep_map), t_orig))
        t = jnp.full((2,), i)
        out = g.p_mean_variance(table, nhwc(get("model_output")[k]), nhwc(get("sample")[k]), t,
                                clip_denoised=True, clip_range=clip)  # fmt: skip
        prev = out["mean"] + (i > 0) * jnp.exp(0.5 * out["log_variance"]) * nhwc(get("noise")[k])
        # At t = 999, x0 = x / sqrt(abar) amplifies diffusers' float32 cumprod error 2e4 times.
        np.testing.assert_allclose(out["pred_xstart"], nhwc(get("x0")[k]), atol=1e-4, rtol=1e-4)
        if i == 0:
            # The last step returns x0. diffusers' coefficient beta_0 / (1 - abar_0) is 1 only up to
            # float32 cancellation in 1 - abar_0 (1.4e-3 relative); ours is 1 to float32 precision.
            np.testing.assert_allclose(prev, out["pred_xstart"], rtol=1e-6)
            np.testing.assert_allclose(prev, nhwc(get("prev_sample")[k]), rtol=2e-3, atol=1e-5)
        else:
            np.testing.assert_allclose(prev, nhwc(get("prev_sample")[k]), atol=1e-4, rtol=1e-4)


def shrunk_eps_model(params, x, t, cond):
    """0.7 x the oracle's eps: x0 overshoots, so the clamp (and eps re-derivation) matters."""
    return 0.7 * oracle.eps_model(params, x, t, cond)


def test_ddim_loop_matches_ddim_scheduler():
    table = d.create_diffusion("cosine", 1000, timestep_respacing="ddim50")
    np.testing.assert_array_equal(table.timestep_map[::-1], FIXTURE["ddim50_timesteps"])
    x_T = jnp.asarray(FIXTURE["loop_x_T"])
    cond = {"mu": jnp.full((x_T.shape[0],), 0.3)}
    x = d.ddim_sample_loop(shrunk_eps_model, table, PARAMS, x_T, jax.random.key(0), cond)
    np.testing.assert_allclose(x, FIXTURE["ddim50_x0"], atol=1e-4)


def test_dpm_solver_matches_dpm_solver_multistep_scheduler():
    """dpmsolver++ order 2 over diffusers' own 10 timesteps; its last step jumps to sigma = 0."""
    table = d.create_diffusion("cosine", 1000, use_timesteps=FIXTURE["dpm10_timesteps"])
    x_T = jnp.asarray(FIXTURE["loop_x_T"])
    cond = {"mu": jnp.full((x_T.shape[0],), 0.3)}
    x = d.dpm_solver_pp_2m_loop(
        oracle.eps_model, table, PARAMS, x_T, cond, clip_denoised=False, lower_order_final=False
    )
    # diffusers evaluates sigma = sqrt((1 - abar) / abar) from its float32 cumprod (1e-5 relative
    # error by t = 999); the solver carries it to ~4e-4. A wrong update order is off by 0.08.
    np.testing.assert_allclose(x, FIXTURE["dpm10_x0"], atol=1e-3)
    assert float(np.mean(np.abs(np.asarray(x) - FIXTURE["dpm10_x0"]))) < 2e-4
