"""OpenAI's CLIP ViT-L/14 (CLIP paper, Tables 19-20; `openai/clip-vit-large-patch14`), the CLIP
that Karlo's unCLIP reproduction (and diffusers' UnCLIPPipeline) is built on (SPEC 3.1, 4).

Variants:
  default   image 224, patch 14, vision 24 layers x 1024 wide x 16 heads; text 12 x 768 x 12,
            context 77; joint embedding 768; 427,616,513 parameters (= transformers' CLIPModel)
  tiny      for tests

    config, params = unclip_jax.convert.clip.load_hf_clip("path/to/clip-vit-large-patch14")
    unclip-jax train --config clip_vit_l14:tiny      (training arrives with the training issue)
"""

import ml_collections
from clip_common import common, model, optim, text, tiny_model, tiny_optim, tokenizer, vision


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    if arg is None:
        c.model = model(text(768, 12, 12), vision(224, 14, 1024, 24, 16), 768, remat=True)
        c.optim = optim(4e-4)
        c.tokenizer = tokenizer()
    elif arg == "tiny":
        c.model = tiny_model()
        c.optim = tiny_optim()
        c.tokenizer = tokenizer(context_length=16, vocab_size=1024)
    else:
        raise ValueError(f"unknown clip_vit_l14 variant {arg!r}: tiny or none")
    return common(c)
