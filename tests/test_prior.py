"""unCLIP's diffusion prior: diffusers parity, conversion errors, causality and padding, counts,
sharding, frozen statistics in training, the loss going down, and the best-of-N sampler."""

import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from unclip_jax import config_utils, diffusion, parallel
from unclip_jax.convert import common
from unclip_jax.convert.diffusers_prior import load_diffusers_prior
from unclip_jax.models import prior as prior_lib
from unclip_jax.pipelines.prior import PriorSampler, conditioning, null_conditioning
from unclip_jax.train.prior import prior_loss
from unclip_jax.train.state import TrainState, make_optimizer
from unclip_jax.train.step import make_train_step

HERE = pathlib.Path(__file__).parent / "fixtures"
FOLDER = HERE / "prior_tiny"
DATA = np.load(HERE / "prior_tiny.npz")


def fixture_cond(**changes):
    cond = dict(text_emb=DATA["text_emb"], text_tokens=DATA["text_tokens"], text_mask=DATA["mask"])
    return {k: jnp.asarray(v) for k, v in (cond | changes).items()}


@pytest.fixture(scope="module")
def converted():
    return load_diffusers_prior(FOLDER)


@pytest.fixture(scope="module")
def apply_hidden(converted):
    """jitted (params, x, t, cond) -> (x0, transformer outputs [B, L + 4, W])."""
    model, _ = converted

    def run(params, x, t, cond):
        keep = lambda m, _: m.name == "transformer"  # noqa: E731
        out, state = model.apply({"params": params}, x, t, cond, capture_intermediates=keep)
        return out, state["intermediates"]["transformer"]["__call__"][0]

    return jax.jit(run)


def test_outputs_match_diffusers(converted):
    model, params = converted
    assert sum(p.size for p in common.flatten(params).values()) == int(DATA["num_params"])
    out = jax.jit(model.apply)({"params": params}, DATA["x_t"], DATA["timesteps"], fixture_cond())
    # Absolute tolerances ~10x the measured errors (4.8e-7, 3.3e-7, 6e-8 on values up to 1.4).
    np.testing.assert_allclose(out, DATA["out"], atol=5e-6, rtol=0)
    post = prior_lib.unscale_image_embedding(model, params, out)
    np.testing.assert_allclose(post, DATA["post"], atol=5e-6, rtol=0)
    # The round trip through the standardised space.
    z = prior_lib.scale_image_embedding(model, params, DATA["post"])
    np.testing.assert_allclose(z, DATA["out"], atol=5e-6, rtol=0)


def test_causal_and_padding_masks(converted, apply_hidden):
    model, params = converted
    x, t = jnp.asarray(DATA["x_t"]), jnp.asarray(DATA["timesteps"])
    length = model.text_ctx  # positions: text 0..L-1, text_emb L, time L+1, x_t L+2, prd L+3
    out, hidden = apply_hidden(params, x, t, fixture_cond())
    # Earlier positions never see later inputs: changing x_t (position L+2) leaves 0..L+1 intact.
    out2, hidden2 = apply_hidden(params, x + 1.0, t, fixture_cond())
    np.testing.assert_array_equal(hidden2[:, : length + 2], hidden[:, : length + 2])
    assert np.abs(hidden2[:, length + 2 :] - hidden[:, length + 2 :]).min() > 0
    # Changing the text embedding (position L) leaves the text positions intact.
    _, hidden3 = apply_hidden(params, x, t, fixture_cond(text_emb=DATA["text_emb"] + 1.0))
    np.testing.assert_array_equal(hidden3[:, :length], hidden[:, :length])
    assert np.abs(hidden3[:, length:] - hidden[:, length:]).max() > 1e-3
    # Padded text tokens' contents do not reach the output; unmasking them changes it.
    mask = DATA["mask"]
    tokens = np.where(mask[..., None], DATA["text_tokens"], 100.0)
    out4, _ = apply_hidden(params, x, t, fixture_cond(text_tokens=tokens))
    np.testing.assert_array_equal(out4, out)
    out5, _ = apply_hidden(params, x, t, fixture_cond(text_mask=np.ones_like(mask)))
    changed = np.abs(np.asarray(out5) - np.asarray(out)).max(-1)
    assert changed[0] > 1e-3 and changed[2] > 1e-3 and changed[1] == 0  # example 1 has no padding


def _corrupt(tmp_path, edit):
    folder = tmp_path / "prior"
    shutil.copytree(FOLDER, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights))
    return folder


def test_conversion_errors_are_named(tmp_path):
    def rename(state):
        state["transformer_blocks.1.attn1.to_k.weightx"] = state.pop(
            "transformer_blocks.1.attn1.to_k.weight"
        )
        state["clip_std"] = np.zeros((1, 13), np.float32)

    with pytest.raises(common.ConversionError) as err:
        load_diffusers_prior(_corrupt(tmp_path, rename))
    msg = str(err.value)
    assert "missing from checkpoint: transformer_blocks.1.attn1.to_k.weight" in msg
    assert "unexpected key in checkpoint: transformer_blocks.1.attn1.to_k.weightx" in msg
    assert "shape mismatch: clip_std (1, 13) gives (13,), clip_std needs (12,)" in msg


def test_parameter_counts_and_config_errors():
    karlo = prior_lib.prior_from_config(config_utils.load_config("prior_diffusion:karlo").model)
    assert prior_lib.count_params(karlo) == 1_022_030_080  # diffusers' PriorTransformer (SPEC 4.1)
    paper = prior_lib.prior_from_config(config_utils.load_config("prior_diffusion").model)
    assert 1.0e9 < prior_lib.count_params(paper) < 1.3e9  # "1B" (the paper's Table 3)
    tiny = prior_lib.prior_from_config(config_utils.load_config("prior_diffusion:tiny").model)
    cond = prior_lib.dummy_cond(tiny, 2)
    bad = dict(cond, text_tokens=jnp.zeros((2, 5, 64)))
    with pytest.raises(ValueError, match=r"text_tokens \[B, 16, 64\]"):
        jax.eval_shape(lambda: tiny.init(jax.random.key(0), jnp.zeros((2, 32)), jnp.zeros(2), bad))
    with pytest.raises(ValueError, match="needs a prior with learned_null"):
        jax.eval_shape(lambda: karlo.init(jax.random.key(0), jnp.zeros((1, 768)), jnp.zeros(1),
                                          prior_lib.dummy_cond(karlo, 1, null=True)))  # fmt: skip


def tiny_setup(variant="tiny", batch=8, seed=0):
    config = config_utils.load_config(f"prior_diffusion:{variant}")
    model = prior_lib.prior_from_config(config.model)
    k = jax.random.split(jax.random.key(seed), 4)
    text_emb = jax.random.normal(k[0], (batch, model.clip_dim))
    tokens = jax.random.normal(k[1], (batch, model.text_ctx, model.text_dim))
    lengths = jnp.arange(batch) % model.text_ctx + 1
    mask = jnp.arange(model.text_ctx)[None] < lengths[:, None]
    return config, model, conditioning(model, text_emb, tokens, mask)


def test_learned_null_ignores_the_text_and_sharded_equals_unsharded():
    config, model, cond = tiny_setup(batch=8)
    x = jax.random.normal(jax.random.key(3), (8, model.clip_dim))
    t = jnp.arange(8) * 123 % 1000
    mesh = parallel.create_mesh((("data", 4), ("fsdp", 2)))
    rules = parallel.rules_for("fsdp")
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, cond))
    shardings = parallel.logical_shardings(abstract, mesh, rules)
    specs = common.flatten(jax.tree.map(lambda s: s.spec, shardings))
    assert specs["params/transformer/resblocks_0/attn/c_qkv/kernel"] == P("fsdp", None)
    assert specs["params/positional_embedding"] == P(None, "fsdp")
    assert specs["params/final_ln/scale"] == P(None)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(lambda r: model.init(r, x, t, cond), out_shardings=shardings)(
            jax.random.key(0)
        )
        params = nn.meta.unbox(variables)["params"]
        put = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))  # noqa: E731
        sharded = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(
            params, put(x), put(t), jax.tree.map(put, cond)
        )
    host = jax.tree.map(np.asarray, params)
    apply = jax.jit(lambda c: model.apply({"params": host}, x, t, c))
    single = apply(cond)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)
    assert single.shape == (8, model.clip_dim) and bool(jnp.all(jnp.isfinite(single)))
    # With null = True the caption's embedding and tokens have no influence.
    null = null_conditioning(model, cond)
    other = dict(null, text_emb=null["text_emb"] + 3.0, text_tokens=-null["text_tokens"])
    np.testing.assert_array_equal(apply(other), apply(null))
    assert float(jnp.abs(apply(null) - single).max()) > 1e-3


def synthetic_batch(model, batch=16, seed=0):
    """Image embeddings that are a fixed function of the caption (so the text helps)."""
    k = jax.random.split(jax.random.key(seed), 3)
    text_emb = np.asarray(jax.random.normal(k[0], (batch, model.clip_dim)))
    image_emb = 3.0 + 2.0 * np.roll(text_emb, 1, axis=1)
    tokens = np.asarray(jax.random.normal(k[1], (batch, model.text_ctx, model.text_dim)))
    mask = np.arange(model.text_ctx)[None] < (np.arange(batch) % model.text_ctx + 1)[:, None]
    return dict(image_emb=image_emb.astype(np.float32), text_emb=text_emb, text_tokens=tokens,
                text_mask=mask)  # fmt: skip


def test_training_lowers_the_loss_and_never_moves_the_stats():
    config, model, _ = tiny_setup("tiny_karlo")
    batch = synthetic_batch(model)
    mean, std = prior_lib.compute_embedding_stats(batch["image_emb"])
    np.testing.assert_allclose(mean, batch["image_emb"].mean(0), rtol=1e-5)
    params = nn.meta.unbox(prior_lib.init_params(model, jax.random.key(0)))
    params = prior_lib.with_embedding_stats(params, mean, std)
    table = diffusion.diffusion_from_config(config.diffusion)
    empty = {k: np.zeros(v.shape[1:], v.dtype) for k, v in batch.items() if k != "image_emb"}
    loss_fn = jax.tree_util.Partial(prior_loss, model=model, table=table, text_drop=0.2,
                                    null_text=empty)  # fmt: skip
    optim = ml_collections.ConfigDict(dict(config.optim, weight_decay=0.5, lr=3e-3))
    tx, schedule = make_optimizer(optim)
    step = jax.jit(make_train_step(loss_fn, tx, schedule, ema_decay=0.9))
    state = TrainState.create(params, tx)

    # The loss at given params with step 0's rng: the step's own metrics (no second compilation).
    def loss_at(state):
        return float(step(state.replace(step=jnp.zeros((), jnp.int32)), batch, rng)[1]["loss"])

    rng = jax.random.key(1)
    before = loss_at(state)
    for _ in range(40):
        state, metrics = step(state, batch, rng)
    after = loss_at(state)
    assert int(state.skipped) == 0 and np.isfinite(float(metrics["loss"]))
    assert after < 0.7 * before, (before, after)
    for name, value in (("clip_mean", mean), ("clip_std", std)):
        np.testing.assert_array_equal(np.asarray(state.params[name]), value)  # bit-identical
        # The shared step's EMA, e + (1 - d) (p - e), is exact for a parameter that never moves.
        np.testing.assert_array_equal(np.asarray(state.ema_params[name]), value)
    assert not np.array_equal(state.params["out_proj"]["kernel"], params["out_proj"]["kernel"])


def test_frozen_params_option_on_boxed_params():
    """make_optimizer(frozen_params=...) works on the boxed trees the training loop creates."""
    tx, _ = make_optimizer(ml_collections.ConfigDict(
        dict(lr=0.1, weight_decay=0.5, frozen_params=("clip_mean",))))  # fmt: skip
    boxed = {"clip_mean": nn.LogicallyPartitioned(jnp.ones(3), ("norm",)),
             "w": nn.LogicallyPartitioned(jnp.ones((2, 2)), ("embed", "mlp"))}  # fmt: skip
    opt_state = nn.meta.unbox(tx.init(boxed))
    params = nn.meta.unbox(boxed)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    np.testing.assert_array_equal(updates["clip_mean"], 0.0)
    assert float(jnp.abs(updates["w"]).min()) > 0.05


def test_sampler_best_of_n_deterministic_and_compiled_once():
    config, model, cond = tiny_setup(batch=3)
    params = nn.meta.unbox(prior_lib.init_params(model, jax.random.key(0)))
    params = jax.tree.map(lambda p: p + 0.05, params)
    sampler = PriorSampler(model, config.diffusion, respacing="4", num_candidates=3)
    null = null_conditioning(model, cond)
    rng = jax.random.key(5)
    first = sampler(params, cond, rng, null_cond=null, guidance_scale=jnp.array([1.0, 2.0, 4.0]))
    again = sampler(params, cond, rng, null_cond=null, guidance_scale=jnp.array([1.0, 2.0, 4.0]))
    other = sampler(params, cond, rng, null_cond=null, guidance_scale=jnp.full((3,), 7.0))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.allclose(first["candidates"], other["candidates"])
    cand = np.asarray(first["candidates"])
    assert cand.shape == (3, 3, model.clip_dim) and np.isfinite(cand).all()
    scores = np.einsum("bnd,bd->bn", cand, np.asarray(cond["text_emb"]))
    np.testing.assert_allclose(first["scores"], scores, rtol=1e-5)
    best = scores.argmax(1)
    np.testing.assert_array_equal(first["best"], best)
    np.testing.assert_array_equal(first["image_emb"], cand[np.arange(3), best])
    # The l2 scaling de-scales to unit-norm embeddings (x_0 predicted at scale 17.2).
    assert first["image_emb"].shape == (3, model.clip_dim)
    different_rng = sampler(params, cond, jax.random.key(6), null_cond=null, guidance_scale=1.0)
    assert not np.allclose(different_rng["candidates"], first["candidates"])
    assert sampler.compilations == 1  # three scale arrays and a number: one compilation
