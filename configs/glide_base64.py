"""GLIDE's 64x64 text-conditional base model (SPEC 2.3).

Variants:
  filtered (default)  the released `base.pt`: 385,030,726 parameters
  paper               the paper's 3.5B model: 512 channels, text transformer 2048 wide, 24 layers,
                      32 heads, context 256 (context and heads from unCLIP's Table 3; vocabulary
                      assumed to be the released tokenizer's)
  tiny                for tests

    unclip-jax train --config glide_base64:tiny --workdir runs/glide_tiny   (30 steps on CPU)
"""

import ml_collections
from glide_common import diffusion, text, tiny_text, tiny_unet, training, unet


def get_config(arg=None):
    variant = arg or "filtered"
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.mode = "base"
    c.model.remat = False
    if variant == "filtered":
        c.model.text = text()
        c.model.unet = unet(64, 3, 192, (1, 2, 3, 4), 3)
    elif variant == "paper":
        c.model.text = text(width=2048, layers=24, heads=32, text_ctx=256)
        c.model.unet = unet(64, 3, 512, (1, 2, 3, 4), 3)
        c.model.remat = True
    elif variant == "tiny":
        c.model.text = tiny_text()
        c.model.unet = tiny_unet(16, 3)
    else:
        raise ValueError(f"unknown glide_base64 variant {variant!r}: filtered, paper or tiny")
    c.diffusion = diffusion("cosine")
    c.train = ml_collections.ConfigDict()
    c.train.caption_drop = 0.2  # empty caption 20% of the time, for classifier-free guidance
    c.sample = ml_collections.ConfigDict()
    c.sample.respacing = "100"
    c.sample.guidance_scale = 3.0
    return training(c, variant.startswith("tiny"))
