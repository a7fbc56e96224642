"""The Gaussian diffusion core shared by every model (SPEC section 1)."""

from unclip_jax.diffusion.gaussian import (
    DiffusionTable,
    LossType,
    ModelMeanType,
    ModelVarType,
    condition_mean,
    condition_score,
    create_diffusion,
    create_table,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_posterior_mean_variance,
    q_sample,
)
from unclip_jax.diffusion.guidance import model_output
from unclip_jax.diffusion.losses import (
    discretized_gaussian_log_likelihood,
    min_snr_weight,
    normal_kl,
    sample_timesteps,
    training_losses,
    vb_terms_bpd,
)
from unclip_jax.diffusion.samplers import (
    ddim_reverse_sample_loop,
    ddim_sample_loop,
    dpm_solver_pp_2m_loop,
    noise_like,
    p_sample_loop,
)
from unclip_jax.diffusion.schedules import get_named_beta_schedule, space_timesteps

__all__ = [
    "DiffusionTable",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "condition_mean",
    "condition_score",
    "create_diffusion",
    "create_table",
    "ddim_reverse_sample_loop",
    "ddim_sample_loop",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_pp_2m_loop",
    "get_named_beta_schedule",
    "min_snr_weight",
    "model_output",
    "noise_like",
    "normal_kl",
    "p_mean_variance",
    "p_sample_loop",
    "predict_eps_from_xstart",
    "predict_xstart_from_eps",
    "q_posterior_mean_variance",
    "q_sample",
    "sample_timesteps",
    "space_timesteps",
    "training_losses",
    "vb_terms_bpd",
]
