"""unCLIP's 64 -> 256 upsampler (SPEC 3.5, 4.4): an attention-free UNet on [x_t, low_res].

The low-resolution image is resized to x_t's size inside the model with bicubic interpolation
(= torch's bicubic + antialias, what Karlo does outside its model; the paper does not say, SPEC
7.6). eps prediction with fixed small variance (Karlo; the paper does not say either). No text, no
guidance.
Training (unCLIP sec. 3.5 / App. C): random crops of `train.crop_fraction` of the target size,
read as a fraction of the SIDE (64 px crops at 256; SPEC 7.12 leaves side or area open);
conditioning = area-downsampled crop blurred with a Gaussian (k 3, sigma 0.6), on device.
Variants:
  paper   Table 3: cosine, 320 channels, depth 3, mult 1,2,3,4, dropout 0.1, batch 1024, 1M steps,
          lr 1.2e-4; DDIM 27 steps. The paper says 700M; this is Karlo's shape (691,579,523,
          additive time-embedding norm; with scale-shift norm it would be 729,702,083).
  karlo   Karlo's improved_sr_64_256 (each of the two copies, diffusers' super_res_first/last):
          dropout 0, 7 ancestral steps {0, 166, ..., 999}. 691,579,523 parameters.
  tiny    32 -> 64 (16 px crops of 4 px low-res: crop fraction 0.25 of the side)

    unclip-jax train --config upsample256:tiny --workdir runs/upsample256_tiny
"""

import ml_collections
from unclip_common import diffusion, sr_unet, training


def get_config(arg=None):
    variant = arg or "karlo"
    c = ml_collections.ConfigDict()
    m = c.model = ml_collections.ConfigDict()
    m.remat, m.resize = False, "bicubic"
    c.train = ml_collections.ConfigDict()
    c.train.crop_fraction = 0.25  # of the side (SPEC 7.12)
    c.train.degradation = "blur"  # Gaussian k 3, sigma 0.6 (transforms.blur_degrade), on device
    c.sample = ml_collections.ConfigDict()
    if variant in ("paper", "karlo"):
        m.low_res_size = 64
        m.unet = sr_unet(256, 320, (1, 2, 3, 4), 3, dropout=0.1 if variant == "paper" else 0.0)
        c.sample.respacing, c.sample.sampler = (
            ("27", "ddim") if variant == "paper" else ("7", "ddpm")
        )
    elif variant == "tiny":
        m.low_res_size = 16
        m.unet = sr_unet(64, 32, (1, 2), 1)
        c.sample.respacing, c.sample.sampler = "7", "ddpm"
    else:
        raise ValueError(f"unknown upsample256 variant {variant!r}: paper, karlo or tiny")
    c.diffusion = diffusion("cosine", learned_sigma=False)
    return training(c, variant == "tiny", "upsampler", lr=1.2e-4, batch_size=1024,
                    steps=1_000_000)  # fmt: skip
