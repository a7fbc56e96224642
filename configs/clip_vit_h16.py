"""The unCLIP paper's CLIP ViT-H/16 (SPEC 3.1; never released).

Variants:
  default   image 256, patch 16, vision 32 layers x 1280 wide (16 heads of 80); text 24 x 1024
            (16 heads), context 77; joint embedding 1024 ("319 principal components out of the
            original 1,024"); 986,339,841 parameters. Trained with lr 3e-4 and SAM (rho 0.1),
            otherwise CLIP's recipe. SAM is not implemented: the optimizer here is plain AdamW.
  tiny      for tests

    unclip-jax train --config clip_vit_h16:tiny      (training arrives with the training issue)
"""

import ml_collections
from clip_common import common, model, optim, text, tiny_model, tiny_optim, tokenizer, vision


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    if arg is None:
        c.model = model(text(1024, 24, 16), vision(256, 16, 1280, 32, 16), 1024, remat=True)
        c.optim = optim(3e-4)
        c.optim.sam_rho = 0.1  # the paper's; not implemented (recorded for the record)
        c.tokenizer = tokenizer()
    elif arg == "tiny":
        c.model = tiny_model()
        c.optim = tiny_optim()
        c.tokenizer = tokenizer(context_length=16, vocab_size=1024)
    else:
        raise ValueError(f"unknown clip_vit_h16 variant {arg!r}: tiny or none")
    return common(c)
