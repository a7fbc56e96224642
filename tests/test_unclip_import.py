"""A diffusers unCLIP folder (Karlo's layout) as an UnclipPipeline, and Karlo's last-step model.

tests/fixtures/karlo_tiny/ comes from tests/fixtures/make_karlo_fixtures.py (tiny random weights,
consistent sizes); the stages' numerical parity with diffusers is tested in test_prior.py,
test_decoder.py and test_upsampler.py."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.convert.diffusers_unclip import load_diffusers_upsampler
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
