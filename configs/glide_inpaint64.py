"""GLIDE's 64x64 inpainting base model (SPEC 2.3, 2.5): the base model with 4 extra input
channels, [x_t, image * mask, mask] (mask = 1 on known pixels).

Variants:
  filtered (default)  the released `base_inpaint.pt`: 385,037,638 parameters
  tiny                for tests

Sampling as in the released notebook: 100 ancestral steps, guidance 5.0, the known pixels put back
into every predicted x0 (denoised_fn).
"""

import ml_collections
from glide_common import diffusion, text, tiny_text, tiny_unet, training, unet


def get_config(arg=None):
    variant = arg or "filtered"
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.mode = "inpaint"
    c.model.remat = False
    if variant == "filtered":
        c.model.text = text()
        c.model.unet = unet(64, 7, 192, (1, 2, 3, 4), 3)
    elif variant == "tiny":
        c.model.text = tiny_text()
        c.model.unet = tiny_unet(16, 7)
    else:
        raise ValueError(f"unknown glide_inpaint64 variant {variant!r}: filtered or tiny")
    c.diffusion = diffusion("cosine")
    c.train = ml_collections.ConfigDict()
    c.train.caption_drop = 0.2
    c.sample = ml_collections.ConfigDict()
    c.sample.respacing = "100"
    c.sample.guidance_scale = 5.0
    return training(c, variant.startswith("tiny"))
