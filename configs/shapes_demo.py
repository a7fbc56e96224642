"""The embedded default (`make demo`, DESIGN.md): the unCLIP + GLIDE stack on `shapes`, on CPU.

One config describes every stage of unclip_jax/demo/shapes.py: the data split, per model the
config it starts from (`name:variant`), its steps / batch / learning rate and any further
"key=value" overrides, then the prompts, the sampling settings and the ablation grid. Models run
at 32 px (the upsampler goes 32 -> 64); the shapes images are 64 px.

Variants:
  default  the demo, aimed at <= 16 minutes on 2 CPU cores; `shapes` small (10k train images).
           Measured on a shared, heavily loaded 2-core machine: 23.6 CPU-minutes in all, the
           decoder and GLIDE (~1.7 CPU-s per step at batch 16) ~55% of it; a rerun: ~4 s.
  mini     for tests/test_demo.py: a few steps each, `shapes` tiny, two prompts

    unclip-jax demo                                   (= make demo; outputs in outputs/demo)
    unclip-jax demo --config shapes_demo:mini --out /tmp/demo_mini
    unclip-jax demo --set stages.decoder.steps=2000   (a rerun resumes the decoder from its run)

The longer recipe (hours on CPU, minutes on a GPU) is configs/shapes_quality.py.
"""

import ml_collections

# Held out of training: purple triangle, yellow square, cyan circle (unclip_jax/data/shapes.py).
SEEN_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle")
HELD_OUT_PROMPTS = ("a purple triangle", "a yellow square", "a cyan circle")
# GLIDE's tiny base at 32 px, attention at 16 px.
GLIDE_32PX = ("model.unet.image_size=32", "model.unet.attention_resolutions='16'")
# GLIDE reads captions through a GPT-2-style BPE learned on the training captions (the run's
# tokenizer/; GPT-2's own files are not at hand), not the tiny configs' bytes: one token per word
# (the longest caption is 12 tokens, ~50 bytes). With bytes, the 2-layer text transformer trained
# for 1000 steps barely used the caption: x0 error at t = 900 with the true caption 0.066, with
# the empty one 0.071; colour right in 19% of samples, about chance.
GLIDE_BPE = ("data.tokenizer='gpt2_bpe'", "model.text.vocab_size=512", "model.text.pad_id=511",
             "model.text.text_ctx=16")  # fmt: skip
# The pixel diffusion models (decoder, upsampler, GLIDE) predict v = sqrt(abar) eps -
# sqrt(1 - abar) x_0 instead of the papers' eps: a departure for CPU-sized training, measured.
# With eps, a model trained for 60-1000 steps does not learn the near-identity eps(x_t) ~ x_t that
# the first steps from pure noise need (abar_T = 2.4e-9 on the cosine schedule: x_0 = (x_t -
# sqrt(1 - abar) eps) / sqrt(abar) multiplies its error by 2e4), so sampling commits to a random
# saturated background in the first ~10% of the chain. Background off the data's grey by 60-110 of
# 255 with eps (GLIDE after 200 and after 1000 steps; the upsampler, even though its low-resolution
# input shows the colours: 74-90 after the demo's 60 steps over a v decoder's 3-7), by 3 with v.
VELOCITY = ("diffusion.mean_type='velocity'",)
# Measured on a whole default run (2-core CPU, 2026-12-06, /usr/bin/time -v and du): peak RSS
# 2.17 GB, <out> 0.19 GB (data included); a run asks for 1.5x each before it starts.
MEMORY_GB, DISK_GB = 3.3, 0.3


def stage(config, steps, batch_size, lr, *overrides):
    """One training stage: start from `config`, then optim.{steps,batch_size,lr} and overrides."""
    s = ml_collections.ConfigDict()
    s.config = config
    s.steps = steps
    s.batch_size = batch_size
    s.lr = lr
    s.overrides = tuple(overrides)
    return s


def get_config(arg=None):
    variant = arg or "default"
    if variant not in ("default", "mini"):
        raise ValueError(f"unknown shapes_demo variant {variant!r}: default or mini")
    mini = variant == "mini"
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0
    c.data = ml_collections.ConfigDict()
    c.data.config = "tiny" if mini else "small"  # small: 10k train images, built in ~10 s
    c.data.dir = ""  # "": <out>/data
    # What a fresh run needs, checked before it starts (demo.shapes.preflight): the measured peak
    # memory (RSS) and the size of <out> after a whole run, each with a margin.
    c.needs = ml_collections.ConfigDict()
    c.needs.memory_gb, c.needs.disk_gb = MEMORY_GB, DISK_GB

    s = c.stages = ml_collections.ConfigDict()
    # The tiny CLIP (16 px, patch 4, width 64, 2 layers): colours first, shapes later. At 32 px a
    # step costs ~4x more CPU (measured), which the budget cannot carry.
    s.clip = stage("clip_vit_b32:tiny", 300, 64, 2e-3, "optim.warmup_steps=30")
    s.prior = stage("prior_diffusion:tiny", 400, 128, 1e-3)
    s.ar_prior = stage("prior_ar:tiny", 400, 128, 1e-3)
    # The UNets are where the time goes (~1-2 CPU-s per step at batch 32, measured): the tiny
    # UNet (32 channels, 1 block per level) at batch 16.
    s.decoder = stage("decoder64:tiny", 200, 16, 1e-3, *VELOCITY)
    # 32 -> 64: the tiny SR UNet fed the 32 px image (crops of half the side, 32 px, from 16 px).
    s.upsampler = stage("upsample256:tiny", 60, 8, 1e-3, "model.low_res_size=32",
                        "train.crop_fraction=0.5", *VELOCITY)  # fmt: skip
    s.glide = stage("glide_base64:tiny", 200, 16, 1e-3, *GLIDE_32PX, *GLIDE_BPE, *VELOCITY)
    c.embed_batch_size = 256

    p = c.sample = ml_collections.ConfigDict()
    p.prompts = SEEN_PROMPTS + HELD_OUT_PROMPTS
    p.held_out = HELD_OUT_PROMPTS
    p.per_prompt = 4
    p.prior = "diffusion"
    p.prior_guidance = 1.0
    p.decoder_steps = 25
    p.decoder_guidance = 3.0
    p.upsample = True
    p.glide_steps = 25
    p.glide_guidance = 3.0

    a = c.ablation = ml_collections.ConfigDict()
    a.enabled = True
    a.prompts = ("a red circle", "a blue square", "a purple triangle", "a cyan circle")
    a.prior_types = ("diffusion", "ar", "none")
    a.decoder_scales = (1.0, 3.0)
    a.prior_scales = (1.0,)
    a.glide_scales = (1.0, 3.0)
    a.samples_per_prompt = 2
    a.decoder_steps = 15
    a.glide_steps = 15
    a.upsample = False  # faithfulness is read at 32 px as well; saves compiling the upsampler again

    # The prior's case (demo.shapes.prior_eval_stage): cosine of each prior's sampled embedding,
    # of the caption's text embedding and of the split's mean image embedding with the true image
    # embeddings of the splits' first `captions` examples. Embeddings only: seconds.
    v = c.prior_eval = ml_collections.ConfigDict()
    v.enabled = True
    v.splits = ("validation", "test_compositional")
    v.captions = 64
    v.priors = ("diffusion", "ar")

    # Faithfulness on the validation / test_compositional splits' own captions (the quality recipe
    # turns it on; the demo's 16-minute budget leaves it off).
    e = c.split_eval = ml_collections.ConfigDict()
    e.enabled = False
    e.splits = ("validation", "test_compositional")
    e.captions = 64  # per split: the first `captions` examples, sampled once each per pipeline
    e.batch = 32
    e.steps = 25
    e.priors = ("diffusion", "ar")  # one unCLIP row per prior: the paper's prior comparison
    e.zero_shot = 256  # one-object images per split for CLIP's zero-shot colour and shape
    e.probe_train = 1024  # one-object train images the colour and shape linear probes fit on

    if mini:
        tiny_data = ("optim.warmup_steps=1",)
        s.clip = stage("clip_vit_b32:tiny", 3, 16, 2e-3, *tiny_data)
        s.prior = stage("prior_diffusion:tiny", 2, 8, 1e-3)
        s.ar_prior = stage("prior_ar:tiny", 2, 8, 1e-3)
        s.decoder = stage("decoder64:tiny", 2, 8, 1e-3, *VELOCITY)
        s.upsampler = stage("upsample256:tiny", 2, 8, 1e-3, "model.low_res_size=32", *VELOCITY)
        s.glide = stage("glide_base64:tiny", 2, 8, 1e-3, *GLIDE_32PX, *GLIDE_BPE, *VELOCITY)
        c.embed_batch_size = 64
        p.prompts = ("a red circle", "a purple triangle")
        p.held_out = ("a purple triangle",)
        p.per_prompt = 1
        p.decoder_steps = p.glide_steps = 2
        a.prompts = ("a red circle",)
        a.prior_types = ("diffusion", "none")
        a.decoder_scales = (1.0, 3.0)
        a.glide_scales = (1.0, 3.0)  # batch 2 as in the sample stage: its samplers are reused
        a.samples_per_prompt = 1
        a.decoder_steps = a.glide_steps = 2
        e.enabled = True
        e.captions, e.batch, e.steps = 4, 2, 2  # batch 2 as in the sample stage
        e.zero_shot = 8
        e.probe_train = 32
        v.captions = 2  # batch 2 as in the sample stage: its compiled priors and CLIP are reused
        c.needs.memory_gb, c.needs.disk_gb = 1.5, 0.2
    return c
