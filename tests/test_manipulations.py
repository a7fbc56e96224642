"""unCLIP manipulations: slerp, text-diff paths, and a stage's inversion round trip."""

import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unclip_jax.pipelines import manipulations as m
from unclip_jax.pipelines.stage import DiffusionStage


def unit(rng, shape):
    return np.asarray(m.normalize(jax.random.normal(jax.random.key(rng), shape)))


def test_slerp_endpoints_and_norms():
    a, b = unit(0, (5, 16)), unit(1, (5, 16))
    np.testing.assert_allclose(m.slerp(a, b, 0.0), a, atol=1e-6)
    np.testing.assert_allclose(m.slerp(a, b, 1.0), b, atol=1e-6)
    thetas = jnp.linspace(0, 1, 5)
    mid = m.slerp(a, b, thetas)  # one theta per example
    np.testing.assert_allclose(np.linalg.norm(mid, axis=-1), 1.0, atol=1e-5)
    # The angle to a grows linearly with theta (constant angular speed).
    omega = np.arccos(np.sum(a * b, -1))
    angle = np.arccos(np.clip(np.sum(np.asarray(mid) * a, -1), -1, 1))
    np.testing.assert_allclose(angle, np.asarray(thetas) * omega, atol=2e-3)


def test_slerp_is_per_vector_not_per_element():
    # Element-wise angles (diffusers' community pipeline) would not keep this norm.
    a = np.array([[1.0, 0.0, 0.0, 0.0]])
    b = np.array([[0.0, 0.6, 0.8, 0.0]])
    np.testing.assert_allclose(np.linalg.norm(m.slerp(a, b, 0.3)), 1.0, atol=1e-6)
    # Parallel vectors: linear interpolation, no NaN.
    np.testing.assert_allclose(m.slerp(a, 2 * a, 0.5), 1.5 * a, atol=1e-6)
    # Images: the angle is that of the whole flattened example.
    x, y = np.ones((2, 4, 4, 3)), -np.ones((2, 4, 4, 3)) + 0.1
    assert m.slerp(x, y, 0.5).shape == x.shape
    with pytest.raises(ValueError, match="equal shapes"):
        m.slerp(a, np.ones((1, 3)), 0.5)


def test_text_diff_path():
    z_i = 3.0 * unit(2, (8,))
    d = m.text_diff_direction(unit(3, (8,)), unit(4, (8,)))
    np.testing.assert_allclose(np.linalg.norm(d), 1.0, atol=1e-6)
    path = m.text_diff_path(z_i, d, jnp.array([0.0, 0.25, 0.5]))
    np.testing.assert_allclose(path[0], z_i, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(path, axis=-1), 3.0, atol=1e-4)
    # Moving along the path approaches the direction monotonically.
    cos = np.asarray(path @ d) / 3.0
    assert cos[0] < cos[1] < cos[2]
    with pytest.raises(ValueError, match="thetas"):
        m.text_diff_path(z_i, d, jnp.array([0.0, 1.5]))


def test_stage_inversion_then_ddim_eta0_reconstructs():
    cfg = ml_collections.ConfigDict(
        dict(
            schedule="cosine",
            num_timesteps=1000,
            mean_type="epsilon",
            var_type="fixed_small",
            loss_type="mse",
        )  # fmt: skip
    )
    stage = DiffusionStage(oracle.eps_model, None, cfg, (6,), clip_denoised=False)
    stage.params = {"abar": stage.table(None).alphas_cumprod}
    batch = 4
    cond = {"mu": jnp.full((batch,), 0.3)}
    x0 = 0.3 + oracle.DATA_STD * jax.random.normal(jax.random.key(5), (batch, 6))
    x_T = stage.invert(x0, cond, respacing="ddim50", fixed_point_iters=3)
    back = stage.sample(cond, jax.random.key(6), batch=batch, respacing="ddim50", sampler="ddim",
                        x_T=x_T, eta=0.0)  # fmt: skip
    err = float(jnp.max(jnp.abs(back - x0)))
    assert err < 5e-3, err
    # eta > 0 varies the reconstruction.
    varied = stage.sample(cond, jax.random.key(6), batch=batch, respacing="ddim50", sampler="ddim",
                          x_T=x_T, eta=1.0)  # fmt: skip
    assert float(jnp.max(jnp.abs(varied - x0))) > 10 * err
    with pytest.raises(ValueError, match="x_T has shape"):
        stage.sample(cond, jax.random.key(6), batch=batch, respacing="ddim50", x_T=x_T[:, :3])
