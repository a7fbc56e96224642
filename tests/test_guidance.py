"""Classifier-free guidance: limits, learned variance, one compilation, per-example scales."""

import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion as d

FULL = d.create_diffusion("cosine", 1000)
PARAMS = {"abar": FULL.alphas_cumprod}
B = 64
MU_C, MU_U = 0.5, -0.2


def conds(batch=B):
    return (
        {"mu": jnp.full((batch,), MU_C, jnp.float32)},
        {"mu": jnp.full((batch,), MU_U, jnp.float32)},
    )


def noise(batch=B):
    return jax.random.normal(jax.random.key(0), (batch, 3))


@pytest.mark.parametrize(
    "model,mean_type", [(oracle.eps_model, "epsilon"), (oracle.x0_model, "start_x")]
)
def test_scale_one_is_conditional_and_zero_is_unconditional(model, mean_type):
    tab = d.create_diffusion("cosine", timestep_respacing="ddim20", mean_type=mean_type)
    cond, null = conds()
    rng = jax.random.key(1)

    def run(c, **kw):
        return d.ddim_sample_loop(model, tab, PARAMS, noise(), rng, c, clip_denoised=False, **kw)

    guided1 = run(cond, null_cond=null, guidance_scale=jnp.ones(B))
    guided0 = run(cond, null_cond=null, guidance_scale=jnp.zeros(B))
    np.testing.assert_allclose(guided1, run(cond), atol=1e-5)
    np.testing.assert_allclose(guided0, run(null), atol=1e-5)
    assert float(jnp.abs(guided1 - guided0).mean()) > 0.3


def test_guided_eps_of_gaussians_is_the_extrapolated_gaussian():
    """eps is linear in mu: scale s gives the oracle of mu_u + s (mu_c - mu_u), in closed form."""
    tab = d.create_diffusion("cosine", timestep_respacing="ddim50")
    cond, null = conds()
    s = 3.0
    x = d.ddim_sample_loop(
        oracle.eps_model,
        tab,
        PARAMS,
        noise(),
        jax.random.key(0),
        cond,
        null_cond=null,
        guidance_scale=s,
        clip_denoised=False,
    )
    plain = d.ddim_sample_loop(
        oracle.eps_model,
        tab,
        PARAMS,
        noise(),
        jax.random.key(0),
        {"mu": jnp.full((B,), MU_U + s * (MU_C - MU_U))},
        clip_denoised=False,
    )
    np.testing.assert_allclose(x, plain, atol=1e-4)


def test_learned_variance_comes_from_the_conditional_branch():
    tab = d.create_diffusion("cosine", var_type="learned_range")
    x = noise(4)
    cond = {"mu": jnp.full((4,), MU_C), "v": jnp.array([0.1, 0.2, 0.3, 0.4])}
    null = {"mu": jnp.full((4,), MU_U), "v": jnp.full((4,), -0.9)}
    t = jnp.array([5, 50, 500, 900])
    out = d.model_output(
        oracle.learned_range_eps_model,
        tab,
        PARAMS,
        x,
        t,
        cond,
        null,
        jnp.array([0.0, 1.0, 2.0, 7.5]),
    )
    eps, v = jnp.split(out, 2, axis=-1)
    np.testing.assert_allclose(v, jnp.broadcast_to(cond["v"][:, None], (4, 3)))
    eps_c = oracle.eps_model(PARAMS, x, t, cond)
    eps_u = oracle.eps_model(PARAMS, x, t, null)
    np.testing.assert_allclose(
        eps,
        eps_u + jnp.array([0.0, 1.0, 2.0, 7.5])[:, None] * (eps_c - eps_u),
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_sweep_over_eight_scales_compiles_once():
    traces = []

    def counting_model(params, x, t, cond):  # a fresh function: its own jit cache entries
        traces.append(x.shape)
        return oracle.eps_model(params, x, t, cond)

    tab = d.create_diffusion("cosine", timestep_respacing="ddim10")
    cond, null = conds()
    outs = []
    for s in [0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]:
        scale = jnp.full((B,), s, jnp.float32)
        outs.append(
            d.ddim_sample_loop(
                counting_model,
                tab,
                PARAMS,
                noise(),
                jax.random.key(0),
                cond,
                null_cond=null,
                guidance_scale=scale,
                clip_denoised=False,
            )
        )
    assert traces == [(2 * B, 3)]  # traced (and so compiled) once, on the 2B batch
    assert len({round(float(o.mean()), 4) for o in outs}) == 8


def test_per_example_scales_equal_separate_runs():
    tab = d.create_diffusion("cosine", timestep_respacing="ddim10")
    cond, null = conds()
    scales = jnp.tile(jnp.array([0.0, 1.0, 3.0, 7.0]), B // 4)
    kw = dict(null_cond=null, clip_denoised=False)
    mixed = d.p_sample_loop(
        oracle.eps_model, tab, PARAMS, noise(), jax.random.key(2), cond, guidance_scale=scales, **kw
    )
    for s in [0.0, 1.0, 3.0, 7.0]:
        alone = d.p_sample_loop(
            oracle.eps_model,
            tab,
            PARAMS,
            noise(),
            jax.random.key(2),
            cond,
            guidance_scale=jnp.full((B,), s),
            **kw,
        )
        rows = np.asarray(scales) == s
        np.testing.assert_allclose(mixed[rows], alone[rows], atol=1e-5)


def test_bad_guidance_inputs_are_named():
    tab = d.create_diffusion("cosine", timestep_respacing="ddim10")
    cond, null = conds()
    with pytest.raises(ValueError, match="guidance_scale"):
        d.model_output(oracle.eps_model, tab, PARAMS, noise(), jnp.zeros(B, jnp.int32), cond, null)
    with pytest.raises(ValueError, match=r"null_cond\['mu'\] has shape \(3,\)"):
        d.model_output(
            oracle.eps_model,
            tab,
            PARAMS,
            noise(),
            jnp.zeros(B, jnp.int32),
            cond,
            {"mu": jnp.zeros(3)},
            2.0,
        )
    with pytest.raises(ValueError, match="same tree structure"):
        d.model_output(
            oracle.eps_model,
            tab,
            PARAMS,
            noise(),
            jnp.zeros(B, jnp.int32),
            cond,
            {"nu": jnp.zeros(B)},
            2.0,
        )
