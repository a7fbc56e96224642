"""Periodic work of the training loop besides the step: held-out loss and sample grids.

A model kind may offer two optional hooks (both run on every process, SPMD; only process 0
writes what comes out):

    eval_data(global_batch, process_index, process_count) -> iterator of this process's
        held-out NumPy batches (same structure as `data`'s); read afresh at every evaluation,
        so every evaluation sees the same examples.
    sample(ema_params, rng) -> images [N, H, W, 3] in [-1, 1] (a jax.Array or NumPy), or a
        `SampleGrid` (the tiles, the grid's columns and scalars logged beside the grid).

`Evaluator` and `write_samples` are what the loop calls. The toy2d kind's hooks are at the end
(`toy2d_eval_data`, `toy2d_sample`); the unCLIP kinds' are in train/unclip_hooks.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax.data import loader

log = logging.getLogger(__name__)


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) jax.Array as NumPy on every process; NumPy passes through."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
    """Mean loss terms of params and EMA params over `num_batches` held-out global batches.

    The loss runs jitted with the train step's shardings and a fixed rng (the same timesteps and
    noise at every evaluation, so successive numbers compare).
    """

    def __init__(self, kind, *, mesh, rules, param_shardings, global_batch: int, rng,
                 num_batches: int = 1):  # fmt: skip
        self.kind, self.mesh, self.rules = kind, mesh, rules
        self.global_batch, self.num_batches, self.rng = global_batch, num_batches, rng
        self.batch_sharding = loader.batch_sharding(mesh)
        replicated = NamedSharding(mesh, P())
        self._loss = jax.jit(
            kind.loss_fn,
            in_shardings=(param_shardings, self.batch_sharding, replicated),
            out_shardings=replicated,
        )

    def __call__(self, state) -> dict[str, float]:
        data = self.kind.eval_data(self.global_batch, jax.process_index(), jax.process_count())
        sums: dict[str, jax.Array] = {}
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for i in range(self.num_batches):
                batch = loader.to_global(next(data), self.batch_sharding)
                rng = jax.random.fold_in(self.rng, i)
                for prefix, params in (("eval_", state.params), ("eval_ema_", state.ema_params)):
                    loss, terms = self._loss(params, batch, rng)
                    for k, v in {**terms, "loss": loss}.items():
                        sums[prefix + k] = sums.get(prefix + k, 0.0) + v
        return {k: float(v) / self.num_batches for k, v in jax.device_get(sums).items()}


@dataclasses.dataclass(frozen=True)
class SampleGrid:
    """What a `sample` hook returns when bare images are not enough: the tiles [N, H, W, 3] in
    [-1, 1] in row-major order, the grid's number of columns (None: about square) and scalars
    (jax or Python numbers) that go to sample_metrics.jsonl with the grid's step."""

    images: Any
    ncol: int | None = None
    scalars: dict = dataclasses.field(default_factory=dict)


def write_samples(kind, state, rng, step: int, *, mesh, rules, writer) -> None:
    """kind.sample(EMA params) on every process; process 0 writes samples/step_XXXXXX.png (and
    a SampleGrid's scalars to sample_metrics.jsonl)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = kind.sample(state.ema_params, jax.random.fold_in(rng, step))
        if not isinstance(out, SampleGrid):
            out = SampleGrid(out)
        images = to_host(out.images)
        scalars = {k: float(to_host(v)) for k, v in out.scalars.items()}
    writer.image_grid(step, images, ncol=out.ncol)
    if scalars:
        writer.scalars(step, scalars, split="sample")


# ----------------------------------------------------------------------------- toy2d's hooks

HELD_OUT = 2**32 - 1  # a seed word no process index reaches: the held-out stream of the ring


class HeldOutRing:
    """Held-out batches of the toy ring: global batch i is a pure function of (seed, i), and
    each process takes its contiguous rows, so the held-out set does not depend on how many
    processes read it."""

    def __init__(self, config, global_batch: int, process_index: int, process_count: int):
        self.config, self.global_batch = config, global_batch
        self.rows = slice(process_index * global_batch // process_count,
                          (process_index + 1) * global_batch // process_count)  # fmt: skip
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        from unclip_jax.demo.toy2d import mode_centres

        d = self.config.data
        rng = np.random.default_rng([self.config.seed, HELD_OUT, self.index])
        self.index += 1
        labels = rng.integers(0, d.num_modes, self.global_batch)
        x = mode_centres(d.num_modes, d.radius)[labels]
        x = x + d.mode_std * rng.standard_normal((self.global_batch, 2))
        return {"x": x[self.rows].astype(np.float32), "label": labels[self.rows].astype(np.int32)}


def toy2d_eval_data(config):
    """The toy2d kind's `eval_data` hook."""
    return functools.partial(HeldOutRing, config)


def toy2d_sample(config, size: int = 64):
    """The toy2d kind's `sample` hook: one tile per class, `config.sample.grid_per_class` points
    drawn with `config.sample.grid_sampler` at guidance `config.sample.grid_guidance`, dots
    coloured by class on white, the mode centres in grey. Rasterised on device: the result is
    an [num_modes, size, size, 3] array in [-1, 1]."""
    from unclip_jax import diffusion
    from unclip_jax.demo import toy2d

    n_cls, per = config.data.num_modes, config.sample.grid_per_class
    module = toy2d.ToyDenoiser(n_cls, config.model.hidden, config.model.depth)
    fn = functools.partial(toy2d.model_fn, module=module)  # one object: compiled once
    sampler, respacing = config.sample.grid_sampler
    table = diffusion.diffusion_from_config(config.diffusion, respacing)
    labels = jnp.repeat(jnp.arange(n_cls), per)
    hues = jnp.asarray([(228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163),
                        (255, 127, 0), (166, 86, 40), (247, 129, 191), (90, 90, 90)],
                       jnp.float32) / 127.5 - 1.0  # fmt: skip
    centres = jnp.asarray(toy2d.mode_centres(n_cls, config.data.radius), jnp.float32)

    def to_pixels(points):
        px = jnp.clip(((points + 1.1) / 2.2 * size).astype(jnp.int32), 0, size - 1)
        return px[..., 0], size - 1 - px[..., 1]  # column, row (y up)

    @jax.jit
    def draw(params, table, rng):
        x_T = jax.random.normal(jax.random.fold_in(rng, 0), (labels.shape[0], 2))
        scale = jnp.full(labels.shape, config.sample.grid_guidance, jnp.float32)
        x = diffusion.sample(sampler, fn, table, params, x_T, jax.random.fold_in(rng, 1),
                             {"label": labels}, null_cond={"label": jnp.full_like(labels, n_cls)},
                             guidance_scale=scale, clip_denoised=True)  # fmt: skip
        images = jnp.ones((n_cls, size, size, 3), jnp.float32)
        col, row = to_pixels(centres)
        images = images.at[:, row, col].set(0.4)
        col, row = to_pixels(x)
        return images.at[labels, row, col].set(hues[labels % hues.shape[0]])

    def sample(ema_params, rng):
        return draw(ema_params, table, rng)

    return sample
