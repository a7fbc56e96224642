"""Toy 2-D diffusion: a class-conditional MLP on a ring of 8 Gaussians, with the hybrid loss.

The diffusion core's end-to-end check (`unclip-jax demo`): it exercises the cosine schedule, the
learned-range variance with the hybrid loss, caption-style condition dropout for classifier-free
guidance, and every sampler. Not a paper model.

    unclip-jax demo --config toy2d            # about a minute on 2 CPU cores
    unclip-jax demo --config toy2d:tiny       # what the tests run
    unclip-jax train --config toy2d:tiny --workdir runs/toy   # through the shared training loop
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.kind = "toy2d"
    c.seed = 0
    # Mesh axes (data, fsdp, tensor); -1 takes the remaining devices. Rules: a preset name of
    # unclip_jax.parallel.RULE_PRESETS or a list of (logical name, mesh axes) pairs.
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    c.sharding_rules = "data_parallel"

    c.data = ml_collections.ConfigDict()
    c.data.num_modes = 8
    c.data.radius = 0.75
    c.data.mode_std = 0.06

    c.model = ml_collections.ConfigDict()
    c.model.hidden = 128
    c.model.depth = 3

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000
    c.diffusion.mean_type = "epsilon"
    c.diffusion.var_type = "learned_range"
    c.diffusion.loss_type = "rescaled_mse"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-3
    c.optim.batch_size = 512
    c.optim.steps = 3000
    c.optim.steps_per_call = 200  # train steps per jitted lax.scan
    c.optim.cond_drop = 0.2  # class label replaced by the null label (for CFG), as GLIDE's 20%
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.ema_decay = 0.999

    c.train = ml_collections.ConfigDict()
    c.train.log_every = 50
    c.train.max_nonfinite_in_row = 20
    c.train.eval_every = 500  # held-out loss of params and EMA params (0: off)
    c.train.eval_batches = 4
    c.train.sample_every = 1000  # a PNG grid from the EMA params in workdir/samples (0: off)
    c.train.tensorboard = True  # event files in workdir/tensorboard (tensorboardX)

    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.save_every = 500
    c.ckpt.keep = 3
    c.ckpt.keep_every = 0  # also keep every N-th step (0: off)
    c.ckpt.init_from = ""  # a checkpoint folder to take params from when the workdir is empty

    c.sample = ml_collections.ConfigDict()
    c.sample.per_class = 64
    c.sample.guidance_scales = (0.0, 1.0, 2.0, 4.0)
    c.sample.samplers = (("ddpm", "100"), ("ddim", "ddim50"), ("dpm++2m", "20"))
    # The training loop's sample grids (train.sample_every): one tile per class.
    c.sample.grid_sampler = ("ddim", "ddim25")
    c.sample.grid_per_class = 128
    c.sample.grid_guidance = 2.0

    if arg == "tiny":
        c.model.hidden = 32
        c.model.depth = 1
        c.optim.steps = 40
        c.optim.steps_per_call = 20
        c.optim.batch_size = 64
        c.train.log_every = 5
        c.train.eval_every = 20
        c.train.eval_batches = 1
        c.train.sample_every = 40
        c.ckpt.save_every = 10
        c.sample.per_class = 4
        c.sample.guidance_scales = (0.0, 3.0)
        c.sample.samplers = (("ddpm", "10"), ("ddim", "ddim10"), ("dpm++2m", "10"))
        c.sample.grid_sampler = ("ddim", "ddim10")
        c.sample.grid_per_class = 16
    elif arg is not None:
        raise ValueError(f"unknown toy2d variant {arg!r}; expected 'tiny' or none")
    return c
