"""Contrastive training: the global-batch loss under sharding, a tiny CLIP that learns captioned
shapes, and the noise-aware CLIP trained briefly and used as the samplers' gradient guidance."""

import itertools

import gaussian_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax import diffusion as d
from unclip_jax.config_utils import load_config
from unclip_jax.models.clip import clip_from_config, l2_normalize, normalize_images
from unclip_jax.models.clip_guidance import ClipGuidance, clip_guidance_cond
from unclip_jax.tokenizers import train_bpe
from unclip_jax.train import clip as clip_train
from unclip_jax.train.state import make_optimizer
from unclip_jax.train.step import make_train_step

COLORS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1)}
SHAPES = ("circle", "square", "triangle")
CLASSES = list(itertools.product(COLORS, SHAPES))
TEMPLATES = ("a {} {}", "a photo of a {} {}", "{} {}", "a small picture of a {} {}")
SIZE = 16


def captioned_shapes(rng, n):
    """n images [n, 16, 16, 3] in [-1, 1] of one coloured shape on a noisy grey background, the
    class index of each and a caption from a random template."""
    labels = rng.integers(0, len(CLASSES), n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cy, cx = rng.uniform(6, SIZE - 6, (2, n, 1, 1))
    r = rng.uniform(4, 6, (n, 1, 1))
    shape = np.array([CLASSES[i][1] for i in labels])[:, None, None]
    dy, dx = yy - cy, xx - cx
    masks = np.where(
        shape == "circle",
        dy**2 + dx**2 <= r**2,
        np.where(
            shape == "square",
            (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r),
            (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2),  # apex up
        ),
    )
    color = np.array([COLORS[CLASSES[i][0]] for i in labels], np.float32)[:, None, None]
    background = rng.normal(-0.3, 0.1, (n, SIZE, SIZE, 3)).astype(np.float32)
    images = np.where(masks[..., None], 0.8 * color, background).astype(np.float32)
    captions = [TEMPLATES[rng.integers(len(TEMPLATES))].format(*CLASSES[i]) for i in labels]
    return np.clip(images, -1, 1), labels, captions


def _batch(tokenizer, rng, n, normalized=True):
    images, labels, captions = captioned_shapes(rng, n)
    tokens = tokenizer(captions)
    if normalized:  # the plain CLIP takes CLIP-normalised pixels; the noised one [-1, 1]
        images = np.asarray(normalize_images(images))
    batch = {"input_ids": tokens.input_ids, "images": images.astype(np.float32),
             "eot_positions": tokens.eot_positions}  # fmt: skip
    return batch, labels


@pytest.fixture(scope="module")
def tokenizer():
    rng = np.random.default_rng(123)
    return train_bpe(captioned_shapes(rng, 2000)[2], vocab_size=1024, context_length=16)


def test_contrastive_loss_is_over_the_global_batch():
    """Sharded over 8 devices, the loss equals the single-device one on all 32 pairs, not the
    mean of 8 per-device losses over 4 pairs each."""
    rng = np.random.default_rng(0)
    text, image = rng.normal(size=(2, 32, 8)).astype(np.float32)
    image = image + 2.0 * text  # matched pairs are more similar
    scale = np.float32(10.0)
    loss_fn = jax.jit(clip_train.contrastive_loss)
    single, metrics = loss_fn(text, image, scale)

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        sharded, _ = loss_fn(jax.device_put(text, batch), jax.device_put(image, batch), scale)
    np.testing.assert_allclose(sharded, single, rtol=1e-6)

    local = [float(clip_train.contrastive_loss(text[i : i + 4], image[i : i + 4], scale)[0])
             for i in range(0, 32, 4)]  # fmt: skip
    assert abs(np.mean(local) - float(single)) > 0.1
    # Symmetric: swapping the towers gives the same loss.
    np.testing.assert_allclose(loss_fn(image, text, scale)[0], single, rtol=1e-6)
    assert 0.0 <= float(metrics["text_to_image_accuracy"]) <= 1.0


def test_tiny_clip_learns_captioned_shapes(tokenizer):
    """100 steps at batch 64 on CPU; held-out zero-shot accuracy over the 12 captions."""
    config = load_config("clip_vit_b32:tiny")
    assert tokenizer.vocab_size <= config.model.text.vocab_size
    model = clip_from_config(config.model)
    # The shared train step (train/step.py) with CLIP's optimizer. An rbg key: the same init
    # compiles 2-3x faster on CPU than with threefry.
    tx, schedule = make_optimizer(config.optim)
    state = clip_train.init_train_state(model, tx, jax.random.key(0, impl="unsafe_rbg"))
    loss_fn = clip_train.make_clip_loss(model)
    step = jax.jit(make_train_step(loss_fn, tx, schedule, ema_decay=config.optim.ema_decay),
                   donate_argnums=0)  # fmt: skip
    rng, key = np.random.default_rng(0), jax.random.key(1)
    losses = []
    for _ in range(config.optim.steps):
        batch, _ = _batch(tokenizer, rng, config.optim.batch_size)
        state, metrics = step(state, batch, key)
        losses.append(float(metrics["loss"]))
    # ln(64) = 4.16 at chance; ~1.7 is the floor with ~5 pairs per caption class in a batch.
    assert np.mean(losses[-20:]) < 0.75 * np.mean(losses[:20])

    # Held-out pairs (another seed); image -> caption among the 12 classes, chance = 1/12.
    held_out, labels = _batch(tokenizer, np.random.default_rng(999), 240)
    prompts = tokenizer([f"a {c} {s}" for c, s in CLASSES])

    @jax.jit
    def similarities(params, images):
        out = model.apply({"params": params}, prompts.input_ids, images,
                          eot_positions=prompts.eot_positions)  # fmt: skip
        return out.logits_per_image

    predicted = np.asarray(similarities(state.params, held_out["images"])).argmax(1)
    accuracy = float(np.mean(predicted == labels))
    colour_accuracy = float(np.mean(predicted // len(SHAPES) == labels // len(SHAPES)))
    print(f"tiny CLIP held-out accuracy {accuracy:.3f} (chance {1 / 12:.3f}), "
          f"colour {colour_accuracy:.3f} (chance 0.25)")  # fmt: skip
    assert accuracy > 0.4
    assert colour_accuracy > 0.9


def test_noised_clip_trains_and_guides_the_sampler(tokenizer):
    """The noise-aware CLIP learns on noised images; its gradient, as cond_fn, runs inside the
    jitted ancestral sampler, raises the CLIP similarity of the samples to the prompt and
    pushes them toward the prompt's colour."""
    config = load_config("noised_clip_b64:tiny")
    model = clip_from_config(config.model)
    table = d.create_diffusion(config.diffusion.schedule, config.diffusion.num_timesteps)
    tx, schedule = make_optimizer(config.optim)
    state = clip_train.init_train_state(model, tx, jax.random.key(0, impl="unsafe_rbg"))
    loss_fn = clip_train.make_noised_clip_loss(model, table)
    step = jax.jit(make_train_step(loss_fn, tx, schedule, ema_decay=config.optim.ema_decay),
                   donate_argnums=0)  # fmt: skip
    rng, key = np.random.default_rng(1), jax.random.key(2)
    losses = []
    for _ in range(100):
        batch, _ = _batch(tokenizer, rng, 64, normalized=False)
        state, metrics = step(state, batch, key)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])

    # Sample 16x16 images from the Gaussian oracle (data N(0, 0.5^2)), guided toward "red".
    n = 8
    sampling = d.create_diffusion("cosine", 1000, timestep_respacing="25")
    oracle_params = {"abar": table.alphas_cumprod}
    prompt = tokenizer(["a red square"] * n)
    cond_fn = ClipGuidance(model)
    x_T = jnp.repeat(jax.random.normal(jax.random.key(3), (n // 2, SIZE, SIZE, 3)), 2, axis=0)

    def run(scales):
        clip = clip_guidance_cond(model, state.params, prompt.input_ids, scales,
                                  eot_positions=prompt.eot_positions)  # fmt: skip
        cond = {"mu": jnp.zeros(n), "clip": clip}
        return d.p_sample_loop(oracle.eps_model, sampling, oracle_params, x_T,
                               jax.random.key(4), cond, cond_fn=cond_fn), clip  # fmt: skip

    scales = jnp.tile(jnp.array([0.0, 50.0]), n // 2)  # pairs from the same x_T: off, on
    samples, clip = run(scales)
    unguided = d.p_sample_loop(oracle.eps_model, sampling, oracle_params, x_T, jax.random.key(4),
                               {"mu": jnp.zeros(n)})  # fmt: skip
    np.testing.assert_allclose(samples[0::2], unguided[0::2], atol=1e-5)  # scale 0 = no guidance
    compiled = d.p_sample_loop._cache_size()
    run(scales * 0.5)  # new scales (and params, prompts) are arguments: no recompilation
    assert d.p_sample_loop._cache_size() == compiled

    @jax.jit
    def clean_image_embeds(params, images):  # the noise-aware tower at t = 0
        out = model.apply({"params": params}, images=images, timesteps=jnp.zeros(n, jnp.int32))
        return l2_normalize(out.image_embeds)

    image_embeds = clean_image_embeds(state.params, samples)
    similarity = np.asarray(jnp.sum(clip["text_embeds"] * image_embeds, -1))
    redness = np.asarray(samples[..., 0] - samples[..., 1:].mean(-1)).mean(axis=(1, 2))
    print(f"CLIP similarity to 'a red square': unguided {similarity[0::2]}, "
          f"guided {similarity[1::2]}; red minus other channels: unguided {redness[0::2]}, "
          f"guided {redness[1::2]}")  # fmt: skip
    assert (similarity[1::2] > similarity[0::2] + 0.05).all()
    assert (redness[1::2] > redness[0::2] + 0.05).all()
