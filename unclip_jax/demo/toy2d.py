"""The diffusion core end to end on 2-D toy data: train a class-conditional MLP, sample, measure.

Data: a ring of `num_modes` Gaussians; the class of a point is its mode. The network predicts eps
and a learned-range variance and is trained with the hybrid loss, the class dropped to a null label
20% of the time. Sampling runs every sampler with classifier-free guidance at several scales in one
batch (per-example scales), and reports how often a sample lands on the mode of its class.
This is a toy for checking the diffusion core, not one of the papers' models.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from unclip_jax import diffusion
from unclip_jax.models import axes
from unclip_jax.models.layers import timestep_embedding

log = logging.getLogger(__name__)


class ToyDenoiser(nn.Module):
    """Residual MLP: (x [B, 2], t [B], label [B]) -> [B, 4] (eps, then the variance interpolant).

    Label `num_classes` is the null condition.
    """

    num_classes: int
    hidden: int = 256
    depth: int = 3
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _dense(self, features, names, zero=False):
        init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
        return nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(init, names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
        )

    def _norm(self):
        return nn.LayerNorm(
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)),
        )

    @nn.compact
    def __call__(self, x, t, label):
        emb = timestep_embedding(t, self.hidden)
        emb = self._dense(self.hidden, (axes.EMBED, axes.MLP))(emb)
        emb = self._dense(self.hidden, (axes.MLP, axes.EMBED))(nn.silu(emb))
        emb = emb + nn.Embed(
            self.num_classes + 1,
            self.hidden,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)
            ),
        )(label)
        h = self._dense(self.hidden, (axes.CHANNELS, axes.EMBED))(x.astype(self.dtype))
        for _ in range(self.depth):
            r = nn.silu(self._norm()(h) + emb)
            r = self._dense(2 * self.hidden, (axes.EMBED, axes.MLP))(r)
            h = h + self._dense(self.hidden, (axes.MLP, axes.EMBED))(nn.silu(r))
        out = self._dense(4, (axes.EMBED, axes.CHANNELS), zero=True)(nn.silu(self._norm()(h)))
        return out.astype(jnp.float32)


def make_data(rng, n: int, num_modes: int, radius: float, std: float):
    """n points of the ring and their mode labels: ([n, 2], [n])."""
    k1, k2 = jax.random.split(rng)
    labels = jax.random.randint(k1, (n,), 0, num_modes)
    angle = 2 * jnp.pi * labels / num_modes
    centres = radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
    return centres + std * jax.random.normal(k2, (n, 2)), labels


def mode_centres(num_modes: int, radius: float) -> np.ndarray:
    angle = 2 * np.pi * np.arange(num_modes) / num_modes
    return radius * np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def toy_loss(params, batch, rng, *, module: ToyDenoiser, table, cond_drop: float):
    """Mean hybrid loss of a batch {"x": [B, 2], "label": [B]}; labels dropped to the null label
    with probability `cond_drop`. Returns (loss, {"loss", "mse", "vb", "nonfinite"})."""
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    labels = batch["label"]
    labels = jnp.where(jax.random.bernoulli(k_drop, cond_drop, labels.shape), module.num_classes,
                       labels)  # fmt: skip
    t = diffusion.sample_timesteps(k_t, labels.shape[0], table)
    noise = jax.random.normal(k_noise, batch["x"].shape)

    def fn(x_t, t_model):
        return module.apply({"params": params}, x_t, t_model, labels)

    terms = diffusion.training_losses(table, fn, batch["x"], t, noise)
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    return metrics["loss"], metrics


class ToyData:
    """Host-side batches {"x": [B, 2], "label": [B]} of the ring, a pure function of
    (seed, process, batch index): the iterator state is just the next index (checkpointable)."""

    def __init__(self, config, batch_size: int, process_index: int = 0):
        self.config, self.batch_size, self.process_index = config, batch_size, process_index
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        d = self.config.data
        rng = np.random.default_rng([self.config.seed, self.process_index, self.index])
        self.index += 1
        labels = rng.integers(0, d.num_modes, self.batch_size)
        centres = mode_centres(d.num_modes, d.radius)[labels]
        x = centres + d.mode_std * rng.standard_normal((self.batch_size, 2))
        return {"x": x.astype(np.float32), "label": labels.astype(np.int32)}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def model_kind(config):
    """What the shared training loop needs for the toy model: init, loss, data."""
    from unclip_jax.train.kinds import ModelKind

    module = ToyDenoiser(config.data.num_modes, config.model.hidden, config.model.depth)
    table = diffusion.diffusion_from_config(config.diffusion)

    def init(rng):
        return module.init(rng, jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))[
            "params"
        ]

    loss = functools.partial(toy_loss, module=module, table=table, cond_drop=config.optim.cond_drop)

    def data(global_batch, process_index, process_count):
        return ToyData(config, global_batch // process_count, process_index)

    from unclip_jax.train import hooks

    return ModelKind(init=init, loss_fn=loss, data=data, eval_data=hooks.toy2d_eval_data(config),
                     sample=hooks.toy2d_sample(config))  # fmt: skip


def model_fn(params, x, t, cond, *, module):
    return module.apply({"params": params}, x, t, cond["label"])


def train(config, module: ToyDenoiser, table, rng):
    """Train with the hybrid loss; returns (params, losses per call)."""
    params = nn.meta.unbox(
        module.init(rng, jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), int))
    )
    params = params["params"]
    opt = optax.adam(config.optim.lr)
    opt_state = opt.init(params)
    data_cfg, batch = config.data, config.optim.batch_size

    def loss_fn(p, rng):
        k_data, k_loss = jax.random.split(rng)
        x0, labels = make_data(
            k_data, batch, data_cfg.num_modes, data_cfg.radius, data_cfg.mode_std
        )
        loss, metrics = toy_loss(p, {"x": x0, "label": labels}, k_loss, module=module,
                                 table=table, cond_drop=config.optim.cond_drop)  # fmt: skip
        return loss, metrics

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_chunk(params, opt_state, rng, start):
        def step(carry, i):
            params, opt_state = carry
            (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, jax.random.fold_in(rng, i)
            )
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, terms["vb"])

        steps = start + jnp.arange(config.optim.steps_per_call)
        (params, opt_state), (loss, vb) = jax.lax.scan(step, (params, opt_state), steps)
        return params, opt_state, loss.mean(), vb.mean()

    history = []
    for start in range(0, config.optim.steps, config.optim.steps_per_call):
        params, opt_state, loss, vb = train_chunk(params, opt_state, rng, start)
        history.append((start + config.optim.steps_per_call, float(loss), float(vb)))
        log.info("step %d loss %.4f (vb %.4f)", *history[-1])
    return params, history


def evaluate(samples, labels, centres, threshold: float):
    """Faithfulness (nearest mode == label and within `threshold`) and spread around the mode."""
    samples, labels = np.asarray(samples), np.asarray(labels)
    dist = np.linalg.norm(samples[:, None, :] - centres[None], axis=-1)
    nearest = dist.argmin(-1)
    on_mode = dist.min(-1) < threshold
    own = dist[np.arange(len(labels)), labels]
    return {
        "faithfulness": float(np.mean((nearest == labels) & on_mode)),
        "on_a_mode": float(np.mean(on_mode)),
        "mean_dist_to_own_mode": float(np.mean(own)),
    }


def draw(panels, centres, path: pathlib.Path, size: int = 220):
    """A grid PNG: one panel per (sampler, scale), points coloured by class."""
    from PIL import Image, ImageDraw

    rows = sorted({p[0] for p in panels}, key=[p[0] for p in panels].index)
    cols = sorted({p[1] for p in panels}, key=[p[1] for p in panels].index)
    image = Image.new("RGB", (size * len(cols), size * len(rows) + 0), "white")
    ink = ImageDraw.Draw(image)
    hues = [(228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0),
            (166, 86, 40), (247, 129, 191), (90, 90, 90)]  # fmt: skip
    to_px = lambda v: (v + 1.1) / 2.2 * size  # noqa: E731
    for row, col, samples, labels in panels:
        ox, oy = cols.index(col) * size, rows.index(row) * size
        ink.rectangle([ox, oy, ox + size - 1, oy + size - 1], outline=(200, 200, 200))
        ink.text((ox + 4, oy + 2), f"{row}  w={col}", fill=(0, 0, 0))
        for cx, cy in centres:
            ink.ellipse([ox + to_px(cx) - 6, oy + to_px(-cy) - 6, ox + to_px(cx) + 6,
                         oy + to_px(-cy) + 6], outline=(180, 180, 180))  # fmt: skip
        for (x, y), lab in zip(np.asarray(samples), np.asarray(labels), strict=True):
            px, py = ox + to_px(x), oy + to_px(-y)
            ink.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=hues[int(lab) % len(hues)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def run(config, out_dir: pathlib.Path, *, retrain: bool = False) -> dict:
    """Train (or reuse) the toy model, sample with every sampler and scale, write PNG and JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    timings, rng = {}, jax.random.key(config.seed)
    module = ToyDenoiser(config.data.num_modes, config.model.hidden, config.model.depth)
    table = diffusion.diffusion_from_config(config.diffusion)
    weights = out_dir / "toy2d_params.msgpack"
    meta = out_dir / "toy2d_config.json"

    start = time.perf_counter()
    same_config = meta.is_file() and json.loads(meta.read_text()) == json.loads(config.to_json())
    if weights.is_file() and same_config and not retrain:
        template = nn.meta.unbox(
            module.init(rng, jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), int))
        )["params"]
        params = serialization.from_bytes(template, weights.read_bytes())
        history = None
        log.info("reusing trained toy model from %s", weights)
    else:
        params, history = train(config, module, table, jax.random.fold_in(rng, 1))
        weights.write_bytes(serialization.to_bytes(params))
        meta.write_text(config.to_json(indent=1))
    timings["train_s"] = time.perf_counter() - start

    n_cls, per = config.data.num_modes, config.sample.per_class
    scales = list(config.sample.guidance_scales)
    labels = jnp.tile(jnp.repeat(jnp.arange(n_cls), per), len(scales))
    scale = jnp.repeat(jnp.asarray(scales, jnp.float32), n_cls * per)
    cond, null = {"label": labels}, {"label": jnp.full_like(labels, n_cls)}
    fn = functools.partial(model_fn, module=module)
    centres = mode_centres(n_cls, config.data.radius)
    results, panels = [], []
    for kind, respacing in config.sample.samplers:
        tab = diffusion.diffusion_from_config(config.diffusion, respacing)
        x_T = jax.random.normal(jax.random.fold_in(rng, 2), (labels.shape[0], 2))
        start = time.perf_counter()
        x = diffusion.sample(kind, fn, tab, params, x_T, jax.random.fold_in(rng, 3), cond,
                             null_cond=null, guidance_scale=scale, clip_denoised=True)  # fmt: skip
        x = np.asarray(jax.block_until_ready(x))
        timings[f"sample_{kind}_s"] = time.perf_counter() - start
        for i, s in enumerate(scales):
            rows = slice(i * n_cls * per, (i + 1) * n_cls * per)
            metrics = evaluate(x[rows], labels[rows], centres, 3 * config.data.mode_std)
            results.append({"sampler": kind, "steps": tab.num_timesteps, "guidance": s, **metrics})
            panels.append((f"{kind} ({tab.num_timesteps} steps)", s, x[rows], labels[rows]))
    draw(panels, centres, out_dir / "toy2d.png")
    report = {
        "what": "diffusion-core toy demo (2-D ring of Gaussians); not a paper model",
        "config": json.loads(config.to_json()),
        "train_history": history,
        "results": results,
        "timings_s": timings,
        "devices": [str(d) for d in jax.devices()],
    }
    (out_dir / "toy2d.json").write_text(json.dumps(report, indent=1))
    return report
