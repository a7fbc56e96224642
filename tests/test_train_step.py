"""The shared train step: sharded equals single-device on three meshes, specs, accumulation,
the non-finite guard and the EMA warm-up."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax import diffusion, parallel
from unclip_jax.demo.toy2d import ToyDenoiser
from unclip_jax.train.state import TrainState, ema_decay_at, make_optimizer
from unclip_jax.train.step import compile_train_step, make_train_step

MODEL = ToyDenoiser(num_classes=4, hidden=32, depth=2)
TABLE = diffusion.create_diffusion("cosine", 1000, var_type="learned_range",
                                   loss_type="rescaled_mse")  # fmt: skip
OPTIM = ml_collections.ConfigDict(
    dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, grad_clip=1.0, warmup_steps=2,
         schedule="constant")
)  # fmt: skip
TX, SCHEDULE = make_optimizer(OPTIM)


def loss_fn(params, batch, rng):
    k_t, k_noise = jax.random.split(rng)
    t = diffusion.sample_timesteps(k_t, batch["x"].shape[0], TABLE)
    noise = jax.random.normal(k_noise, batch["x"].shape)

    def fn(x_t, tm):
        return MODEL.apply({"params": params}, x_t, tm, batch["label"])

    terms = diffusion.training_losses(TABLE, fn, batch["x"], t, noise)
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    return metrics["loss"], metrics


def create(rng):
    params = MODEL.init(rng, jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    return TrainState.create(params["params"], TX)


def batches(n, size=16):
    rng = np.random.default_rng(0)
    return [
        {"x": jnp.asarray(rng.uniform(-1, 1, (size, 2)), jnp.float32),
         "label": jnp.asarray(rng.integers(0, 4, size), jnp.int32)}
        for _ in range(n)
    ]  # fmt: skip


def run(state, step_fn, data, seed=5):
    rng = jax.random.key(seed)
    for batch in data:
        state, metrics = step_fn(state, batch, rng)
    return state, metrics


@pytest.fixture(scope="module")
def reference():
    state = nn.meta.unbox(create(jax.random.key(0)))
    step = jax.jit(make_train_step(loss_fn, TX, SCHEDULE, ema_decay=0.99))
    return run(state, step, batches(3))


@pytest.mark.parametrize(
    "shape,preset",
    [((8, 1, 1), "data_parallel"), ((2, 4, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")],
)
def test_sharded_step_equals_single_device(reference, shape, preset):
    mesh = parallel.create_mesh(tuple(zip(parallel.MESH_AXES, shape, strict=True)))
    rules = parallel.rules_for(preset)
    state, shardings = parallel.sharded_init(create, mesh, rules, jax.random.key(0))
    specs = jax.tree.map(lambda s: s.spec, shardings)
    kernel = specs.params["Dense_3"]["kernel"]  # (embed, mlp)
    expected = {
        "data_parallel": P(None, None),
        "fsdp": P("fsdp", None),
        "fsdp_tp": P("fsdp", "tensor"),
    }
    assert kernel == expected[preset]
    assert specs.opt_state[1][0].mu["Dense_3"]["kernel"] == expected[preset]  # Adam state too
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    data = [jax.device_put(b, batch_sharding) for b in batches(3)]
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = compile_train_step(
            make_train_step(loss_fn, TX, SCHEDULE, ema_decay=0.99), state, data[0],
            jax.random.key(5), state_shardings=shardings,
            batch_shardings=jax.tree.map(lambda _: batch_sharding, data[0]), replicated=replicated,
        )  # fmt: skip
        state, metrics = run(state, step, data)
    ref_state, ref_metrics = reference
    assert state.params["Dense_3"]["kernel"].sharding.spec == expected[preset]
    for ours, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params),
                         strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-4)
    assert int(state.step) == 3 and int(state.skipped) == 0


def test_gradient_accumulation_equals_the_full_batch():
    """With a deterministic loss, 4 micro-batches give the full batch's update."""

    def mse(params, batch, rng):
        out = MODEL.apply({"params": params}, batch["x"], jnp.full(batch["x"].shape[:1], 10),
                          batch["label"])  # fmt: skip
        loss = jnp.mean(jnp.square(out[:, :2] - batch["x"]))
        return loss, {"mse": loss}

    state = nn.meta.unbox(create(jax.random.key(0)))
    state = state.replace(params=jax.tree.map(lambda p: p + 0.01, state.params))
    full = jax.jit(make_train_step(mse, TX, SCHEDULE))
    accum = jax.jit(make_train_step(mse, TX, SCHEDULE, accum_steps=4))
    a, ma = run(state, full, batches(2))
    b, mb = run(state, accum, batches(2))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(ma["mse"], mb["mse"], rtol=1e-5)


def test_nonfinite_loss_leaves_the_state_unchanged_and_is_counted():
    def poisoned(params, batch, rng):
        loss, metrics = loss_fn(params, batch, rng)
        return jnp.where(batch["poison"], jnp.nan, loss), metrics

    step = jax.jit(make_train_step(poisoned, TX, SCHEDULE))
    state = nn.meta.unbox(create(jax.random.key(0)))
    good, bad = batches(2)
    good, bad = dict(good, poison=jnp.array(False)), dict(bad, poison=jnp.array(True))
    state, m1 = step(state, good, jax.random.key(0))
    before = jax.tree.map(np.asarray, state)
    state, m2 = step(state, bad, jax.random.key(0))
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(before), strict=True):
        if np.asarray(x).shape:  # params, EMA and optimizer moments
            np.testing.assert_array_equal(np.asarray(x), y)
    assert int(state.step) == 1 and int(state.skipped) == 1
    assert float(m1["nonfinite_step"]) == 0.0 and float(m2["nonfinite_step"]) == 1.0
    assert {"grad_norm", "param_norm", "learning_rate", "mse", "vb"} <= set(m1)


def test_ema_warmup_and_schedule():
    np.testing.assert_allclose(ema_decay_at(0, 0.9999), 0.1)
    np.testing.assert_allclose(ema_decay_at(10**6, 0.9999), 0.9999)
    np.testing.assert_allclose(ema_decay_at(5, 0.9999, warmup=False), 0.9999)
    np.testing.assert_allclose([SCHEDULE(0), SCHEDULE(1), SCHEDULE(2), SCHEDULE(50)],
                               [0.0, 5e-3, 1e-2, 1e-2], rtol=1e-6)  # fmt: skip
    cosine = make_optimizer(ml_collections.ConfigDict(dict(
        lr=1.0, warmup_steps=0, schedule="cosine", total_steps=100)))[1]  # fmt: skip
    np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)], [1.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        make_optimizer(ml_collections.ConfigDict(dict(lr=1.0, schedule="step")))


def test_decay_matrices_only_spares_gains_and_biases():
    """With zero gradients only the decay moves params: matrices shrink, 1-D tensors do not."""
    cfg = dict(lr=0.1, weight_decay=0.5, schedule="constant", decay_matrices_only=True)
    tx, _ = make_optimizer(ml_collections.ConfigDict(cfg))
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.05)
    np.testing.assert_allclose(updates["bias"], 0.0)
    tx_all, _ = make_optimizer(ml_collections.ConfigDict(dict(cfg, decay_matrices_only=False)))
    updates, _ = tx_all.update(jax.tree.map(jnp.zeros_like, params), tx_all.init(params), params)
    np.testing.assert_allclose(updates["bias"], -0.05)
