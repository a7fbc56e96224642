"""One diffusion stage of a cascade: a network's model_fn, its params and its diffusion config.

A stage samples (any sampler of the diffusion core) and inverts (DDIM) batches whose per-example
conditioning travels in `cond`; the unCLIP pipeline and its manipulations compose stages on the
host (DESIGN 7). Batches are sharded along `data` when a mesh is given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax import compile_cache, diffusion


def sampling_dtype(dtype) -> jnp.dtype:
    """The compute dtype pipelines build their networks with: float32 unless asked. bfloat16
    (what training computes in on accelerators) is meant for GPUs and TPUs and has not been timed
    on one yet (benchmarks/gpu_suite.sh); norms, softmax and the samplers' arithmetic stay
    float32 either way."""
    dtype = jnp.dtype(dtype or jnp.float32)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"sampling dtype must be float32 or bfloat16, got {dtype.name}")
    return dtype


def network_key(make_model_fn: Callable, model) -> str:
    """DiffusionStage.export_key of `make_model_fn(model)`: the builder's name and the Flax
    module's repr, which lists every attribute (sizes, dtype, ...) of the network."""
    return f"{make_model_fn.__module__}.{make_model_fn.__qualname__}({model!r})"


def exported_sampler(cache: dict, model_fn: Callable, key: str, sampler: str, sharding,
                     clip_denoised: bool) -> compile_cache.Exported:  # fmt: skip
    """The whole sampling loop `sampler` over `model_fn` (named by `key`) as one
    compile_cache.Exported function of (table, params, x_T, rng, cond, null_cond, guidance_scale,
    clip_range, eta), kept in `cache` (a stage's dict) per (sampler, sharding)."""
    found = cache.get((sampler, sharding))
    if found is None:

        def run(table, params, x_T, rng, cond, null_cond, guidance_scale, clip_range, eta):
            kwargs = dict(null_cond=null_cond, guidance_scale=guidance_scale,
                          clip_denoised=clip_denoised, clip_range=clip_range,
                          sharding=sharding)  # fmt: skip
            if sampler == "ddim":
                kwargs["eta"] = eta
            return diffusion.sample(sampler, model_fn, table, params, x_T, rng, cond, **kwargs)

        name = f"sample/{sampler}/{clip_denoised}/{sharding!r}/{key}"
        found = cache[(sampler, sharding)] = compile_cache.Exported(run, name)
    return found


@dataclass(eq=False)
class DiffusionStage:
    """model_fn(params, x, t_model, cond) -> output, for samples of shape [B, *sample_shape].

    `model_fn` must be the same function object on every call (the samplers take it as a static
    argument); build it once, e.g. with functools.partial over the module.
    """

    model_fn: Callable
    params: Any
    diffusion: Any  # ConfigDict: schedule, num_timesteps, mean/var/loss type
    sample_shape: tuple[int, ...]
    clip_denoised: bool = True
    clip_range: float = 1.0
    denoised_fn: Callable | None = None
    # What model_fn computes, as a string (e.g. `network_key(make_model_fn, model)`): with it, the
    # traced sampling loops are kept on disk (compile_cache.Exported) and a later process skips
    # tracing the network. None: traced in every process.
    export_key: str | None = None

    def __post_init__(self):
        compile_cache.enable()  # a sampling loop compiles once per machine, not per process
        self._exported: dict = {}

    def table(self, respacing):
        return diffusion.diffusion_from_config(self.diffusion, respacing)

    def _place(self, mesh, batch, x, cond, null_cond, guidance_scale):
        """Per-example inputs along `data` (when a mesh is given); returns sampler kwargs."""
        kwargs = dict(null_cond=null_cond, guidance_scale=guidance_scale)
        if guidance_scale is not None:
            kwargs["guidance_scale"] = jnp.broadcast_to(
                jnp.asarray(guidance_scale, jnp.float32), (batch,)
            )
        if mesh is None:
            return x, cond, kwargs
        sharding = NamedSharding(mesh, P("data"))
        put = functools.partial(jax.device_put, device=sharding)
        kwargs = {k: None if v is None else jax.tree.map(put, v) for k, v in kwargs.items()}
        kwargs["sharding"] = sharding
        return put(x), jax.tree.map(put, cond), kwargs

    def sample(self, cond, rng, *, batch: int, respacing, sampler: str = "ddpm", null_cond=None,
               guidance_scale=None, x_T=None, temperature: float = 1.0, eta: float = 0.0,
               mesh=None):  # fmt: skip
        """Samples [B, *sample_shape]; x_T (e.g. from `invert`) replaces the initial noise."""
        k_noise, k_sample = diffusion.split_sampler_rng(rng)
        if x_T is None:
            x_T = diffusion.noise_like(k_noise, (batch,) + tuple(self.sample_shape), temperature)
        elif x_T.shape != (batch,) + tuple(self.sample_shape):
            raise ValueError(f"x_T has shape {x_T.shape}, expected "
                             f"{(batch,) + tuple(self.sample_shape)}")  # fmt: skip
        x_T, cond, kwargs = self._place(mesh, batch, x_T, cond, null_cond, guidance_scale)
        if self.export_key is not None and self.denoised_fn is None:
            run = exported_sampler(self._exported, self.model_fn, self.export_key, sampler,
                                   kwargs.get("sharding"), self.clip_denoised)  # fmt: skip
            return run(self.table(respacing), self.params, x_T, k_sample, cond,
                       kwargs["null_cond"], kwargs["guidance_scale"],
                       jnp.float32(self.clip_range), jnp.float32(eta))  # fmt: skip
        kwargs.update(clip_denoised=self.clip_denoised, clip_range=self.clip_range,
                      denoised_fn=self.denoised_fn)  # fmt: skip
        if sampler == "ddim":
            kwargs["eta"] = eta
        return diffusion.sample(sampler, self.model_fn, self.table(respacing), self.params, x_T,
                                k_sample, cond, **kwargs)  # fmt: skip

    def invert(self, x_0, cond, *, respacing, null_cond=None, guidance_scale=None,
               fixed_point_iters: int = 0, mesh=None):  # fmt: skip
        """DDIM inversion of data x_0 [B, *sample_shape] to the x_T that DDIM (eta 0) decodes back
        to x_0 with the same conditioning and respacing."""
        batch = x_0.shape[0]
        x_0, cond, kwargs = self._place(mesh, batch, x_0, cond, null_cond, guidance_scale)
        return diffusion.ddim_reverse_sample_loop(
            self.model_fn, self.table(respacing), self.params, x_0, cond,
            clip_denoised=self.clip_denoised, clip_range=self.clip_range,
            denoised_fn=self.denoised_fn, fixed_point_iters=fixed_point_iters, **kwargs,
        )  # fmt: skip
