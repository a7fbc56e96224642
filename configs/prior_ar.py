"""unCLIP's autoregressive prior (SPEC 3.3): PCA codes of the CLIP image embedding, predicted by a
causal transformer after the caption, the CLIP text embedding and a dot-product token.

Variants:
  paper  Table 3: 1B parameters (one causal transformer of the latent decoder's size, width 1664,
         24 layers, 26 heads, over 256 caption tokens + 2 + 318 codes: 888.0M parameters, see
         unclip_jax/models/ar_prior.py), 319 PCA components of a 1024-d CLIP embedding, 1024
         buckets, AdamW lr 1.6e-4, beta2 0.91, eps 1e-10, WD 4e-2, batch 4096, 1M iterations,
         EMA 0.999, conditioning dropped 10%, dot-product token at the 50th percentile
  tiny   for tests and the CPU demo (16 components, 64 buckets)

    unclip-jax train --config prior_ar:tiny --workdir runs/prior_ar_tiny
"""

import ml_collections
from glide_common import training


def get_config(arg=None):
    variant = arg or "paper"
    c = ml_collections.ConfigDict()
    m = c.model = ml_collections.ConfigDict()
    if variant == "paper":
        m.clip_dim = 1024  # the unCLIP CLIP's embedding (SPEC 3.1)
        m.vocab_size, m.text_ctx = 49408, 256  # CLIP BPE ids, the paper's text context
        m.n_components, m.n_buckets, m.n_dot_bins = 319, 1024, 1024
        m.width, m.layers, m.heads = 1664, 24, 26
        m.remat = True
    elif variant == "tiny":
        m.clip_dim = 32
        # The tiny CLIP's trained BPE (1024 ids) and context (16): the prior reads CLIP's token ids.
        m.vocab_size, m.text_ctx = 1024, 16
        m.n_components, m.n_buckets, m.n_dot_bins = 16, 64, 16
        m.width, m.layers, m.heads = 64, 2, 2
        m.remat = False
    else:
        raise ValueError(f"unknown prior_ar variant {variant!r}: paper or tiny")
    m.dtype = "float32" if variant == "tiny" else "bfloat16"  # compute; params stay float32
    c.train = ml_collections.ConfigDict()
    c.train.cond_drop = 0.1  # caption, text embedding and dot token dropped together (SPEC 3.2/3.3)
    c.sample = ml_collections.ConfigDict()
    c.sample.guidance_scale = 1.0  # the paper's FID table guides only the decoder (SPEC 3.4)
    c.sample.temperature = 1.0
    c.sample.top_k = 0  # 0 = off
    c.sample.dot_percentile = 50.0  # the best of 50/70/85/95 in the paper
    training(c, variant == "tiny", batch_size=4096, steps=1_000_000)
    c.kind = "ar_prior"
    o = c.optim
    o.lr, o.b1, o.b2, o.eps, o.weight_decay = 1.6e-4, 0.9, 0.91, 1e-10, 4e-2
    o.ema_decay = 0.999
    if variant == "tiny":
        o.lr, o.ema_decay, o.batch_size, o.steps = 1e-3, 0.99, 16, 30
    return c
