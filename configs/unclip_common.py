"""Shared pieces of the unCLIP decoder and upsampler configs (SPEC 3.4, 3.5, 4.1, 5).

Imported by configs/decoder64.py, configs/upsample256.py and configs/upsample1024.py.
"""

import ml_collections
from glide_common import training as glide_training
from glide_common import unet


def sr_unet(image_size, model_channels, channel_mult, num_res_blocks, dropout=0.0):
    """An attention-free upsampler UNet: [x_t, low_res] in (6), eps out (3), additive time norm.

    No attention anywhere, middle block included (unCLIP sec. 3.5; Karlo's improved_sr).
    """
    c = unet(image_size, 6, model_channels, channel_mult, num_res_blocks,
             attention_resolutions="", dropout=dropout)  # fmt: skip
    c.out_channels = 3
    c.middle_attention = False
    c.use_scale_shift_norm = False  # Karlo's SR (diffusers' "default" time-embedding norm)
    return c


def diffusion(schedule, learned_sigma):
    c = ml_collections.ConfigDict()
    c.schedule = schedule
    c.num_timesteps = 1000
    c.mean_type = "epsilon"
    if learned_sigma:  # the hybrid loss: MSE + VB term (lambda = 0.001) with learned-range variance
        c.var_type, c.loss_type = "learned_range", "rescaled_mse"
    else:  # Karlo's SR: fixed small variance, plain MSE
        c.var_type, c.loss_type = "fixed_small", "mse"
    return c


def training(c, tiny, kind, *, lr, batch_size, steps, ema_decay=0.9999, b2=0.999, eps=1e-8):
    """glide_common.training (optimizer, checkpoints, mesh, data) with unCLIP's Table 3 numbers."""
    c = glide_training(c, tiny, batch_size=batch_size, steps=steps)
    c.kind = kind
    if not tiny:
        o = c.optim
        o.lr, o.b2, o.eps, o.ema_decay, o.weight_decay = lr, b2, eps, ema_decay, 0.0
    return c
