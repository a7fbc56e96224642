"""unCLIP's 256 -> 1024 upsampler (SPEC 3.5): an attention-free UNet on [x_t, low_res].

As configs/upsample256.py, but Table 3's second column: linear schedule, 192 channels, depth 2,
mult 1,1,2,2,4,4, no dropout ("-" in Table 3, SPEC 7.13), batch 512, 1M steps, lr 1e-4; DDIM 15
steps. The conditioning is a BSR degradation (Zhang et al. 2021) of the crop: host NumPy
(transforms.bsr_degrade), so the data pipeline makes it (train.unclip.bsr_pairs_np) and the batch
carries "low_res"; `train.degradation = "given"` tells the loss to use it.
Variants:
  paper   the paper's "300M" model: 267,146,691 parameters with the additive time-embedding norm
          used for both upsamplers (282,059,139 with scale-shift norm); the remaining gap to
          300M is unexplained by Table 3's numbers
  tiny    16 -> 64 with the jittable blur instead of BSR, so tests need no host pipeline

    unclip-jax train --config upsample1024:tiny --workdir runs/upsample1024_tiny
"""

import ml_collections
from unclip_common import diffusion, sr_unet, training


def get_config(arg=None):
    variant = arg or "paper"
    c = ml_collections.ConfigDict()
    m = c.model = ml_collections.ConfigDict()
    m.remat, m.resize = False, "bicubic"
    c.train = ml_collections.ConfigDict()
    c.train.crop_fraction = 0.25  # of the side (SPEC 7.12): 256 px crops
    c.sample = ml_collections.ConfigDict()
    c.sample.respacing, c.sample.sampler = "15", "ddim"
    if variant == "paper":
        m.low_res_size = 256
        m.unet = sr_unet(1024, 192, (1, 1, 2, 2, 4, 4), 2)
        m.remat = True
        c.train.degradation = "given"  # BSR, made on the host by the data pipeline
    elif variant == "tiny":
        m.low_res_size = 16
        m.unet = sr_unet(64, 32, (1, 2), 1)
        c.train.degradation = "blur"
    else:
        raise ValueError(f"unknown upsample1024 variant {variant!r}: paper or tiny")
    c.diffusion = diffusion("linear", learned_sigma=False)
    return training(c, variant == "tiny", "upsampler", lr=1.0e-4, batch_size=512,
                    steps=1_000_000)  # fmt: skip
