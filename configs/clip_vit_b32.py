"""OpenAI's CLIP ViT-B/32 (CLIP paper, Tables 19-20; `openai/clip-vit-base-patch32`).

Variants:
  default   image 224, patch 32, vision 12 layers x 768 wide x 12 heads; text 12 x 512 x 8,
            context 77; joint embedding 512; 151,277,313 parameters (= transformers' CLIPModel)
  tiny      for tests

    config, params = unclip_jax.convert.clip.load_hf_clip("path/to/clip-vit-base-patch32")
    unclip-jax train --config clip_vit_b32:tiny --workdir runs/clip_tiny   (on shapes, CPU)
"""

import ml_collections
from clip_common import common, model, optim, text, tiny_model, tiny_optim, tokenizer, vision


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    if arg is None:
        c.model = model(text(512, 12, 8), vision(224, 32, 768, 12, 12), 512)
        c.optim = optim(5e-4)
        c.tokenizer = tokenizer()
    elif arg == "tiny":
        c.model = tiny_model()
        c.optim = tiny_optim()
        c.tokenizer = tokenizer(context_length=16, vocab_size=1024)
    else:
        raise ValueError(f"unknown clip_vit_b32 variant {arg!r}: tiny or none")
    return common(c, arg == "tiny")
