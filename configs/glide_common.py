"""Shared pieces of the GLIDE configs (SPEC 2.3): the released filtered models, the paper's 3.5B
base and the tiny test models. Imported by configs/glide_*.py."""

import ml_collections


def text(vocab_size=50257, text_ctx=128, width=512, layers=16, heads=8):
    c = ml_collections.ConfigDict()
    c.vocab_size = vocab_size  # GPT-2 BPE (50257 tokens); no start/end tokens, pad id 50256
    c.pad_id = vocab_size - 1
    c.text_ctx = text_ctx
    c.width = width
    c.layers = layers
    c.heads = heads
    c.final_ln = True
    c.padding_embedding = True
    return c


def unet(image_size, in_channels, model_channels, channel_mult, num_res_blocks,
         attention_resolutions="32,16,8", dropout=0.1, num_head_channels=64):  # fmt: skip
    c = ml_collections.ConfigDict()
    c.image_size = image_size
    c.in_channels = in_channels
    c.out_channels = 6  # eps (3) + learned-range variance (3)
    c.model_channels = model_channels
    c.channel_mult = channel_mult
    c.num_res_blocks = num_res_blocks
    c.attention_resolutions = attention_resolutions
    c.num_head_channels = num_head_channels
    c.dropout = dropout
    c.use_scale_shift_norm = True
    c.resblock_updown = True
    c.middle_attention = True
    return c


def diffusion(schedule):
    c = ml_collections.ConfigDict()
    c.schedule = schedule
    c.num_timesteps = 1000
    c.mean_type = "epsilon"
    c.var_type = "learned_range"
    c.loss_type = "rescaled_mse"  # the hybrid loss: MSE + VB term with lambda = 0.001
    return c


def tiny_text():
    # A byte-level vocabulary (256 bytes + pad) keeps tests free of tokenizer files.
    return text(vocab_size=257, text_ctx=16, width=32, layers=2, heads=2)


def tiny_unet(image_size, in_channels):
    return unet(image_size, in_channels, 32, (1, 2), 1, attention_resolutions=str(image_size // 2),
                dropout=0.0, num_head_channels=32)  # fmt: skip


def training(c, tiny: bool, *, batch_size=2048, steps=2_500_000, sharding_rules="fsdp"):
    """Sections for `unclip-jax train`. GLIDE's optimizer settings are unpublished (SPEC 7.10):
    these are guided-diffusion's (AdamW lr 1e-4, no weight decay, EMA 0.9999) with the paper's
    batch 2048 and 2.5M iterations for the base model."""
    c.kind = "glide"
    c.seed = 0
    # Compute dtype (bf16 on accelerators); params, optimizer state, norms and losses are float32.
    c.model.dtype = "float32" if tiny else "bfloat16"
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    c.sharding_rules = sharding_rules
    o = c.optim = ml_collections.ConfigDict()
    o.lr, o.b1, o.b2, o.eps, o.weight_decay = 1e-4, 0.9, 0.999, 1e-8, 0.0
    o.grad_clip, o.warmup_steps, o.schedule = 1.0, 0, "constant"
    o.ema_decay, o.batch_size, o.steps, o.accum_steps = 0.9999, batch_size, steps, 1
    c.train.log_every = 100
    c.train.max_nonfinite_in_row = 20
    # Held-out loss on the validation split and EMA sample grids (kinds that offer them).
    c.train.eval_every, c.train.eval_batches = 5000, 8
    c.train.sample_every, c.train.sample_respacing = 10_000, "25"
    c.train.tensorboard = True
    k = c.ckpt = ml_collections.ConfigDict()
    k.save_every, k.keep, k.keep_every, k.init_from = 5000, 3, 100_000, ""
    d = c.data = ml_collections.ConfigDict()
    d.name, d.dir, d.config, d.split = "shapes", "outputs/data", "default", "train"
    # data.name "image_text": your pairs (a folder of images + .txt captions, a CSV/parquet table
    # or webdataset tar shards), built under data.dir on first use (train.kinds.data_source).
    d.source = ""
    # GPT-2's BPE from the run's tokenizer/ (or ckpt.init_from's); without one, a GPT-2-style BPE
    # learned on the captions (train.kinds.glide_tokenizer_for_run).
    d.tokenizer = "gpt2_bpe"
    d.embeddings = ""  # unCLIP kinds: the CLIP side dataset written by `unclip-jax data embed`
    if tiny:
        o.lr, o.ema_decay, o.batch_size, o.steps = 1e-3, 0.99, 16, 30
        c.train.log_every = 5
        c.train.eval_every, c.train.eval_batches = 15, 1
        c.train.sample_every, c.train.sample_respacing = 30, "10"
        k.save_every, k.keep_every = 10, 0
        d.config, d.tokenizer = "tiny", "bytes"
        c.sharding_rules = "data_parallel"
    return c
