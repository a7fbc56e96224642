"""unCLIP's 64x64 decoder (SPEC 3.4, 4.3): a GLIDE UNet conditioned on a CLIP image embedding.

Variants:
  paper   the paper's decoder: GLIDE's 3.5B architecture (512 channels, text transformer 2048
          wide, 24 layers, 32 heads, context 256) with the CLIP ViT-H/16 embedding (1024) added to
          the timestep embedding and projected into 4 extra context tokens; Table 3's optimizer
          (lr 1.2e-4, batch 2048, 800K steps, EMA 0.9999, dropout 0.1); 250 sampling steps.
          Drops: image embedding 10% (sec. 2.1; sec. 5.1 says 5%, SPEC 7.1), caption 50%.
          3,565,435,398 parameters (UNet 2,238,164,486, text transformer 1,312,577,536, CLIP
          projections 14,693,376); the paper says 3.5B.
  karlo   Karlo's decoder_900M_vit_l (diffusers' unCLIP decoder + text_proj): 320 channels, no
          trainable text transformer; CLIP ViT-L/14 text embedding (768) into the time embedding,
          its 77 token features through Linear + LayerNorm to 1536-wide context tokens.
          893,318,086 parameters. Drops: image 10%, caption 30% (Karlo's config). Samples with
          50 steps and guidance 8.0 (Karlo's template). Optimizer unpublished: Table 3's.
  tiny    32 px, "clip" pathway with the tiny CLIP's sizes (embedding 32, text width 64,
          context 16): for tests and the CPU demo
  tiny_glide  32 px, "glide" pathway (GLIDE's tiny byte-level text transformer)

    unclip-jax train --config decoder64:tiny --workdir runs/decoder_tiny

The null branch of classifier-free guidance is the learned null image embedding with an empty
caption ("glide": all padding; "clip": CLIP features of the empty prompt).
"""

import ml_collections
from glide_common import text, tiny_text, tiny_unet, unet
from unclip_common import diffusion, training


def get_config(arg=None):
    variant = arg or "karlo"
    c = ml_collections.ConfigDict()
    m = c.model = ml_collections.ConfigDict()
    m.remat = False
    m.clip_tokens = 4
    c.train = ml_collections.ConfigDict()
    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddpm"  # ancestral with the learned variance
    if variant == "paper":
        m.text_pathway, m.clip_dim = "glide", 1024
        m.text = text(width=2048, layers=24, heads=32, text_ctx=256)
        m.encoder_channels = m.text.width
        m.unet = unet(64, 3, 512, (1, 2, 3, 4), 3, dropout=0.1)
        m.remat = True
        c.train.image_drop, c.train.caption_drop = 0.1, 0.5
        c.sample.respacing, c.sample.guidance_scale = "250", 1.25  # 1.25: the MS-COCO FID table
    elif variant == "karlo":
        m.text_pathway, m.clip_dim, m.text_dim, m.text_ctx = "clip", 768, 768, 77
        m.encoder_channels = 1536
        m.unet = unet(64, 3, 320, (1, 2, 3, 4), 3, dropout=0.1)
        c.train.image_drop, c.train.caption_drop = 0.1, 0.3
        c.sample.respacing, c.sample.guidance_scale = "50", 8.0
    elif variant == "tiny":
        m.text_pathway, m.clip_dim, m.text_dim, m.text_ctx = "clip", 32, 64, 16
        m.encoder_channels = 32
        m.unet = tiny_unet(32, 3)
        c.train.image_drop, c.train.caption_drop = 0.1, 0.5
        c.sample.respacing, c.sample.guidance_scale = "25", 3.0
    elif variant == "tiny_glide":
        m.text_pathway, m.clip_dim = "glide", 32
        m.text = tiny_text()
        m.encoder_channels = m.text.width
        m.unet = tiny_unet(32, 3)
        c.train.image_drop, c.train.caption_drop = 0.1, 0.5
        c.sample.respacing, c.sample.guidance_scale = "25", 3.0
    else:
        raise ValueError(f"unknown decoder64 variant {variant!r}: paper, karlo, tiny, tiny_glide")
    c.diffusion = diffusion("cosine", learned_sigma=True)
    return training(c, variant.startswith("tiny"), "decoder", lr=1.2e-4, batch_size=2048,
                    steps=800_000)  # fmt: skip
