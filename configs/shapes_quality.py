"""The shapes demo's longer recipe: the same stages and model family as configs/shapes_demo.py
(read it first), trained on the 50k `shapes` split for 5-30x the demo's examples per model, then
measured on captions of the `validation` and `test_compositional` splits (`split_eval`).

    unclip-jax demo --config shapes_quality --out outputs/demo_quality

Sized for what 2 CPU cores can train in about 6.5 hours (measured: ~30 GFLOP/s on the tiny UNet's
train step, 1.6-2.2 s per step at batch 32), so it is a *reduced* recipe, not the one a GPU would
run:
- CLIP: the demo's tiny tower (16 px, patch 4, width 64, 2 layers), 1500 steps at batch 128
  (a 400-step trial: loss 1.8 against ln 128 = 4.85 at the start);
- diffusion and AR priors: 96 wide x 4 layers (the demo's: 32 x 2 and 64 x 2), 1500 steps at
  batch 128 each;
- decoder and GLIDE base: the tiny UNet (32 channels) with a third level, channel_mult (1, 2, 2)
  and attention at 8 px (the same step time as the demo's two levels) at batch 32, 4000 steps
  each (128k examples). Measured on validation / test_compositional captions, whole caption:
  unCLIP 0.27 / 0.14 at 1000 decoder steps (blobs), 0.39 / 0.11 at 2000, 0.52 / 0.22 at 3000,
  0.53 / 0.22 at 4000 (level with the decoder from true image embeddings, 0.53 / 0.36: the
  decoder has converged for this CLIP); GLIDE 0.09 / 0.09 at 1000, 0.20 / 0.11 at 2000,
  0.39 / 0.27 at 3000, 0.45 / 0.38 at 4000;
  GLIDE's text transformer 64 wide, over a BPE learned on the captions (shapes_demo.GLIDE_BPE);
- upsampler 32 -> 64: 300 steps at batch 16;
- the decoder, upsampler and GLIDE predict v rather than the papers' eps (shapes_demo.VELOCITY
  says why, with the numbers);
- EMA 0.995 everywhere (a horizon of ~200 steps; 0.9999 would still hold the initial weights);
- measured by split_eval: the first 64 captions of `validation` and of `test_compositional`,
  one sample each per pipeline at guidance 3, 25 steps, read at 32 px.
The run resumes stage by stage (and within a stage from its last quarter) after an interruption.
"""

import ml_collections
from shapes_demo import GLIDE_32PX, GLIDE_BPE, VELOCITY, stage
from shapes_demo import get_config as demo_config

UNET = ("model.unet.channel_mult=(1, 2, 2)", "model.unet.attention_resolutions='8'")
PRIOR = ("model.width=96", "model.layers=4", "model.heads=3")
EMA = "optim.ema_decay=0.995"


def get_config(arg=None):
    if arg not in (None, "default"):
        raise ValueError(f"unknown shapes_quality variant {arg!r}: only the default")
    c = demo_config("default")
    c.variant = "quality"
    c.data.config = "default"  # 50k train images
    s = c.stages
    s.clip = stage("clip_vit_b32:tiny", 1500, 128, 1e-3, "optim.warmup_steps=100")
    s.prior = stage("prior_diffusion:tiny", 1500, 128, 1e-3, *PRIOR, EMA)
    s.ar_prior = stage("prior_ar:tiny", 1500, 128, 1e-3, *PRIOR, EMA)
    s.decoder = stage("decoder64:tiny", 4000, 32, 1e-3, *UNET, *VELOCITY, EMA)
    s.upsampler = stage("upsample256:tiny", 300, 16, 1e-3, "model.low_res_size=32",
                        "train.crop_fraction=0.5", *VELOCITY, EMA)  # fmt: skip
    s.glide = stage("glide_base64:tiny", 4000, 32, 1e-3, *GLIDE_32PX, *GLIDE_BPE, *UNET, *VELOCITY,
                    "model.text.width=64", EMA)  # fmt: skip
    c.embed_batch_size = 512

    # Sampling as in the demo (4 per prompt, 25 steps): the measurement is split_eval's.
    a = c.ablation
    a.decoder_scales = a.glide_scales = (1.0, 3.0, 5.0)
    a.prior_scales = (1.0, 3.0)  # prior guidance too (the unCLIP paper guides its priors)
    a.samples_per_prompt = 4
    a.decoder_steps = a.glide_steps = 25

    e = c.split_eval
    e.enabled = True
    e.captions, e.batch, e.steps = 64, 32, 25
    return ml_collections.ConfigDict(c)
