"""Shared pieces of the CLIP configs (SPEC 2.6 and 3.1): tower shapes as the papers' tables give
them, CLIP's training recipe (CLIP paper, Table 19) and the tiny test models.
Imported by configs/clip_*.py and configs/noised_clip_b64.py."""

import math

import ml_collections

# Sharding rules (logical name -> mesh axes); names not listed are replicated. The batch splits
# over data x fsdp, weights over fsdp along the model width and over tensor along heads / MLP.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def text(width, layers, heads, vocab_size=49408, context_length=77, activation="quick_gelu"):
    c = ml_collections.ConfigDict()
    c.vocab_size = vocab_size  # CLIP's BPE: 49,152 merges + 256 bytes x 2 + sot + eot
    c.context_length = context_length
    c.width = width
    c.layers = layers
    c.heads = heads
    c.mlp_dim = 4 * width
    c.activation = activation
    c.layer_norm_eps = 1e-5
    c.eos_token_id = 49407  # <|endoftext|> in CLIP's vocabulary
    c.eot_pooling = "first_eos"
    return c


def vision(image_size, patch_size, width, layers, heads, activation="quick_gelu",
           num_timesteps=None, normalize_input=False):  # fmt: skip
    c = ml_collections.ConfigDict()
    c.image_size = image_size
    c.patch_size = patch_size
    c.channels = 3
    c.width = width
    c.layers = layers
    c.heads = heads
    c.mlp_dim = 4 * width
    c.activation = activation
    c.layer_norm_eps = 1e-5
    c.num_timesteps = num_timesteps
    c.normalize_input = normalize_input
    return c


def model(text_cfg, vision_cfg, projection_dim, *, dtype="bfloat16", remat=False):
    c = ml_collections.ConfigDict()
    c.text = text_cfg
    c.vision = vision_cfg
    c.projection_dim = projection_dim
    c.logit_scale_init = math.log(1 / 0.07)  # temperature 0.07
    c.learn_logit_scale = True
    c.max_logit_scale = 100.0
    c.remat = remat
    c.dtype = dtype  # compute; params, norms, softmax and the loss stay float32
    c.param_dtype = "float32"
    return c


def optim(lr, batch_size=32768, steps=None, weight_decay=0.2):
    """CLIP paper Table 19: AdamW (0.9, 0.98, 1e-6), decay 0.2, 2000 warmup steps, cosine decay,
    32 epochs of 400M pairs at batch 32,768 (~390K steps). Keys as train.state.make_optimizer
    reads them, with CLIP's no-decay-on-gains-and-biases mask (decay_matrices_only)."""
    c = ml_collections.ConfigDict()
    c.batch_size = batch_size
    c.steps = steps if steps is not None else 32 * 400_000_000 // batch_size
    c.total_steps = c.get_ref("steps")  # the cosine schedule's length
    c.lr = lr
    c.b1 = 0.9
    c.b2 = 0.98
    c.eps = 1e-6
    c.weight_decay = weight_decay
    c.decay_matrices_only = True
    c.warmup_steps = 2000
    c.schedule = "cosine"
    c.grad_clip = 0.0  # none in the paper
    c.ema_decay = 0.0  # no EMA in CLIP's recipe (the shared step's EMA then equals the params)
    return c


def tokenizer(path=None, context_length=77, vocab_size=49408):
    c = ml_collections.ConfigDict()
    c.path = (
        path  # a CLIPTokenizer folder; None: train a BPE on the captions (tokenizers.train_bpe)
    )
    c.context_length = context_length
    c.vocab_size = vocab_size  # for a trained BPE: at most this many ids
    return c


def common(c, tiny: bool = False):
    """Mesh, sharding and the sections `unclip-jax train` reads (kind "clip": contrastive
    training on an image-text source with a BPE trained on its captions when no tokenizer folder
    is given), shared by every CLIP config."""
    c.kind = "clip"
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    # The tiny models are replicated (data parallel); ConfigDict fields keep their first type.
    c.sharding_rules = "data_parallel" if tiny else SHARDING_RULES
    c.seed = 0
    c.train = ml_collections.ConfigDict()
    c.train.log_every, c.train.max_nonfinite_in_row = 100, 20
    # A retrieval grid (held-out captions -> their top images, train/unclip_hooks.py) and its
    # top-1 rate every sample_every steps.
    c.train.sample_every = 10_000
    c.train.tensorboard = True
    k = c.ckpt = ml_collections.ConfigDict()
    k.save_every, k.keep, k.keep_every, k.init_from = 5000, 3, 100_000, ""
    d = c.data = ml_collections.ConfigDict()
    d.name, d.dir, d.config, d.split = "shapes", "outputs/data", "default", "train"
    # data.name "image_text": your pairs (a folder of images + .txt captions, a CSV/parquet table
    # or webdataset tar shards), built under data.dir on first use (train.kinds.data_source).
    d.source = ""
    d.bpe_captions = 5000  # captions the BPE is trained on (the first of the split)
    if tiny:
        c.train.log_every, k.save_every, k.keep_every, d.config = 10, 50, 0, "tiny"
        c.train.sample_every = 50
    return c


def tiny_model(num_timesteps=None):
    """~0.2M parameters: what the tests train on CPU in seconds."""
    t = text(64, 2, 4, vocab_size=1024, context_length=16)
    # A BPE trained by tokenizers.train_bpe puts <|endoftext|> last, at the largest id in use.
    t.eot_pooling = "argmax"
    v = vision(16, 4, 64, 2, 4, num_timesteps=num_timesteps,
               normalize_input=num_timesteps is not None)  # fmt: skip
    if num_timesteps is not None:
        t.activation = v.activation = "gelu"
    return model(t, v, 32, dtype="float32")


def tiny_optim():
    c = optim(4e-3, batch_size=64, steps=100, weight_decay=0.0)
    c.warmup_steps = 10
    return c
