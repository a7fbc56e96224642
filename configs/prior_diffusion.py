"""unCLIP's diffusion prior: CLIP text -> CLIP image embedding (SPEC 3.2, 4.1, 4.2, 5).

Variants:
  paper (default)  the paper's prior: width 2048, 24 blocks, 32 heads, CLIP dim 1024, text context
                   256 (Table 3), inputs L2-normalised x 17.2, learned null text (dropped 10%),
                   64 steps, best of 2; AdamW lr 1.1e-4, betas 0.9/0.96, eps 1e-6, WD 6e-2,
                   EMA 0.9999, batch 4096, 600K steps. 1,225,926,656 parameters.
  karlo            Karlo's released prior (= diffusers' PriorTransformer): 20 blocks, CLIP ViT-L/14
                   (768), 77 tokens, per-dimension standardisation with stored clip_mean/clip_std
                   (frozen in training), text drop 0.2 (its config), x_0 clamp 10, 25 steps, best
                   of 1, guidance 4. 1,022,030,080 parameters. Karlo's optimizer is unpublished:
                   the paper's values are used.
  tiny, tiny_karlo for tests and CPU demos (the two conditioning/scaling conventions)

Choices (SPEC 7.2-7.5): the paper's own caption encoder is replaced by CLIP per-token text features
padded to the 256-slot context (padding is masked out); the paper's Analytic-DPM sampling by the
ancestral sampler with the fixed small variance; the paper states no x_0 clamp (none here); the
paper guided only the decoder in its evaluation, so its prior guidance defaults to 1 (unguided).

    unclip-jax train --config prior_diffusion:tiny --workdir runs/prior_tiny
"""

import ml_collections
from glide_common import training


def model(clip_dim, text_dim, text_ctx, width, layers, heads, scaling, learned_null):
    c = ml_collections.ConfigDict()
    c.clip_dim = clip_dim  # D: CLIP image / text embedding
    c.text_dim = text_dim  # Dt: CLIP per-token text features
    c.text_ctx = text_ctx
    c.width = width
    c.layers = layers
    c.heads = heads
    c.scaling = scaling  # "l2" (x 17.2, the paper) or "standardize" (Karlo's clip_mean/clip_std)
    c.scale = 17.2
    c.learned_null = learned_null
    c.remat = False
    return c


def get_config(arg=None):
    variant = arg or "paper"
    c = ml_collections.ConfigDict()
    if variant == "paper":
        c.model = model(1024, 1024, 256, 2048, 24, 32, "l2", True)
        c.model.remat = True
    elif variant == "karlo":
        c.model = model(768, 768, 77, 2048, 20, 32, "standardize", False)
        c.model.remat = True
    elif variant == "tiny":
        # The tiny CLIP's sizes (configs/clip_common.py tiny_model): embedding 32, text width 64,
        # context 16, so the tiny unCLIP stack composes.
        c.model = model(32, 64, 16, 32, 2, 2, "l2", True)
    elif variant == "tiny_karlo":
        c.model = model(32, 64, 16, 32, 2, 2, "standardize", False)
    else:
        raise ValueError(f"unknown prior_diffusion variant {variant!r}: paper, karlo, tiny or "
                         "tiny_karlo")  # fmt: skip
    karlo = variant in ("karlo", "tiny_karlo")
    tiny = variant.startswith("tiny")

    d = c.diffusion = ml_collections.ConfigDict()
    d.schedule = "cosine"  # squaredcos_cap_v2
    d.num_timesteps = 1000
    d.mean_type = "start_x"  # x_0 prediction
    d.var_type = "fixed_small"  # Karlo's sigma_small
    d.loss_type = "mse"

    c.train = ml_collections.ConfigDict()
    c.train.text_drop = 0.2 if karlo else 0.1

    s = c.sample = ml_collections.ConfigDict()
    s.sampler = "ddpm"
    s.respacing = "25" if karlo else "64"
    s.num_candidates = 1 if karlo else 2
    s.clamp = 10.0 if karlo else None  # on the standardised x_0 (Karlo's denoised_fn)
    s.guidance_scale = 4.0 if karlo else 1.0
    if tiny:
        s.respacing = "8"

    training(c, tiny, batch_size=4096, steps=600_000)
    c.kind = "prior"
    o = c.optim
    o.b2, o.eps, o.weight_decay, o.ema_decay = 0.96, 1e-6, 6e-2, 0.9999
    if not tiny:
        o.lr = 1.1e-4
    # The stored dataset statistics are never trained (nor decayed).
    o.frozen_params = ("clip_mean", "clip_std") if c.model.scaling == "standardize" else ()
    if tiny:
        o.ema_decay = 0.99
    return c
