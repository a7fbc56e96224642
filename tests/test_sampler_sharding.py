"""Samplers sharded along the batch over the 8 fake devices equal the single-device result."""

import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax import diffusion as d

FULL = d.create_diffusion("cosine", 1000)
PARAMS = {"abar": FULL.alphas_cumprod}
B = 32


def test_sharded_samplers_equal_single_device():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    batch = NamedSharding(mesh, P("data"))
    tab = d.create_diffusion("cosine", timestep_respacing="ddim20")
    x_T = jax.random.normal(jax.random.key(0), (B, 4, 4, 3))
    cond = {"mu": jnp.linspace(-0.5, 0.5, B)}
    null = {"mu": jnp.zeros(B)}
    scale = jnp.linspace(0.0, 4.0, B)
    rng = jax.random.key(7)

    def run(x, c, n, s, sharding=None):
        kw = dict(null_cond=n, guidance_scale=s, clip_denoised=True, sharding=sharding)
        return (
            d.p_sample_loop(oracle.eps_model, tab, PARAMS, x, rng, c, **kw),
            d.ddim_sample_loop(oracle.eps_model, tab, PARAMS, x, rng, c, eta=0.5, **kw),
            d.dpm_solver_pp_2m_loop(oracle.eps_model, tab, PARAMS, x, c, **kw),
        )

    single = run(x_T, cond, null, scale)
    with jax.set_mesh(mesh):
        put = lambda tree: jax.device_put(tree, batch)  # noqa: E731
        sharded = run(put(x_T), put(cond), put(null), put(scale), sharding=batch)
    for a, b in zip(single, sharded, strict=True):
        assert b.sharding.is_equivalent_to(batch, b.ndim)
        assert len(b.addressable_shards) == 8
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    # The stochastic samplers used their noise: results differ from the deterministic one.
    assert float(jnp.abs(single[0] - single[2]).mean()) > 1e-2
