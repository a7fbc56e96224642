"""GLIDE's noise-aware CLIP ViT-B at 64x64 (SPEC 2.6; the released `clip/config.yaml`), the
classifier of GLIDE's CLIP guidance.

Variants:
  default   image 64, patch 4 (256 patches), vision 12 layers x 768 (12 heads of 64); text 12 x 512
            (8 heads of 64), context 77, embedding table 65,536; joint embedding 512; GELU; the
            class token replaced by a learned embedding of t (1000 x 768); inputs x_t in [-1, 1]
            normalised inside the tower; logit scale fixed at 100. Trained on images noised with
            the base model's schedule (cosine, 1000 steps); 390K iterations at batch 32K (paper
            B.1; learning rate not given, CLIP's ViT-B one assumed). 158,138,625 parameters with
            transformers-style biases (GLIDE's f_k has none: 12 x 768 + 12 x 512 fewer there).
  tiny      for tests

    unclip-jax train --config noised_clip_b64:tiny --workdir runs/noised_clip
    unclip-jax sample "a red circle" --base runs/glide --clip-guidance runs/noised_clip
"""

import math

import ml_collections
from clip_common import common, model, optim, text, tiny_model, tiny_optim, tokenizer, vision


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    if arg is None:
        t = text(512, 12, 8, vocab_size=65536, activation="gelu")
        v = vision(64, 4, 768, 12, 12, activation="gelu", num_timesteps=1000,
                   normalize_input=True)  # fmt: skip
        c.model = model(t, v, 512)
        c.model.logit_scale_init = math.log(100.0)
        c.model.learn_logit_scale = False
        c.optim = optim(5e-4, steps=390_000)
        c.tokenizer = tokenizer()
    elif arg == "tiny":
        # The tiny model learns its logit scale from CLIP's 1/0.07: fixed at 100 from step 0, a
        # 0.3M-parameter CLIP stays near chance for the few hundred steps a test can afford.
        c.model = tiny_model(num_timesteps=1000)
        c.optim = tiny_optim()
        c.tokenizer = tokenizer(context_length=16, vocab_size=1024)
    else:
        raise ValueError(f"unknown noised_clip_b64 variant {arg!r}: tiny or none")
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"  # the GLIDE base model's (squaredcos_cap_v2)
    c.diffusion.num_timesteps = 1000
    c.guidance = ml_collections.ConfigDict()
    c.guidance.scale = 3.0  # GLIDE notebook (paper human evals: 2.0)
    return common(c, arg == "tiny")
