"""Karlo end to end against diffusers, stage by stage (tests/fixtures/karlo_tiny_chain.npz, written
by tests/fixtures/make_karlo_chain_fixtures.py from diffusers' UnCLIPPipeline and
UnCLIPImageVariationPipeline on tests/fixtures/karlo_tiny, float32).

Each stage of ours (`pipeline_from_diffusers`' jitted samplers) gets the reference's own stage
inputs, initial latents and step noise. What the numbers show (measured values in the asserts):

- every single step of ours, from the reference's sample at that step, lands on the reference's
  next sample to < 1e-4 (1e-6 - 7e-5), once diffusers' final-step coefficient is accounted for:
  at t = 0 the UnCLIPScheduler multiplies x_0 by beta_0 / (1 - alphas_cumprod[0]), which its
  float32 schedule makes 0.99947 instead of 1 (1 - (1 - beta_0) cancels); our schedule is
  float64 (DESIGN 5), so ours is exactly x_0. That factor alone explains the final steps'
  5e-4 - 2e-3. The one exception is the super-res' first step (t = 999, 6e-3), where an
  eps-model's x_0 = (x - sqrt(1 - abar) eps) / sqrt(abar) divides by 4.9e-5: float32 rounding
  in either order of evaluation is magnified > 1000x there (measured on our own step);
- the prior and super-res stages agree end to end to < 1e-4 and < 1e-2 (factor applied);
- the decoder stage, guided at scale 8 with random weights, amplifies any difference ~1000x over
  its 25 steps: our own sampler moves by 6e-3 when x_T moves by 1e-5. Its whole-stage difference
  to the reference (0.06) is that amplification of its first step's 7e-5, not a difference in
  the math: the step-by-step check holds at every step, and at guidance 1 nothing amplifies;
- the whole chain from the prompts: the prior's 2e-3 (the final-step factor) enters the decoder
  and is amplified until the 16 px images differ entirely (max abs 2.0; 64 px: max 1.0, mean
  0.09); with diffusers' rounding applied to our prior's output the chain ends 0.05 apart at
  16 px, the decoder stage's own amplification. Random weights are the worst case for this:
  trained denoisers contract rather than amplify (not measurable here without Karlo's weights).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion
from unclip_jax.diffusion import samplers
from unclip_jax.models.decoder import null_cond
from unclip_jax.models.prior import unscale_image_embedding
from unclip_jax.pipelines.prior import conditioning, null_conditioning
from unclip_jax.pipelines.unclip import pipeline_from_diffusers

HERE = pathlib.Path(__file__).parent / "fixtures"
FIXTURE = np.load(HERE / "karlo_tiny_chain.npz")
STEPS = {"prior": 25, "decoder": 25, "super_res": 7}
GUIDANCE = {"prior": 4.0, "decoder": 8.0}


def ref(key: str) -> np.ndarray:
    return FIXTURE[key]


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@functools.cache
def final_step_factor() -> np.float32:
    """diffusers' UnCLIPScheduler at t = 0: x_{-1} = beta_0 / (1 - alphas_cumprod[0]) * x_0, with
    its float32 betas (squaredcos_cap_v2 from float64), alphas and cumulative product."""
    betas = diffusion.get_named_beta_schedule("cosine", 1000).astype(np.float32)
    alphas_cumprod = np.cumprod(np.float32(1) - betas, dtype=np.float32)
    return betas[0] / (np.float32(1) - alphas_cumprod[0])


@pytest.fixture(scope="module")
def pipe():
    return pipeline_from_diffusers(HERE / "karlo_tiny")


@functools.partial(jax.jit, static_argnames=("model_fn",))
def one_step(model_fn, table, params, x, i, key, cond, null, scale, clamp):
    """Our ancestral step i (table index) from x: what p_sample_loop's body does."""
    opts = dict(clip_denoised=True, clip_range=clamp, denoised_fn=None)
    _, _, out = samplers._predict(model_fn, table, params, x, i, cond, null, scale, opts)
    noise = diffusion.step_noise(key, i, x.shape)
    return out["mean"] + (i > 0) * jnp.exp(0.5 * out["log_variance"]) * noise


def step_errors(model_fn, table, params, x_T, trajectory, seed, cond, null, scale, clamp):
    """Max |ours - reference| of each step taken from the reference's previous sample; the final
    step's reference divided by diffusers' float32 coefficient."""
    _, key = diffusion.split_sampler_rng(jax.random.key(seed))
    n = table.num_timesteps
    inputs = [x_T, *trajectory[:-1]]
    errors = []
    for k in range(n):
        i = n - 1 - k
        x = one_step(model_fn, table, params, jnp.asarray(inputs[k]), jnp.int32(i), key, cond,
                     null, scale, jnp.float32(clamp))  # fmt: skip
        target = trajectory[k] / final_step_factor() if i == 0 else trajectory[k]
        errors.append(max_abs(x, target))
    return errors


def empty_text(prefix: str) -> dict:
    return {"text_emb": ref(f"{prefix}empty_text_emb"),
            "text_tokens": ref(f"{prefix}empty_text_hidden"),
            "text_mask": ref(f"{prefix}empty_text_mask")}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The fixture's conventions


def test_fixture_noise_is_what_our_stages_draw():
    """The recorded step noise is step_noise(second half of split_sampler_rng(key(seed)), i):
    what our stage samplers add when called with the stage's seed."""
    for prefix, stages in (("t2i_", STEPS), ("var_", {"decoder": 25, "super_res": 7})):
        for stage, steps in stages.items():
            noise = ref(f"{prefix}{stage}_noise")
            _, key = diffusion.split_sampler_rng(jax.random.key(int(ref(f"{prefix}{stage}_seed"))))
            assert noise.shape[0] == steps - 1
            for k, i in enumerate(range(steps - 1, 0, -1)):
                drawn = diffusion.step_noise(key, i, noise.shape[1:])
                # 1 ulp apart at most: the tests compile with XLA's optimisations off.
                assert max_abs(drawn, noise[k]) < 1e-6


def test_respaced_timesteps_are_the_unclip_schedulers(pipe):
    """Our respacing of 1000 steps into 25 and 7 is UnCLIPScheduler's timestep grid."""
    prior = pipe.priors["diffusion"].sampler.table
    assert prior.num_timesteps == STEPS["prior"]
    tables = {"prior": prior, "decoder": pipe.decoder.table(str(STEPS["decoder"])),
              "super_res": pipe.upsamplers[0][0].table(str(STEPS["super_res"]))}  # fmt: skip
    for stage, table in tables.items():
        ours = np.asarray(table.timestep_map)[::-1]
        np.testing.assert_array_equal(ours, ref(f"t2i_{stage}_timesteps"), err_msg=stage)


def test_scheduler_clamps_are_read_from_the_folder(pipe):
    """karlo-v1-alpha's prior scheduler clamps the standardised x_0 to 5 (not Karlo's original
    10): pipeline_from_diffusers takes it from prior_scheduler/scheduler_config.json."""
    assert pipe.priors["diffusion"].sampler.clamp == 5.0
    assert pipe.decoder.clip_denoised and pipe.decoder.clip_range == 1.0
    assert pipe.upsamplers[0][0].clip_range == 1.0


def test_final_step_factor_is_diffusers_float32_rounding():
    f = final_step_factor()
    assert abs(float(f) - 1.0) > 1e-4, "the float32 cancellation should be visible"
    assert abs(float(f) - 1.0) < 1e-3


# ------------------------------------------------------------------------------------------------
# UnCLIPPipeline (text to image), stage by stage


def test_text_stage(pipe):
    out = pipe.clip.text([str(p) for p in ref("t2i_prompts")])
    np.testing.assert_array_equal(np.asarray(out["tokens"]), ref("t2i_tokens"))
    assert max_abs(out["text_emb"], ref("t2i_text_emb")) < 1e-5
    assert max_abs(out["text_tokens"], ref("t2i_text_hidden")) < 1e-5
    np.testing.assert_array_equal(np.asarray(out["text_mask"]), ref("t2i_text_mask"))


def stage_model(pipe):
    return pipe.priors["diffusion"].model


def prior_inputs(pipe):
    stage = pipe.priors["diffusion"]
    cond = conditioning(stage.model, ref("t2i_text_emb"), ref("t2i_text_hidden"),
                        ref("t2i_text_mask"))  # fmt: skip
    return stage, cond, null_conditioning(stage.model, cond, empty_text("t2i_"))


def test_prior_stage(pipe):
    stage, cond, null = prior_inputs(pipe)
    scale = jnp.full((2,), GUIDANCE["prior"], jnp.float32)
    errors = step_errors(stage.sampler.model_fn, stage.sampler.table, stage.params,
                         ref("t2i_prior_latents"), ref("t2i_prior_trajectory"),
                         int(ref("t2i_prior_seed")), cond, null, scale, 5.0)  # fmt: skip
    assert max(errors) < 1e-4, errors
    out = stage.sampler(stage.params, cond, jax.random.key(int(ref("t2i_prior_seed"))),
                        null_cond=null, guidance_scale=scale,
                        x_T=jnp.asarray(ref("t2i_prior_latents")))  # fmt: skip
    # The whole stage: raw 2e-3 (the final-step factor on values up to 3.7); with it, < 1e-4.
    mean = unscale_image_embedding(stage.model, stage.params, jnp.zeros((1, 16)))
    adjusted = (out["image_emb"] - mean) * final_step_factor() + mean
    assert max_abs(adjusted, ref("t2i_prior_out")) < 1e-4
    assert max_abs(out["image_emb"], ref("t2i_prior_out")) < 3e-3


def decoder_inputs(prefix: str, image_emb, text_emb, text_hidden, text_mask):
    b = image_emb.shape[0]
    cond = {"image_emb": jnp.asarray(image_emb), "drop_image": jnp.zeros((b,), bool),
            "text_emb": jnp.asarray(text_emb), "text_tokens": jnp.asarray(text_hidden),
            "text_mask": jnp.asarray(text_mask)}  # fmt: skip
    return cond, null_cond(cond, null_text=empty_text(prefix))


def run_decoder(pipe, cond, null, x_T, seed: int, scale: float):
    b = x_T.shape[0]
    return pipe.decoder.sample(cond, jax.random.key(seed), batch=b, respacing=str(STEPS["decoder"]),
                               sampler="ddpm", null_cond=null,
                               guidance_scale=jnp.full((b,), scale, jnp.float32),
                               x_T=jnp.asarray(x_T))  # fmt: skip


def check_decoder_stage(pipe, prefix: str, cond, null) -> None:
    x_T, seed = ref(f"{prefix}decoder_latents"), int(ref(f"{prefix}decoder_seed"))
    trajectory = ref(f"{prefix}decoder_trajectory")
    b = x_T.shape[0]
    scale = jnp.full((b,), GUIDANCE["decoder"], jnp.float32)
    respacing = str(STEPS["decoder"])
    table = pipe.decoder.table(respacing)
    args = (pipe.decoder.model_fn, table, pipe.decoder.params, x_T, trajectory, seed, cond, null,
            scale, 1.0)  # fmt: skip
    errors = step_errors(*args)
    assert max(errors) < 1e-4, errors
    out = run_decoder(pipe, cond, null, x_T, seed, GUIDANCE["decoder"])
    whole = max_abs(jnp.clip(out, -1, 1), ref(f"{prefix}decoder_out"))
    # Guidance 8 with random weights amplifies: our own chain, x_T moved by 1e-5.
    moved = x_T + 1e-5 * np.random.default_rng(0).standard_normal(x_T.shape).astype(np.float32)
    gain = max_abs(run_decoder(pipe, cond, null, moved, seed, GUIDANCE["decoder"]), out) / 1e-5
    assert gain > 100, gain
    # The whole-stage difference is the first step's difference, amplified as our chain
    # amplifies (within 3x either way), and the unguided chain does not amplify.
    predicted = gain * errors[0]
    assert predicted / 3 < whole < 3 * predicted, (whole, predicted)
    calm = max_abs(run_decoder(pipe, cond, null, moved, seed, 1.0),
                   run_decoder(pipe, cond, null, x_T, seed, 1.0)) / 1e-5  # fmt: skip
    assert calm < 10, calm


def test_decoder_stage(pipe):
    cond, null = decoder_inputs("t2i_", ref("t2i_prior_out"), ref("t2i_text_emb"),
                                ref("t2i_text_hidden"), ref("t2i_text_mask"))  # fmt: skip
    check_decoder_stage(pipe, "t2i_", cond, null)


def check_super_res_stage(pipe, prefix: str) -> None:
    stage, settings = pipe.upsamplers[0]
    assert settings["respacing"] == str(STEPS["super_res"]) and settings["sampler"] == "ddpm"
    low = jnp.asarray(ref(f"{prefix}decoder_out"))
    size = stage.sample_shape[0]
    # torch's bicubic with antialias (the pipelines' upscale) is jax.image.resize's bicubic.
    upscaled = jax.image.resize(low, (low.shape[0], size, size, 3), "bicubic")
    assert max_abs(upscaled, ref(f"{prefix}super_res_upscaled")) < 1e-5
    x_T, seed = ref(f"{prefix}super_res_latents"), int(ref(f"{prefix}super_res_seed"))
    trajectory = ref(f"{prefix}super_res_trajectory")
    cond = {"low_res": low}
    table = stage.table(settings["respacing"])
    args = (stage.model_fn, table, stage.params, x_T, trajectory, seed, cond, None, None, 1.0)
    errors = step_errors(*args)
    assert max(errors[1:]) < 1e-4, errors
    # The first step (t = 999): x_0 = (x - sqrt(1 - abar) eps) / sqrt(abar) with sqrt(abar) =
    # 4.9e-5 is ill-conditioned in float32 wherever x_0 escapes the clamp. Our own step moves by
    # > 1e-3 when x_T moves by 1e-6, so the two float32 evaluations (diffusers divides the
    # difference, we subtract two scaled terms) may differ by the 6e-3 measured.
    _, key = diffusion.split_sampler_rng(jax.random.key(seed))
    i = jnp.int32(table.num_timesteps - 1)
    moved = x_T + 1e-6 * np.random.default_rng(0).standard_normal(x_T.shape).astype(np.float32)
    first = [one_step(stage.model_fn, table, stage.params, jnp.asarray(x), i, key, cond, None,
                      None, jnp.float32(1.0)) for x in (x_T, moved)]  # fmt: skip
    conditioning_gain = max_abs(*first) / 1e-6
    assert conditioning_gain > 1000, conditioning_gain
    assert errors[0] < 1e-2, errors
    out = stage.sample(cond, jax.random.key(seed), batch=low.shape[0],
                       respacing=settings["respacing"], sampler="ddpm",
                       x_T=jnp.asarray(x_T))  # fmt: skip
    # super_res_first's chain (all but the last step), then super_res_last's step: the first
    # step's schedule rounding carries through (7 steps do not amplify it).
    assert max_abs(out * final_step_factor(), trajectory[-1]) < 1e-2
    assert max_abs(out, trajectory[-1]) < 1e-2


def test_super_res_stage(pipe):
    check_super_res_stage(pipe, "t2i_")


def test_whole_chain_from_prompts(pipe):
    """Ours from the prompts, the initial latents and the seeds alone: the measured end-to-end
    difference (the decoder's amplification carries through to the 64 px images)."""
    prompts = [str(p) for p in ref("t2i_prompts")]
    text = pipe.clip.text(prompts)
    z = pipe.image_embeddings(prompts, jax.random.key(int(ref("t2i_prior_seed"))), text=text,
                              guidance_scale=GUIDANCE["prior"],
                              x_T=jnp.asarray(ref("t2i_prior_latents")))  # fmt: skip
    assert max_abs(z, ref("t2i_prior_out")) < 3e-3
    x = pipe.decode(z, jax.random.key(int(ref("t2i_decoder_seed"))), prompts=prompts, text=text,
                    guidance_scale=GUIDANCE["decoder"], respacing=str(STEPS["decoder"]),
                    sampler="ddpm", x_T=jnp.asarray(ref("t2i_decoder_latents")))  # fmt: skip
    decoded = max_abs(jnp.clip(x, -1, 1), ref("t2i_decoder_out"))
    stage, settings = pipe.upsamplers[0]
    y = stage.sample({"low_res": jnp.clip(x, -1, 1)},
                     jax.random.key(int(ref("t2i_super_res_seed"))), batch=2,
                     respacing=settings["respacing"], sampler="ddpm",
                     x_T=jnp.asarray(ref("t2i_super_res_latents")))  # fmt: skip
    final = np.asarray(jnp.clip(y * 0.5 + 0.5, 0, 1))
    reference = np.clip(ref("t2i_super_res_trajectory")[-1] * 0.5 + 0.5, 0, 1)
    print(
        f"whole chain: decoder 16 px max abs {decoded:.3g}, final 64 px max abs "
        f"{max_abs(final, reference):.3g}, mean abs {np.abs(final - reference).mean():.3g}"
    )
    # The raw chain: the prior's final-step factor (2e-3) enters the decoder, which amplifies it
    # ~1000x at guidance 8 (test_decoder_stage): the 16 px images differ entirely.
    assert decoded > 0.5
    # With diffusers' final-step rounding applied to our prior's output, the chain carries only
    # the decoder stage's own difference.
    mean = unscale_image_embedding(stage_model(pipe), pipe.priors["diffusion"].params,
                                   jnp.zeros((1, z.shape[1])))  # fmt: skip
    z_theirs = (z - mean) * final_step_factor() + mean
    x2 = pipe.decode(z_theirs, jax.random.key(int(ref("t2i_decoder_seed"))), prompts=prompts,
                     text=text, guidance_scale=GUIDANCE["decoder"],
                     respacing=str(STEPS["decoder"]), sampler="ddpm",
                     x_T=jnp.asarray(ref("t2i_decoder_latents")))  # fmt: skip
    decoded2 = max_abs(jnp.clip(x2, -1, 1), ref("t2i_decoder_out"))
    print(
        f"whole chain, diffusers' final-step rounding applied to the prior: decoder 16 px max "
        f"abs {decoded2:.3g}"
    )
    assert decoded2 < 0.2


# ------------------------------------------------------------------------------------------------
# UnCLIPImageVariationPipeline


def test_variation_image_encoder(pipe):
    """The feature extractor's normalisation and the image tower: our ClipEncoder.images on the
    image (in [-1, 1]) against the reference's pixel values and image embedding."""
    from unclip_jax.models.clip import preprocess_images

    image = ref("var_image").astype(np.float32) / 127.5 - 1.0
    pixels = preprocess_images(jnp.asarray(image), pipe.clip.image_model.vision.image_size)
    assert max_abs(pixels, ref("var_pixel_values")) < 1e-5
    assert max_abs(pipe.clip.images(image), ref("var_image_emb")) < 1e-5


def test_variation_decoder_and_super_res_stages(pipe):
    empty = empty_text("t2i_")  # the variations pipeline's caption is "" too
    b = 1
    cond, null = decoder_inputs("t2i_", ref("var_image_emb"),
                                np.broadcast_to(empty["text_emb"], (b,) + empty["text_emb"].shape),
                                np.broadcast_to(empty["text_tokens"],
                                                (b,) + empty["text_tokens"].shape),
                                np.broadcast_to(empty["text_mask"],
                                                (b,) + empty["text_mask"].shape))  # fmt: skip
    check_decoder_stage(pipe, "var_", cond, null)
    check_super_res_stage(pipe, "var_")


# ------------------------------------------------------------------------------------------------
# The folders pipeline_from_diffusers reads


def test_image_variations_folder_and_scheduler_mismatches(tmp_path):
    """karlo-v1-alpha-image-variations' layout (image_encoder/, no prior/) gives a pipeline
    without a prior whose variations run; a scheduler whose settings differ from the configs'
    is one ConversionError naming the file and the field."""
    import json
    import shutil

    from unclip_jax.convert.common import ConversionError
    from unclip_jax.convert.runs import convert_karlo

    folder = tmp_path / "karlo_variations"
    shutil.copytree(HERE / "karlo_tiny", folder)
    shutil.rmtree(folder / "prior")
    shutil.rmtree(folder / "prior_scheduler")
    variations = pipeline_from_diffusers(folder)
    assert variations.priors == {}
    image = ref("var_image")[0].astype(np.float32) / 127.5 - 1.0
    out = variations.variations(image, jax.random.key(0), n=2, respacing="ddim4")
    assert out["images"].shape == (2, 16, 16, 3) and bool(jnp.isfinite(out["images"]).all())

    config = folder / "decoder_scheduler" / "scheduler_config.json"
    raw = json.loads(config.read_text())
    for key, value, named in (("variance_type", "fixed_small_log", "diffusion.var_type"),
                              ("prediction_type", "v_prediction", "not supported"),
                              ("num_train_timesteps", 500, "diffusion.num_timesteps")):  # fmt: skip
        config.write_text(json.dumps(raw | {key: value}))
        with pytest.raises(ConversionError, match=named) as err:
            pipeline_from_diffusers(folder)
        assert str(config) in str(err.value) and "\n" not in str(err.value)
    # Another decoder clamp: the pipeline samples with it; a converted run cannot carry it.
    config.write_text(json.dumps(raw | {"clip_sample_range": 2.0}))
    assert pipeline_from_diffusers(folder).decoder.clip_range == 2.0
    with pytest.raises(ConversionError, match="clamped to"):
        convert_karlo(folder, tmp_path / "not_written")
    assert not (tmp_path / "not_written").exists()
    config.write_text(json.dumps(raw))

    # `unclip-jax convert karlo` on it, then `unclip-jax vary` on the converted runs.
    from PIL import Image

    from unclip_jax import cli

    runs = tmp_path / "runs"
    cli.main(["convert", "karlo", str(folder), "--out", str(runs)])
    assert not (runs / "prior").exists()
    Image.fromarray(ref("var_image")[0]).save(tmp_path / "image.png")
    cli.main(["vary", str(tmp_path / "image.png"), "--clip", str(runs / "clip"),
              "--decoder", str(runs / "decoder"), "--upsamplers", str(runs / "upsampler"),
              "--n", "2", "--steps", "4", "--out", str(tmp_path / "vary")])  # fmt: skip
    assert (tmp_path / "vary" / "grid.png").is_file()

    shutil.rmtree(folder / "image_encoder")
    with pytest.raises(FileNotFoundError, match="neither prior/"):
        pipeline_from_diffusers(folder)


# ------------------------------------------------------------------------------------------------
# Sampling in bfloat16


def test_bfloat16_sampling_runs_and_stays_near_float32(pipe):
    """`dtype="bfloat16"` builds every network in bf16 compute (params float32); the stages still
    return float32 and land near the float32 pipeline (guidance 1, so nothing amplifies: measured
    mean abs 0.009 prior, 0.011 decoder, 0.018 super-res)."""
    from unclip_jax.pipelines.stage import sampling_dtype

    b16 = pipeline_from_diffusers(HERE / "karlo_tiny", dtype="bfloat16")
    models = (b16.decoder_model, b16.decoder_model.unet, b16.priors["diffusion"].model,
              b16.clip.model, b16.clip.image_model)  # fmt: skip
    assert all(m.dtype == jnp.bfloat16 for m in models)
    prompts = ["a red circle", "a blue square"]
    outs = []
    for p in (pipe, b16):
        z = p.image_embeddings(prompts, jax.random.key(0), guidance_scale=1.0)
        x = p.decode(z, jax.random.key(1), prompts=prompts, guidance_scale=1.0, respacing="8")
        y = p.upsample(x, jax.random.key(2))[-1]
        assert all(a.dtype == jnp.float32 and bool(jnp.isfinite(a).all()) for a in (z, x, y))
        outs.append((z, x, y))
    means = [float(jnp.abs(a - b).mean()) for a, b in zip(*outs, strict=True)]
    assert means[0] < 0.03 and means[1] < 0.03 and means[2] < 0.05, means
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        sampling_dtype("float16")
