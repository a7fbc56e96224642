"""Gaussian diffusion as pure functions over a frozen table of schedule arrays (SPEC 1.1-1.3, 1.5).

Names follow guided-diffusion (`q_sample`, `q_posterior_mean_variance`, `p_mean_variance`, ...), but
nothing here holds a model: functions take the network's raw output, or a `model_fn`, explicitly.

Conventions:
  - `t` is an int32 array [B] of indices into the (possibly respaced) table; the network is always
    called with `table.timestep_map[t]`, an index of the original chain.
  - Arrays are [B, ...]: images [B, H, W, C] (NHWC) or embeddings [B, D]. Learned variances are the
    second half of the last axis of the model output ([..., 2C]).
  - Tables are computed in float64 NumPy and stored as float32; per-example coefficients are
    gathered and broadcast to x's rank by `extract`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from unclip_jax.diffusion import schedules


class ModelMeanType(enum.StrEnum):
    """What the network predicts."""

    EPSILON = "epsilon"  # the noise (GLIDE, unCLIP decoder and upsamplers)
    START_X = "start_x"  # the clean sample x_0 (unCLIP's diffusion prior)
    VELOCITY = (
        "velocity"  # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho; beyond the papers)
    )


class ModelVarType(enum.StrEnum):
    """How the reverse-process variance is chosen."""

    FIXED_SMALL = "fixed_small"  # the posterior variance beta~_t
    FIXED_LARGE = "fixed_large"  # beta_t (with beta~_1 at t = 0)
    LEARNED = "learned"  # the network outputs log-variance directly
    LEARNED_RANGE = "learned_range"  # interpolates log beta~_t .. log beta_t (Improved DDPM)


class LossType(enum.StrEnum):
    MSE = "mse"  # MSE on the target (+ the VB term when the variance is learned)
    RESCALED_MSE = "rescaled_mse"  # as MSE, the VB term scaled by T / 1000
    KL = "kl"  # the variational bound only
    RESCALED_KL = "rescaled_kl"  # the VB term times T

    @property
    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


@struct.dataclass
class DiffusionTable:
    """The schedule of one (possibly respaced) diffusion chain: float32 arrays of length T'.

    A pytree: pass it to jitted functions as an argument. The enums are static (in the treedef).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    alphas_cumprod_next: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    timestep_map: jax.Array  # int32 [T']: original-chain index of each step
    mean_type: ModelMeanType = struct.field(pytree_node=False, default=ModelMeanType.EPSILON)
    var_type: ModelVarType = struct.field(pytree_node=False, default=ModelVarType.FIXED_SMALL)
    loss_type: LossType = struct.field(pytree_node=False, default=LossType.MSE)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def learns_sigma(self) -> bool:
        return self.var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


# jax.export (compile_cache.Exported keeps the traced samplers on disk) serializes a table's tree
# structure; the static enums travel as their string values.
jax.export.register_pytree_node_serialization(
    DiffusionTable,
    serialized_name="unclip_jax.diffusion.DiffusionTable",
    serialize_auxdata=lambda aux: "|".join(str(x) for x in aux).encode(),
    deserialize_auxdata=lambda data: tuple(
        kind(value)
        for kind, value in zip(
            (ModelMeanType, ModelVarType, LossType), data.decode().split("|"), strict=True
        )
    ),
)


def schedule_arrays(betas: np.ndarray) -> dict[str, np.ndarray]:
    """All derived schedule arrays in float64 (the formulas of SPEC 1.1)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must be a 1-D array with values in (0, 1]")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    abar_next = np.append(abar[1:], 0.0)
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    # The posterior variance is 0 at t = 0; its log is clipped by repeating the value at t = 1.
    clipped = np.append(posterior_variance[1], posterior_variance[1:]) if len(betas) > 1 else betas
    return dict(
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        alphas_cumprod_next=abar_next,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        log_one_minus_alphas_cumprod=np.log(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(clipped),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )


def create_table(
    betas: np.ndarray,
    *,
    mean_type: ModelMeanType | str = ModelMeanType.EPSILON,
    var_type: ModelVarType | str = ModelVarType.FIXED_SMALL,
    loss_type: LossType | str = LossType.MSE,
    timestep_respacing: str | list[int] | None = None,
    use_timesteps: Iterable[int] | None = None,
) -> DiffusionTable:
    """Build the table for `betas` [T], respaced when `timestep_respacing` is given.

    `use_timesteps` instead names the kept original-chain steps explicitly (e.g. another library's
    schedule); give one or the other.
    """
    betas = np.asarray(betas, dtype=np.float64)
    timestep_map = np.arange(len(betas))
    if timestep_respacing and use_timesteps is not None:
        raise ValueError("give timestep_respacing or use_timesteps, not both")
    if timestep_respacing:
        use_timesteps = schedules.space_timesteps(len(betas), timestep_respacing)
    if use_timesteps is not None:
        betas, timestep_map = schedules.respace_betas(betas, {int(t) for t in use_timesteps})
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in schedule_arrays(betas).items()}
    return DiffusionTable(
        **arrays,
        timestep_map=jnp.asarray(timestep_map, jnp.int32),
        mean_type=ModelMeanType(mean_type),
        var_type=ModelVarType(var_type),
        loss_type=LossType(loss_type),
    )


def create_diffusion(
    schedule: str = "cosine",
    num_timesteps: int = 1000,
    *,
    timestep_respacing: str | list[int] | None = None,
    use_timesteps: Iterable[int] | None = None,
    mean_type: ModelMeanType | str = ModelMeanType.EPSILON,
    var_type: ModelVarType | str = ModelVarType.FIXED_SMALL,
    loss_type: LossType | str = LossType.MSE,
) -> DiffusionTable:
    """A table from a named schedule; the usual entry point (and what `config.diffusion` feeds)."""
    return create_table(
        schedules.get_named_beta_schedule(schedule, num_timesteps),
        mean_type=mean_type,
        var_type=var_type,
        loss_type=loss_type,
        timestep_respacing=timestep_respacing,
        use_timesteps=use_timesteps,
    )


def extract(arr: jax.Array, t: jax.Array, x_shape: tuple[int, ...]) -> jax.Array:
    """arr[t] for t [B], reshaped to [B, 1, ..., 1] so that it broadcasts against x_shape."""
    out = jnp.take(arr, t, axis=0)
    return out.reshape(out.shape + (1,) * (len(x_shape) - out.ndim))


# ------------------------------------------------------------------------------------------------
# The forward process q.


def q_mean_variance(table: DiffusionTable, x_start, t):
    """Mean, variance and log-variance of q(x_t | x_0)."""
    mean = extract(table.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = extract(1.0 - table.alphas_cumprod, t, x_start.shape)
    log_variance = extract(table.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance


def q_sample(table: DiffusionTable, x_start, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (
        extract(table.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        + extract(table.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
    )


def q_posterior_mean_variance(table: DiffusionTable, x_start, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    shape = x_t.shape
    mean = (
        extract(table.posterior_mean_coef1, t, shape) * x_start
        + extract(table.posterior_mean_coef2, t, shape) * x_t
    )
    variance = extract(table.posterior_variance, t, shape)
    log_variance = extract(table.posterior_log_variance_clipped, t, shape)
    return mean, variance, log_variance


# ------------------------------------------------------------------------------------------------
# Conversions between parameterisations.


def predict_xstart_from_eps(table: DiffusionTable, x_t, t, eps):
    return (
        extract(table.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(table.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def predict_eps_from_xstart(table: DiffusionTable, x_t, t, x_start):
    return (extract(table.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x_start) / extract(
        table.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )


def predict_xstart_from_v(table: DiffusionTable, x_t, t, v):
    return (
        extract(table.sqrt_alphas_cumprod, t, x_t.shape) * x_t
        - extract(table.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
    )


def get_v(table: DiffusionTable, x_start, noise, t):
    """The velocity target v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
    return (
        extract(table.sqrt_alphas_cumprod, t, x_start.shape) * noise
        - extract(table.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start
    )


def split_model_output(table: DiffusionTable, model_output):
    """(mean part [.., C], variance part [.., C] or None) of a raw network output."""
    if table.learns_sigma:
        channels = model_output.shape[-1]
        if channels % 2:
            raise ValueError(
                f"a {table.var_type.value} model must output 2C channels, got {channels}"
            )
        return jnp.split(model_output, 2, axis=-1)
    return model_output, None


def model_variance(table: DiffusionTable, var_output, x_t, t):
    """Variance and log-variance of p(x_{t-1} | x_t) for the table's variance type."""
    shape = x_t.shape
    if table.var_type == ModelVarType.LEARNED:
        log_variance = var_output
    elif table.var_type == ModelVarType.LEARNED_RANGE:
        min_log = extract(table.posterior_log_variance_clipped, t, shape)
        max_log = extract(jnp.log(table.betas), t, shape)
        frac = (var_output + 1.0) / 2.0  # the raw output is unbounded; [-1, 1] spans the range
        log_variance = frac * max_log + (1.0 - frac) * min_log
    elif table.var_type == ModelVarType.FIXED_LARGE:
        # beta_t, but beta~_1 at t = 0 so that the decoder term stays well defined.
        large = jnp.concatenate([table.posterior_variance[1:2], table.betas[1:]])
        log_variance = jnp.broadcast_to(extract(jnp.log(large), t, shape), shape)
    else:
        log_variance = jnp.broadcast_to(
            extract(table.posterior_log_variance_clipped, t, shape), shape
        )
    return jnp.exp(log_variance), log_variance


def process_xstart(x_start, t_model, cond, *, clip_denoised: bool, clip_range, denoised_fn):
    """Apply the sampler's hook to a predicted x_0, then the static clamp (SPEC 1.5 order)."""
    if denoised_fn is not None:
        x_start = denoised_fn(x_start, t_model, cond)
    if clip_denoised:
        x_start = jnp.clip(x_start, -clip_range, clip_range)
    return x_start


def p_mean_variance(
    table: DiffusionTable,
    model_output,
    x_t,
    t,
    *,
    cond=None,
    clip_denoised: bool = False,
    clip_range=1.0,
    denoised_fn=None,
):
    """p(x_{t-1} | x_t) from a raw network output.

    `denoised_fn(x0, t_model, cond) -> x0` runs on the predicted x_0 before the optional clamp to
    [-clip_range, clip_range] (inpainting's known-pixel replacement, the prior's clamp).
    Returns a dict with mean, variance, log_variance, pred_xstart and eps (the noise implied by the
    processed x_0), all float32.
    """
    model_output = model_output.astype(jnp.float32)
    x_t = x_t.astype(jnp.float32)
    mean_out, var_out = split_model_output(table, model_output)
    variance, log_variance = model_variance(table, var_out, x_t, t)
    if table.mean_type == ModelMeanType.EPSILON:
        pred_xstart = predict_xstart_from_eps(table, x_t, t, mean_out)
    elif table.mean_type == ModelMeanType.START_X:
        pred_xstart = mean_out
    else:
        pred_xstart = predict_xstart_from_v(table, x_t, t, mean_out)
    pred_xstart = process_xstart(
        pred_xstart,
        jnp.take(table.timestep_map, t),
        cond,
        clip_denoised=clip_denoised,
        clip_range=clip_range,
        denoised_fn=denoised_fn,
    )
    mean, _, _ = q_posterior_mean_variance(table, pred_xstart, x_t, t)
    return dict(
        mean=mean,
        variance=variance,
        log_variance=log_variance,
        pred_xstart=pred_xstart,
        eps=predict_eps_from_xstart(table, x_t, t, pred_xstart),
    )


# ------------------------------------------------------------------------------------------------
# Gradient guidance (classifier or CLIP guidance, SPEC 1.6).


def condition_mean(out: dict, grad):
    """Guidance for ancestral steps (Dhariwal & Nichol): mean + variance * grad log p(y | x_t)."""
    return out["mean"] + out["variance"] * grad.astype(jnp.float32)


def condition_score(table: DiffusionTable, out: dict, x_t, t, grad):
    """Score guidance for DDIM: eps' = eps - sqrt(1 - abar_t) grad, then x_0 and the mean anew.

    As in guided-diffusion, the new x_0 is not clamped or hooked again.
    """
    eps = out["eps"] - extract(table.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * grad
    pred_xstart = predict_xstart_from_eps(table, x_t, t, eps)
    mean, _, _ = q_posterior_mean_variance(table, pred_xstart, x_t, t)
    return dict(out, mean=mean, pred_xstart=pred_xstart, eps=eps)


def diffusion_from_config(
    config, timestep_respacing: str | list[int] | None = None
) -> DiffusionTable:
    """A table from a config's `diffusion` section (schedule, num_timesteps, mean/var/loss type)."""
    return create_diffusion(
        config.schedule,
        config.num_timesteps,
        timestep_respacing=timestep_respacing,
        mean_type=config.mean_type,
        var_type=config.var_type,
        loss_type=config.loss_type,
    )
