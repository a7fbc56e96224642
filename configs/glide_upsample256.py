"""GLIDE's text-conditional 64 -> 256 upsampler (SPEC 2.3, 2.4).

The low-resolution image is upsampled bilinearly inside the model and concatenated to x_t.
Variants:
  filtered (default)  the released `upsample.pt`: 398,361,286 parameters
  inpaint             the released `upsample_inpaint.pt`: 398,368,198 parameters
                      ([x_t, image * mask, mask, upsampled low-res] = 10 channels)
  tiny, tiny_inpaint  for tests
The paper's 1.5B upsampler is not offered: the paper gives only its width (384 channels, text
width 1024); depth, attention and text-transformer shape are unpublished (SPEC 7.9).

Sampling as released: "fast27" respacing, DDIM (eta 0), no guidance, initial noise * 0.997.
"""

import ml_collections
from glide_common import diffusion, text, tiny_text, tiny_unet, training, unet


def get_config(arg=None):
    variant = arg or "filtered"
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.remat = False
    inpaint = variant in ("inpaint", "tiny_inpaint")
    c.model.mode = "upsample_inpaint" if inpaint else "upsample"
    in_channels = 10 if inpaint else 6
    if variant in ("filtered", "inpaint"):
        c.model.text = text()
        c.model.unet = unet(256, in_channels, 192, (1, 1, 2, 2, 4, 4), 2)
        c.model.low_res_size = 64
    elif variant in ("tiny", "tiny_inpaint"):
        c.model.text = tiny_text()
        c.model.unet = tiny_unet(32, in_channels)
        c.model.low_res_size = 16
    else:
        raise ValueError(
            f"unknown glide_upsample256 variant {variant!r}: filtered, inpaint, tiny, tiny_inpaint"
        )
    c.train = ml_collections.ConfigDict()
    c.train.caption_drop = 0.0  # the released upsampler is sampled without guidance
    c.diffusion = diffusion("linear")
    c.sample = ml_collections.ConfigDict()
    c.sample.respacing = "fast27"
    c.sample.sampler = "ddim"
    c.sample.temperature = 0.997
    return training(c, variant.startswith("tiny"), batch_size=512, steps=1_600_000)
