"""The shapes demo's longer recipe: the same stages as configs/shapes_demo.py (read it first), with
the 50k `shapes` split, wider models between the tiny test sizes and paper scale, and ~10-40x the
steps. Hours on 2 CPU cores; minutes on one GPU (the shared loop and samplers are the same).

    unclip-jax demo --config shapes_quality --out outputs/demo_quality

Sizes: CLIP 32 px (patch 4), both towers 128 wide x 4 layers, joint embedding 64; diffusion prior
256 wide x 6 blocks; AR prior 256 x 4 over 32 PCA codes; decoder and GLIDE UNets 64 channels,
mult (1, 2, 2), 2 blocks per level, attention at 16 and 8 px; upsampler 64 channels, 2 blocks.
The priors and the decoder read the CLIP's sizes (clip_dim 64, text width 128) through overrides.
"""

import ml_collections
from shapes_demo import GLIDE_32PX, stage
from shapes_demo import get_config as demo_config

CLIP_SIZES = ("model.projection_dim=64", "model.vision.image_size=32",
              "model.vision.width=128", "model.vision.layers=4", "model.vision.heads=4",
              "model.vision.mlp_dim=512", "model.text.width=128", "model.text.layers=4",
              "model.text.heads=4", "model.text.mlp_dim=512")  # fmt: skip
UNET = ("model.unet.model_channels=64", "model.unet.channel_mult=(1, 2, 2)",
        "model.unet.num_res_blocks=2", "model.unet.attention_resolutions='16,8'",
        "model.unet.num_head_channels=32")  # fmt: skip


def get_config(arg=None):
    if arg not in (None, "default"):
        raise ValueError(f"unknown shapes_quality variant {arg!r}: only the default")
    c = demo_config("default")
    c.variant = "quality"
    c.data.config = "default"  # 50k train images
    s = c.stages
    s.clip = stage("clip_vit_b32:tiny", 5000, 256, 1e-3, "optim.warmup_steps=200", *CLIP_SIZES)
    s.prior = stage("prior_diffusion:tiny", 10_000, 256, 3e-4, "model.clip_dim=64",
                    "model.text_dim=128", "model.width=256", "model.layers=6", "model.heads=4",
                    "optim.ema_decay=0.999")  # fmt: skip
    s.ar_prior = stage("prior_ar:tiny", 10_000, 256, 3e-4, "model.clip_dim=64",
                       "model.n_components=32", "model.width=256", "model.layers=4",
                       "model.heads=4", "optim.ema_decay=0.999")  # fmt: skip
    s.decoder = stage("decoder64:tiny", 20_000, 64, 3e-4, "model.clip_dim=64",
                      "model.text_dim=128", "model.encoder_channels=64", *UNET,
                      "optim.ema_decay=0.999")  # fmt: skip
    s.upsampler = stage("upsample256:tiny", 5000, 32, 3e-4, "model.low_res_size=32",
                        "train.crop_fraction=0.5", "model.unet.model_channels=64",
                        "model.unet.num_res_blocks=2", "optim.ema_decay=0.999")  # fmt: skip
    s.glide = stage("glide_base64:tiny", 20_000, 64, 3e-4, *GLIDE_32PX, *UNET,
                    "model.text.width=128", "model.text.layers=4", "model.text.heads=4",
                    "optim.ema_decay=0.999")  # fmt: skip
    c.embed_batch_size = 512

    p = c.sample
    p.per_prompt = 8
    p.decoder_steps = p.glide_steps = 50

    a = c.ablation
    a.decoder_scales = a.glide_scales = (1.0, 2.0, 4.0)
    a.samples_per_prompt = 4
    a.decoder_steps = a.glide_steps = 50
    a.upsample = True
    return ml_collections.ConfigDict(c)
