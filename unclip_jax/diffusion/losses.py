"""Training losses: MSE on the prediction target and the hybrid loss of Improved DDPM (SPEC 1.3).

All terms are computed in float32 whatever the network's compute dtype, and returned per example
([B]); the train step takes the mean. Logs of probabilities are clamped at 1e-12, as in the
reference code, so the discretised decoder term stays finite even for confident wrong outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import gaussian as g
from unclip_jax.diffusion.gaussian import DiffusionTable, LossType, ModelMeanType

_LOG2 = math.log(2.0)


def mean_flat(x):
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by the reference code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2).

    The edge bins take the whole tail (x < -0.999: CDF(+); x > 0.999: 1 - CDF(-)).
    Elementwise, in nats.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shapes differ: x {x.shape}, means {means.shape}, scales {log_scales.shape}"
        )
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def vb_terms_bpd(table: DiffusionTable, model_output, x_start, x_t, t):
    """The variational-bound term at t, in bits per dimension: [B].

    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL at t = 0.
    x_0 is not clamped here (as in the reference code).
    """
    x_start = x_start.astype(jnp.float32)
    true_mean, _, true_log_var = g.q_posterior_mean_variance(table, x_start, x_t, t)
    out = g.p_mean_variance(table, model_output, x_t, t, clip_denoised=False)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / _LOG2
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, out["mean"], 0.5 * out["log_variance"]
    )
    decoder_nll = mean_flat(decoder_nll) / _LOG2
    return jnp.where(t == 0, decoder_nll, kl)


def snr(table: DiffusionTable, t):
    """Signal-to-noise ratio abar_t / (1 - abar_t) at table indices t: [B]."""
    abar = jnp.take(table.alphas_cumprod, t)
    return abar / (1.0 - abar)


def min_snr_weight(table: DiffusionTable, t, gamma: float):
    """Min-SNR-gamma weights (Hang et al. 2023) for the MSE term, expressed for the table's target.

    Equivalent to weighting the x_0 error by min(SNR, gamma); an extension beyond both papers.
    """
    s = snr(table, t)
    clipped = jnp.minimum(s, gamma)
    if table.mean_type == ModelMeanType.EPSILON:
        return clipped / s
    if table.mean_type == ModelMeanType.START_X:
        return clipped
    return clipped / (s + 1.0)


def training_losses(
    table: DiffusionTable,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_start,
    t,
    noise,
    *,
    snr_gamma: float | None = None,
) -> dict[str, jax.Array]:
    """Per-example loss terms at table indices t [B].

    model_fn(x_t, t_model) -> raw output, called with original-chain timesteps; the caller closes
    over params, conditioning and dropout rngs (this runs inside its traced loss function).
    Returns {"loss", "mse" and/or "vb", "nonfinite"}; each [B] float32. "nonfinite" is 1 where the
    loss is NaN or infinite, for the train step to count (it skips such updates).
    With a learned variance the VB term trains only the variance: the mean half of the output is
    behind a stop-gradient (the hybrid loss, lambda = 0.001 via the T / 1000 rescaling).
    """
    if x_start.shape != noise.shape:
        raise ValueError(f"x_start {x_start.shape} and noise {noise.shape} differ in shape")
    x_start = x_start.astype(jnp.float32)
    x_t = g.q_sample(table, x_start, t, noise.astype(jnp.float32))
    model_output = model_fn(x_t, jnp.take(table.timestep_map, t)).astype(jnp.float32)
    terms = {}

    if table.loss_type.is_vb:
        terms["vb"] = vb_terms_bpd(table, model_output, x_start, x_t, t)
        if table.loss_type == LossType.RESCALED_KL:
            terms["vb"] = terms["vb"] * table.num_timesteps
        terms["loss"] = terms["vb"]
    else:
        mean_out, var_out = g.split_model_output(table, model_output)
        if mean_out.shape != x_start.shape:
            raise ValueError(f"model output {model_output.shape} does not fit x {x_start.shape}")
        if table.mean_type == ModelMeanType.EPSILON:
            target = noise.astype(jnp.float32)
        elif table.mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = g.get_v(table, x_start, noise.astype(jnp.float32), t)
        terms["mse"] = mean_flat(jnp.square(target - mean_out))
        if snr_gamma is not None:
            terms["mse"] = terms["mse"] * min_snr_weight(table, t, snr_gamma)
        terms["loss"] = terms["mse"]
        if var_out is not None:
            frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
            vb = vb_terms_bpd(table, frozen, x_start, x_t, t)
            if table.loss_type == LossType.RESCALED_MSE:
                # Keeps lambda = 0.001 of Improved DDPM: the VB sum over T steps is T * E_t[vb_t].
                vb = vb * table.num_timesteps / 1000.0
            terms["vb"] = vb
            terms["loss"] = terms["loss"] + vb
    terms["nonfinite"] = (~jnp.isfinite(terms["loss"])).astype(jnp.float32)
    return terms


def sample_timesteps(rng, batch_size: int, table: DiffusionTable):
    """Uniform training timesteps in [0, T): [B] int32 (the reference's default sampler)."""
    return jax.random.randint(rng, (batch_size,), 0, table.num_timesteps, dtype=jnp.int32)
