"""A diffusers unCLIP folder (Karlo's layout) as an UnclipPipeline, and Karlo's last-step model.

tests/fixtures/karlo_tiny/ comes from tests/fixtures/make_karlo_fixtures.py (tiny random weights,
consistent sizes); the stages' numerical parity with diffusers is tested in test_prior.py,
test_decoder.py and test_upsampler.py."""

import pathlib

import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unclip_jax.convert.diffusers_unclip import load_diffusers_upsampler
from unclip_jax.pipelines.stage import DiffusionStage
from unclip_jax.pipelines.unclip import make_last_step_model_fn, pipeline_from_diffusers

FOLDER = pathlib.Path(__file__).parent / "fixtures" / "karlo_tiny"


@pytest.fixture(scope="module")
def pipe():
    return pipeline_from_diffusers(FOLDER)


def test_karlo_folder_samples_end_to_end(pipe):
    prompts = ["a red circle", "a small blue square"]
    out = pipe(prompts, jax.random.key(0), prior_guidance=4.0, decoder_guidance=[1.0, 8.0],
               decoder_respacing="3")  # fmt: skip
    assert out["image_emb"].shape == (2, 16)
    assert out["decoded"].shape == (2, 16, 16, 3) and out["images"].shape == (2, 64, 64, 3)
    assert bool(jnp.all(jnp.isfinite(out["images"])))
    # Karlo's pipeline defaults came with the configs: 25 prior steps, super-res "7" ancestral.
    assert pipe.priors["diffusion"].sampler.table.num_timesteps == 25
    stage, sample = pipe.upsamplers[0]
    assert sample["respacing"] == "7" and set(stage.params) == {"first", "last"}
    # The image tower (image_encoder/) serves variations.
    z = pipe.clip.images(out["decoded"])
    assert z.shape == (2, 16)


def test_last_step_network_runs_at_t0_only():
    model, first = load_diffusers_upsampler(FOLDER / "super_res_first", low_res_size=16)
    _, last = load_diffusers_upsampler(FOLDER / "super_res_last", low_res_size=16)
    params = {"first": first, "last": last}
    model_fn = jax.jit(make_last_step_model_fn(model))
    x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    cond = {"low_res": jax.random.normal(jax.random.key(2), (1, 16, 16, 3))}

    def run(p, t):
        return model.apply({"params": p}, x, jnp.array([t]), cond)

    assert float(jnp.max(jnp.abs(run(first, 0) - run(last, 0)))) > 1e-3
    np.testing.assert_allclose(model_fn(params, x, jnp.array([0]), cond), run(last, 0), atol=1e-5)
    np.testing.assert_allclose(model_fn(params, x, jnp.array([500]), cond), run(first, 500),
                               atol=1e-5)  # fmt: skip


def test_missing_parts_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder is missing"):
        pipeline_from_diffusers(tmp_path)


def _oracle_decoder(params, x, t, cond):
    """The exact denoiser of N(0, 0.5^2) data (tests/gaussian_oracle.py), ignoring cond: a
    decoder whose probability-flow ODE is known, so inversion round trips are measurable."""
    return oracle.eps_model(params, x, t, {"mu": jnp.zeros((x.shape[0],))})


def test_inversion_then_ddim_eta0_reconstructs_through_the_pipeline(pipe):
    import dataclasses

    cfg = ml_collections.ConfigDict(dict(schedule="cosine", num_timesteps=1000,
                                         mean_type="epsilon", var_type="fixed_small",
                                         loss_type="mse"))  # fmt: skip
    stage = DiffusionStage(_oracle_decoder, None, cfg, (16, 16, 3), clip_denoised=False)
    stage.params = {"abar": stage.table(None).alphas_cumprod}
    oracle_pipe = dataclasses.replace(pipe, decoder=stage)
    images = oracle.DATA_STD * jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    z, x_T = oracle_pipe.invert(images, respacing="ddim50", fixed_point_iters=3)
    assert z.shape == (2, 16) and x_T.shape == images.shape
    back = oracle_pipe.decode(z, jax.random.key(0), guidance_scale=1.0, respacing="ddim50",
                              sampler="ddim", x_T=x_T, eta=0.0)  # fmt: skip
    err = float(jnp.max(jnp.abs(back - images)))
    assert err < 2e-3, err
    varied = oracle_pipe.variations(images[0], jax.random.key(1), n=2, eta=1.0)
    assert float(jnp.max(jnp.abs(varied["images"] - images[0]))) > 50 * err
    frames = oracle_pipe.interpolate(images[0], images[1], jax.random.key(2),
                                     thetas=[0.0, 0.5, 1.0])  # fmt: skip
    # Slerped latents: the endpoints reconstruct both inputs.
    np.testing.assert_allclose(frames["images"][0], images[0], atol=5 * err + 1e-3)
    np.testing.assert_allclose(frames["images"][2], images[1], atol=5 * err + 1e-3)
