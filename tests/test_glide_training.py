"""A tiny GLIDE samples with guidance (per-prompt scales, sharded), inpaints exactly and takes CLIP
guidance; its training inputs are right. That its loss falls: tests/test_train_kinds.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import config_utils, parallel
from unclip_jax.imaging import area_downsample, random_crop
from unclip_jax.models.glide import glide_from_config
from unclip_jax.pipelines.glide import GlidePipeline, GlideStage
from unclip_jax.tokenizers import ByteTokenizer
from unclip_jax.tokenizers import glide_tokenize as tokenize
from unclip_jax.train import glide as glide_train

COLORS = {"red": (0.9, -0.8, -0.8), "green": (-0.8, 0.6, -0.6), "blue": (-0.8, -0.6, 0.9)}


def toy_batch(rng, batch, size=16):
    """A coloured square on the left or right half, captioned "red left" etc."""
    names, sides = list(COLORS), ["left", "right"]
    colors = rng.integers(0, 3, batch)
    side = rng.integers(0, 2, batch)
    images = np.full((batch, size, size, 3), 0.2, np.float32)
    for i in range(batch):
        x0 = 2 if side[i] == 0 else size // 2 + 2
        images[i, 4:12, x0 : x0 + 5] = COLORS[names[colors[i]]]
    captions = [f"{names[c]} {sides[s]}" for c, s in zip(colors, side, strict=True)]
    tokens, mask = tokenize(ByteTokenizer(), captions, 16, ByteTokenizer.pad_id)
    return {"image": jnp.asarray(images), "tokens": tokens, "mask": mask}


@pytest.fixture(scope="module")
def trained():
    """The tiny GLIDE with perturbed random params (every layer nonzero, so the text matters).

    That the loss falls is shown through the shared loop (tests/test_train_kinds.py: the same
    glide_loss, 30 steps on shapes); these tests need a model whose outputs depend on the
    caption, not a trained one, and training one here cost two minutes of the CI budget.
    """
    config = config_utils.load_config("glide_base64:tiny")
    model = glide_from_config(config.model)
    batch = toy_batch(np.random.default_rng(0), 2)
    args = (batch["image"], jnp.zeros(2, jnp.int32), batch["tokens"], batch["mask"])
    # A small perturbation: large random weights amplify float reassociation over the sampler's
    # steps, which the sharded-equals-unsharded check (1e-5) would read as a difference.
    params = _random_params(model, args, {}, 0, amplitude=0.01)
    return config, model, params


def test_sampling_with_guidance_scales(trained):
    config, model, params = trained
    stage = GlideStage(model, params, config.diffusion)
    pipe = GlidePipeline(stage, ByteTokenizer())
    prompts = ["red left", "blue right", "green left"]
    outs = {}
    for scale in (0.0, 1.0, 3.0):
        out = pipe(prompts, jax.random.key(0), guidance_scale=scale, base_respacing="10")
        assert out["images"].shape == (3, 16, 16, 3)
        assert bool(jnp.all(jnp.abs(out["images"]) <= 1.0))
        outs[scale] = np.asarray(out["images"])
    assert np.abs(outs[3.0] - outs[0.0]).mean() > 1e-3
    # Sharded along `data` over the 8 devices: the same images as on one device.
    mesh = parallel.create_mesh((("data", 8),))
    prompts8 = prompts + ["blue left", "red right", "green right", "red left", "blue right"]
    one = pipe(prompts8, jax.random.key(1), guidance_scale=3.0, base_respacing="10")
    with jax.set_mesh(mesh):
        sharded = pipe(prompts8, jax.random.key(1), guidance_scale=3.0, base_respacing="10",
                       mesh=mesh)  # fmt: skip
    assert len(sharded["images"].addressable_shards) == 8
    np.testing.assert_allclose(sharded["images"], one["images"], atol=1e-5)
    # Per-prompt scales in one batch equal the uniform runs, example by example.
    mixed = pipe(prompts, jax.random.key(0), guidance_scale=[0.0, 1.0, 3.0], base_respacing="10")
    for i, scale in enumerate((0.0, 1.0, 3.0)):
        np.testing.assert_allclose(mixed["images"][i], outs[scale][i], atol=1e-5)


def _random_params(model, args, kwargs, seed, amplitude=0.05):
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), *args, **kwargs))["params"]
    wave = lambda p: amplitude * jnp.sin(jnp.arange(p.size).reshape(p.shape))  # noqa: E731
    return jax.tree.map(lambda p: p + wave(p), params)


def test_inpainting_keeps_known_pixels_exactly_at_both_stages():
    base_cfg = config_utils.load_config("glide_inpaint64:tiny")
    up_cfg = config_utils.load_config("glide_upsample256:tiny_inpaint")
    base_model, up_model = glide_from_config(base_cfg.model), glide_from_config(up_cfg.model)
    tok, mask = tokenize(ByteTokenizer(), ["a", "b"], 16, ByteTokenizer.pad_id)
    x16, x32 = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2, 32, 32, 3))
    t = jnp.zeros(2, jnp.int32)
    base_params = _random_params(base_model, (x16, t, tok, mask), {}, 0)
    up_params = _random_params(up_model, (x32, t, tok, mask), {"low_res": x16}, 1)
    pipe = GlidePipeline(
        GlideStage(base_model, base_params, base_cfg.diffusion),
        ByteTokenizer(),
        upsampler=GlideStage(up_model, up_params, up_cfg.diffusion),
    )
    image = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    known = jnp.zeros((2, 32, 32, 1)).at[:, :, :12].set(1.0)  # the left 12 columns are kept
    out = pipe(["a", "b"], jax.random.key(3), guidance_scale=2.0, base_respacing="10",
               upsample_respacing="10", inpaint_image=image, inpaint_mask=known)  # fmt: skip
    kept = np.asarray(known[..., 0]) == 1
    np.testing.assert_array_equal(np.asarray(out["images"])[kept], np.asarray(image)[kept])
    small_kept = kept[:, ::2, ::2]
    small_image = np.asarray(area_downsample(image, 16))  # what the base stage is given
    np.testing.assert_array_equal(np.asarray(out["base"])[small_kept], small_image[small_kept])
    assert np.abs(np.asarray(out["images"])[~kept] - np.asarray(image)[~kept]).mean() > 0.05


def test_inpaint_masks_follow_the_recipe():
    masks = np.asarray(glide_train.random_inpaint_masks(jax.random.key(0), 2000, 32))
    assert masks.shape == (2000, 32, 32, 1) and set(np.unique(masks)) <= {0.0, 1.0}
    known = masks.mean(axis=(1, 2, 3))
    assert 0.07 < np.mean(known == 0) < 0.13  # 10% fully erased
    assert 0.3 < np.mean(known) < 0.9 and np.mean((known > 0) & (known < 1)) > 0.8


def test_captions_drop_to_the_empty_sequence_and_low_res_is_area_downsampled():
    tokens = jnp.arange(4000).reshape(1000, 4) % 50
    mask = jnp.ones((1000, 4), bool)
    t2, m2 = glide_train.drop_captions(jax.random.key(0), tokens, mask, 0.2, pad_id=99)
    dropped = np.asarray(~m2.any(-1))
    assert 0.16 < dropped.mean() < 0.24
    assert np.all(np.asarray(t2)[dropped] == 99) and np.all(np.asarray(m2)[~dropped])
    img = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    low = area_downsample(img, 2)
    np.testing.assert_allclose(low[0, 0, 0, 0], (0 + 1 + 4 + 5) / 4)
    with pytest.raises(ValueError, match="not a multiple"):
        area_downsample(img, 3)
    crops = random_crop(jax.random.key(0), jnp.broadcast_to(img[:1], (64, 4, 4, 1)), 2)
    corners = {float(c) for c in np.asarray(crops[:, 0, 0, 0])}
    assert corners == {0.0, 1.0, 2.0, 4.0, 5.0, 6.0, 8.0, 9.0, 10.0}  # every offset, 2x2 in 4x4
    np.testing.assert_array_equal(crops[:, 1, 1, 0] - crops[:, 0, 0, 0], 5.0)


def test_clip_guidance_runs_inside_the_glide_sampler(trained):
    """A noise-aware CLIP's gradient guides GLIDE's jitted base sampler (no CFG with it)."""
    from unclip_jax.models.clip import clip_from_config, init_params
    from unclip_jax.models.clip_guidance import ClipGuidance, clip_guidance_cond

    config, model, params = trained
    clip_cfg = config_utils.load_config("noised_clip_b64:tiny")
    clip = clip_from_config(clip_cfg.model)
    clip_params = nn.meta.unbox(jax.jit(lambda r: init_params(clip, r))(jax.random.key(4)))
    guidance = ClipGuidance(clip)
    ids = jnp.tile(jnp.arange(1, 17)[None], (3, 1)).astype(jnp.int32)
    pipe = GlidePipeline(GlideStage(model, params, config.diffusion), ByteTokenizer())
    prompts = ["red left", "blue right", "green left"]

    def run(scale):
        cond = clip_guidance_cond(clip, clip_params, ids, scale)
        out = pipe(prompts, jax.random.key(2), guidance_scale=None, base_respacing="10",
                   clip_guidance=(guidance, cond))  # fmt: skip
        return np.asarray(out["images"])

    unguided = np.asarray(pipe(prompts, jax.random.key(2), guidance_scale=None,
                               base_respacing="10")["images"])  # fmt: skip
    np.testing.assert_allclose(run(0.0), unguided, atol=1e-6)
    assert np.abs(run(50.0) - unguided).mean() > 1e-4
    with pytest.raises(ValueError, match="replaces classifier-free guidance"):
        pipe(prompts, jax.random.key(2), guidance_scale=3.0,
             clip_guidance=(guidance, clip_guidance_cond(clip, clip_params, ids, 1.0)))  # fmt: skip
