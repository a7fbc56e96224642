"""bench-karlo-small (shared/BENCHMARKS.md): a scaled-down Karlo stack, unclip-jax vs diffusers.

    .venv/bin/python benchmarks/bench_karlo_small.py [--quick] [--out PATH]

The reference stack (CLIPTextModelWithProjection, PriorTransformer, UnCLIPTextProjModel, the
UNet2DConditionModel decoder, the UNet2DModel super-res pair and three UnCLIPSchedulers) is built
in diffusers/transformers with seeded random weights and saved as a diffusers UnCLIPPipeline
folder (safetensors). Both sides then load that folder as a user would: diffusers with
`UnCLIPPipeline.from_pretrained`, unclip-jax through its converters. In one run it measures, float32
on the CPU:

1. Sampling, batch 4: prior 25 steps (guidance 4), decoder 25 steps (guidance 8), super-res
   7 steps (super_res_first, then super_res_last for the final step, as Karlo). Ours: one jitted
   ancestral sampler per stage on the UnCLIPScheduler's timestep grid (create_diffusion with
   use_timesteps), classifier-free guidance batched. Reference: the UnCLIPPipeline call, per
   stage timed from its progress-bar hooks. Both sides start from the same latents and add the
   same per-step noise (the scheduler's noise draw is replaced by ours), so whole chains compare;
   one denoiser call per network at fixed inputs is compared too.
2. Training, batch 8 at 64x64: one AdamW step of the decoder (text projection + UNet) on the hybrid
   loss (eps MSE + the learned-range VB term). Ours: make_train_step + compile_train_step (jitted,
   donated). Reference: the same math written here in torch (forward, backward, clipping, AdamW,
   EMA). The loss and gradient norm at fixed inputs are compared.

Timings are medians of repeats (steady state; JAX compile time apart). Results:
benchmarks/results/karlo_small_cpu.json.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import pathlib
import platform
import tempfile
import time

import harness
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import torch.nn.functional as F

from unclip_jax import compile_cache, diffusion
from unclip_jax.convert.clip import load_hf_clip
from unclip_jax.convert.diffusers_prior import load_diffusers_prior
from unclip_jax.convert.diffusers_unclip import load_diffusers_decoder, load_diffusers_upsampler
from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.gaussian import schedule_arrays
from unclip_jax.models.clip import clip_from_config
from unclip_jax.models.decoder import null_cond
from unclip_jax.models.prior import unscale_image_embedding
from unclip_jax.pipelines.prior import conditioning, null_conditioning
from unclip_jax.pipelines.unclip import ClipEncoder
from unclip_jax.tokenizers import ClipTokenizer, train_bpe
from unclip_jax.train.state import TrainState, make_optimizer
from unclip_jax.train.step import compile_train_step, make_train_step
from unclip_jax.train.unclip import decoder_loss

OUT = pathlib.Path(__file__).parent / "results" / "karlo_small_cpu.json"
PROMPTS = ["a red cube on a table", "a watercolour fox", "two cats asleep", "a city at night"]
BATCH, TRAIN_BATCH = 4, 8
STEPS = {"prior": 25, "decoder": 25, "super_res": 7}
GUIDANCE = {"prior": 4.0, "decoder": 8.0}
# Karlo's decoder recipe (configs/decoder64.py): AdamW, clip 1, EMA 0.9999, drops 0.1 / 0.5.
OPTIM = dict(lr=1.2e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
             warmup_steps=0, schedule="constant", ema_decay=0.9999)  # fmt: skip
IMAGE_DROP, CAPTION_DROP = 0.1, 0.5


# ------------------------------------------------------------------------------------------------
# The reference stack, random weights, saved as a diffusers pipeline folder.


def build_reference(folder: pathlib.Path) -> None:
    """BENCHMARKS.md's bench-karlo-small stack with seeded random weights, saved to `folder`."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    # A small BPE (ids well inside CLIP's 49408) stands in for OpenAI's vocabulary, which is not
    # available offline; the text tower keeps the full 49408-row embedding table.
    corpus = PROMPTS * 4 + ["a photo of a dog", "an oil painting of a boat", "a small house"]
    tok = train_bpe(corpus, vocab_size=600, context_length=77, min_frequency=1)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=77, projection_dim=256,
        bos_token_id=tok.sot_id, eos_token_id=tok.eot_id, pad_token_id=tok.pad_id,
    ))  # fmt: skip
    prior = PriorTransformer(
        num_attention_heads=4, attention_head_dim=64, num_layers=4, embedding_dim=256,
        num_embeddings=77, additional_embeddings=4,
    )  # fmt: skip
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=256,
                                    time_embed_dim=256, cross_attention_dim=256)  # fmt: skip
    decoder = UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=6, layers_per_block=2,
        block_out_channels=(64, 128, 192, 256),
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=256,
        attention_head_dim=32, class_embed_type="identity", resnet_time_scale_shift="scale_shift",
    )  # fmt: skip
    super_res = [
        UNet2DModel(sample_size=128, in_channels=6, out_channels=3, layers_per_block=2,
                    block_out_channels=(32, 64, 96, 128),
                    down_block_types=("ResnetDownsampleBlock2D",) * 4,
                    up_block_types=("ResnetUpsampleBlock2D",) * 4, add_attention=False)
        for _ in range(2)
    ]  # fmt: skip
    # Every weight random and non-zero: diffusers' zero inits (positional and prediction
    # embeddings, the null image embedding) would hide mapping errors.
    with torch.no_grad():
        for module in (text_encoder, prior, text_proj, decoder, *super_res):
            for name, p in module.named_parameters():
                if name == "clip_std":
                    p.copy_(0.5 + torch.rand_like(p))
                else:
                    p.add_(0.02 * torch.randn_like(p))
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tok.hf,
        text_proj=text_proj, super_res_first=super_res[0], super_res_last=super_res[1],
        **reference_schedulers(),
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)


def reference_schedulers() -> dict:
    """Karlo's three UnCLIPSchedulers, keyed as UnCLIPPipeline names them."""
    from diffusers import UnCLIPScheduler

    return {
        "prior_scheduler": UnCLIPScheduler(variance_type="fixed_small_log",
                                           prediction_type="sample", clip_sample_range=5.0),
        "decoder_scheduler": UnCLIPScheduler(variance_type="learned_range",
                                             prediction_type="epsilon"),
        "super_res_scheduler": UnCLIPScheduler(variance_type="fixed_small_log",
                                               prediction_type="epsilon"),
    }  # fmt: skip


def load_reference(folder: pathlib.Path):
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    # diffusers 0.42's UnCLIPPipeline.from_pretrained cannot resolve the deprecated
    # UnCLIPTextProjModel named in model_index.json (not even when passed in), so each component
    # is loaded from its subfolder and the pipeline assembled from them.
    classes = dict(
        prior=PriorTransformer, decoder=UNet2DConditionModel, text_proj=UnCLIPTextProjModel,
        super_res_first=UNet2DModel, super_res_last=UNet2DModel,
        text_encoder=CLIPTextModelWithProjection, tokenizer=CLIPTokenizer,
        prior_scheduler=UnCLIPScheduler, decoder_scheduler=UnCLIPScheduler,
        super_res_scheduler=UnCLIPScheduler,
    )  # fmt: skip
    parts = {name: cls.from_pretrained(folder / name) for name, cls in classes.items()}
    pipe = UnCLIPPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    for name in ("text_encoder", "prior", "text_proj", "decoder", "super_res_first",
                 "super_res_last"):  # fmt: skip
        getattr(pipe, name).eval()
    return pipe


# ------------------------------------------------------------------------------------------------
# Our stack, from the same folder through the converters.


def _apply(model, params, x, t, cond):
    return model.apply({"params": params}, x, t, cond)


def _super_res_apply(model, params, x, t, cond):
    # Karlo runs super_res_last for the final step only (t = 0): pick the weights by timestep.
    return jax.lax.cond(t[0] == 0, lambda: _apply(model, params["last"], x, t, cond),
                        lambda: _apply(model, params["first"], x, t, cond))  # fmt: skip


class Ours:
    """unclip-jax's stack loaded from the diffusers folder, one jitted sampler per stage."""

    def __init__(self, folder: pathlib.Path, timesteps: dict, *, context_length: int = 77,
                 low_res_size: int = 64, dtype=jnp.float32):  # fmt: skip
        config, clip_params = load_hf_clip(folder / "text_encoder")
        tokenizer = ClipTokenizer.from_pretrained(folder / "tokenizer",
                                                  context_length=context_length)  # fmt: skip
        self.clip = ClipEncoder(clip_from_config(config, towers="text", dtype=dtype), clip_params,
                                tokenizer)  # fmt: skip
        self.prior, self.prior_params = load_diffusers_prior(folder / "prior", dtype=dtype)
        self.decoder, self.decoder_params = load_diffusers_decoder(folder, dtype=dtype)
        self.super_res, first = load_diffusers_upsampler(folder / "super_res_first",
                                                         low_res_size=low_res_size,
                                                         dtype=dtype)  # fmt: skip
        _, last = load_diffusers_upsampler(folder / "super_res_last", low_res_size=low_res_size,
                                           dtype=dtype)  # fmt: skip
        self.super_res_params = {"first": first, "last": last}
        # The UnCLIPScheduler grids, kept exactly (use_timesteps).
        grid = functools.partial(diffusion.create_diffusion, "cosine", 1000)
        self.tables = {
            "prior": grid(use_timesteps=timesteps["prior"], mean_type="start_x"),
            "decoder": grid(use_timesteps=timesteps["decoder"], var_type="learned_range"),
            "super_res": grid(use_timesteps=timesteps["super_res"]),
        }
        # One function object per stage: the samplers take model_fn as a static argument.
        self.fns = {
            "prior": functools.partial(_apply, self.prior),
            "decoder": functools.partial(_apply, self.decoder),
            "super_res": functools.partial(_super_res_apply, self.super_res),
        }

    def text(self, prompts):
        text = self.clip.text(prompts)
        empty = {k: v[0] for k, v in self.clip.text([""]).items()}
        return text, empty

    def sample_prior(self, text, empty, x_T, rng):
        cond = conditioning(self.prior, text["text_emb"], text["text_tokens"], text["text_mask"])
        null = null_conditioning(self.prior, cond, empty)
        scale = jnp.full((x_T.shape[0],), GUIDANCE["prior"], jnp.float32)
        x0 = diffusion.p_sample_loop(self.fns["prior"], self.tables["prior"], self.prior_params,
                                     x_T, rng, cond, null_cond=null, guidance_scale=scale,
                                     clip_denoised=True, clip_range=5.0)  # fmt: skip
        return unscale_image_embedding(self.prior, self.prior_params, x0)

    def sample_decoder(self, image_emb, text, empty, x_T, rng):
        b = image_emb.shape[0]
        cond = {"image_emb": image_emb, "drop_image": jnp.zeros((b,), bool),
                **{k: text[k] for k in ("text_emb", "text_tokens", "text_mask")}}  # fmt: skip
        null = null_cond(cond, null_text=empty)
        scale = jnp.full((b,), GUIDANCE["decoder"], jnp.float32)
        return diffusion.p_sample_loop(self.fns["decoder"], self.tables["decoder"],
                                       self.decoder_params, x_T, rng, cond, null_cond=null,
                                       guidance_scale=scale, clip_denoised=True)  # fmt: skip

    def sample_super_res(self, low_res, x_T, rng):
        cond = {"low_res": jnp.clip(low_res, -1.0, 1.0)}
        return diffusion.p_sample_loop(self.fns["super_res"], self.tables["super_res"],
                                       self.super_res_params, x_T, rng, cond,
                                       clip_denoised=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Shared noise: the initial latents and every ancestral step's noise, as our samplers draw them.


def step_noise(rng, table, shape) -> list[np.ndarray]:
    """Our p_sample_loop's noise in the order diffusers' scheduler asks for it (t > 0 steps)."""
    n = table.num_timesteps
    return [np.asarray(diffusion.step_noise(rng, i, shape)) for i in range(n - 1, 0, -1)]


def nchw(x) -> torch.Tensor:
    x = np.asarray(x)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x))


class NoiseFeed:
    """Replaces diffusers' UnCLIPScheduler noise draw with a queue of given arrays."""

    def __init__(self):
        import diffusers.schedulers.scheduling_unclip as module

        self.module, self.original, self.queue = module, module.randn_tensor, collections.deque()

    def __enter__(self):
        def draw(shape, **kwargs):
            x = self.queue.popleft()
            assert tuple(x.shape) == tuple(shape), (x.shape, shape)
            return x.to(kwargs.get("dtype") or torch.float32)

        self.module.randn_tensor = draw
        return self

    def __exit__(self, *exc):
        self.module.randn_tensor = self.original
        assert not self.queue, f"{len(self.queue)} noise arrays left unused"


class StageClock:
    """Wraps the pipeline's progress_bar to time its three denoising loops."""

    def __init__(self, pipe):
        self.marks = []
        pipe.progress_bar = self._bar

    def _bar(self, iterable=None, total=None):
        self.marks.append(("start", time.perf_counter()))
        yield from iterable
        self.marks.append(("end", time.perf_counter()))

    def stages(self, call_start: float, call_end: float) -> dict:
        """Seconds per stage; gaps between loops go to the stage that follows them (the text
        projection to the decoder, the low-res upscale to super-res), text before the prior."""
        (_, p0), (_, p1), (_, d0), (_, d1), (_, s0), (_, s1) = self.marks[-6:]
        del d0, s0
        return {"text": p0 - call_start, "prior": p1 - p0, "decoder": d1 - p1,
                "super_res": s1 - d1, "end_to_end": call_end - call_start}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Agreement of single network calls at fixed inputs.


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def denoiser_agreement(ours: Ours, pipe, text, empty) -> dict:
    """Max |ours - diffusers| / max |diffusers| of each network once, at the same inputs."""
    g = np.random.default_rng(5)
    out = {}
    tok = ours.clip.tokenizer(PROMPTS)
    with torch.no_grad():
        ref = pipe.text_encoder(torch.from_numpy(tok.input_ids.astype(np.int64)))
    out["text_encoder_embeds"] = rel_err(text["text_emb"], ref.text_embeds)
    out["text_encoder_hidden"] = rel_err(text["text_tokens"], ref.last_hidden_state)

    # Prior: [cond; null] at two timesteps, as one guided step sees it.
    cond = conditioning(ours.prior, text["text_emb"], text["text_tokens"], text["text_mask"])
    null = null_conditioning(ours.prior, cond, empty)
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, null)
    x = g.standard_normal((2 * BATCH, 256)).astype(np.float32)
    t = np.array([999, 500, 41, 0] * 2)
    mine = ours.fns["prior"](ours.prior_params, jnp.asarray(x), jnp.asarray(t), both)
    with torch.no_grad():
        theirs = pipe.prior(torch.from_numpy(x), torch.from_numpy(t),
                            proj_embedding=torch.from_numpy(np.array(both["text_emb"])),
                            encoder_hidden_states=torch.from_numpy(np.array(both["text_tokens"])),
                            attention_mask=torch.from_numpy(np.array(both["text_mask"])),
                            ).predicted_image_embedding  # fmt: skip
    out["prior"] = rel_err(mine, theirs)

    # Decoder: text projection + UNet on [cond; null] (diffusers' order is [null; cond]).
    image_emb = g.standard_normal((BATCH, 256)).astype(np.float32)
    dcond = {"image_emb": jnp.asarray(image_emb), "drop_image": jnp.zeros((BATCH,), bool),
             **{k: text[k] for k in ("text_emb", "text_tokens", "text_mask")}}  # fmt: skip
    dnull = null_cond(dcond, null_text=empty)
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), dcond, dnull)
    x = g.standard_normal((2 * BATCH, 64, 64, 3)).astype(np.float32)
    t = np.array([999, 624, 208, 0] * 2)
    mine = ours.fns["decoder"](ours.decoder_params, jnp.asarray(x), jnp.asarray(t), both)
    with torch.no_grad():
        swap = lambda a: torch.cat([a[BATCH:], a[:BATCH]])  # noqa: E731
        ctx, emb = pipe.text_proj(
            image_embeddings=torch.from_numpy(image_emb),
            prompt_embeds=swap(torch.from_numpy(np.array(both["text_emb"]))),
            text_encoder_hidden_states=swap(torch.from_numpy(np.array(both["text_tokens"]))),
            do_classifier_free_guidance=True,
        )
        mask = F.pad(swap(torch.from_numpy(np.array(both["text_mask"]))), (4, 0), value=True)
        theirs = pipe.decoder(swap(nchw(x)), swap(torch.from_numpy(t)), encoder_hidden_states=ctx,
                              class_labels=emb, attention_mask=mask).sample  # fmt: skip
    out["decoder"] = rel_err(mine, swap(theirs).numpy().transpose(0, 2, 3, 1))

    # Super-res, both models: [x_t, bicubic(low_res)].
    low = np.clip(g.standard_normal((BATCH, 64, 64, 3)), -1, 1).astype(np.float32)
    x = g.standard_normal((BATCH, 128, 128, 3)).astype(np.float32)
    for name, t_val in (("first", 500), ("last", 0)):
        t = np.full((BATCH,), t_val)
        mine = _apply(ours.super_res, ours.super_res_params[name], jnp.asarray(x),
                      jnp.asarray(t), {"low_res": jnp.asarray(low)})  # fmt: skip
        with torch.no_grad():
            up = F.interpolate(nchw(low), size=[128, 128], mode="bicubic", align_corners=False,
                               antialias=True)  # fmt: skip
            net = getattr(pipe, f"super_res_{name}")
            theirs = net(torch.cat([nchw(x), up], 1), torch.from_numpy(t)).sample
        out[f"super_res_{name}"] = rel_err(mine, theirs.numpy().transpose(0, 2, 3, 1))
    return out


# ------------------------------------------------------------------------------------------------
# Sampling: whole chains, both sides, the same latents and noise.


def compile_seconds(before: dict) -> float:
    """Tracing + lowering + XLA compile seconds since the `compile_cache.stats()` `before`."""
    after = compile_cache.stats()
    return sum(after[k] - before[k] for k in ("trace_s", "lower_s", "backend_s"))


def stage_summary(runs: list[dict], stage: str) -> dict:
    """harness.summarise over one stage's seconds; a run's validity is its whole call's."""
    return harness.summarise([r["probe"] | {"s": r[stage]} for r in runs])


def bench_sampling(ours: Ours, pipe, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    latents = {
        "prior": rng.standard_normal((BATCH, 256)).astype(np.float32),
        "decoder": rng.standard_normal((BATCH, 64, 64, 3)).astype(np.float32),
        "super_res": rng.standard_normal((BATCH, 128, 128, 3)).astype(np.float32),
    }
    keys = {k: jax.random.key(10 + i) for i, k in enumerate(STEPS)}
    shapes = {k: v.shape for k, v in latents.items()}

    # --- ours: the stages composed on the host, each timed up to its result (a stage needs the
    # previous one's output anyway, so the syncs cost nothing).
    def run_ours():
        marks = [time.perf_counter()]
        text, empty = jax.block_until_ready(ours.text(PROMPTS))
        marks.append(time.perf_counter())
        z = ours.sample_prior(text, empty, jnp.asarray(latents["prior"]), keys["prior"])
        z.block_until_ready()
        marks.append(time.perf_counter())
        x = ours.sample_decoder(z, text, empty, jnp.asarray(latents["decoder"]), keys["decoder"])
        x.block_until_ready()
        marks.append(time.perf_counter())
        y = ours.sample_super_res(x, jnp.asarray(latents["super_res"]), keys["super_res"])
        images = np.asarray(jnp.clip(y * 0.5 + 0.5, 0.0, 1.0))
        marks.append(time.perf_counter())
        names = ("text", "prior", "decoder", "super_res")
        times = {n: b - a for n, a, b in zip(names, marks[:-1], marks[1:], strict=True)}
        return {"image_emb": z, "decoder": x, "images": images}, times | {
            "end_to_end": marks[-1] - marks[0]
        }

    # The first call compiles (not timed); compile seconds from jax.monitoring, per stage from
    # the first call's excess over the steady state.
    before = compile_cache.stats()
    outs, first = run_ours()
    compile_s = compile_seconds(before)
    print(f"ours, first run (compiles {compile_s:.0f} s):",
          {k: round(v, 1) for k, v in first.items()}, flush=True)  # fmt: skip
    final_ours = outs["images"]

    # --- diffusers: the pipeline call, the same latents and per-step noise.
    noise = {k: step_noise(keys[k], ours.tables[k], shapes[k]) for k in STEPS}
    clock = StageClock(pipe)
    generator = torch.Generator().manual_seed(0)

    def run_ref():
        with NoiseFeed() as feed:
            for k in STEPS:
                feed.queue.extend(nchw(n) for n in noise[k])
            start = time.perf_counter()
            images = pipe(PROMPTS, prior_latents=nchw(latents["prior"]),
                          decoder_latents=nchw(latents["decoder"]),
                          super_res_latents=nchw(latents["super_res"]), generator=generator,
                          prior_num_inference_steps=STEPS["prior"],
                          decoder_num_inference_steps=STEPS["decoder"],
                          super_res_num_inference_steps=STEPS["super_res"],
                          prior_guidance_scale=GUIDANCE["prior"],
                          decoder_guidance_scale=GUIDANCE["decoder"],
                          output_type="np").images  # fmt: skip
            return images, clock.stages(start, time.perf_counter())

    # A first, untimed call (torch warm-up) keeps the intermediates for the comparison.
    intermediates, remove_hooks = capture_intermediates(pipe)
    final_ref, ref_first = run_ref()
    remove_hooks()
    print("diffusers, first run, s:", {k: round(v, 1) for k, v in ref_first.items()}, flush=True)

    # --- timed: interleaved rounds after the quiet gate.
    gate = harness.quiet_gate("sampling")
    ours_runs, ref_runs = [], []
    for _ in range(repeats):
        (_, times), probe = harness.timed(run_ours)
        ours_runs.append(times | {"probe": probe})
        (_, times), probe = harness.timed(run_ref)
        ref_runs.append(times | {"probe": probe})
        print(
            "  round:",
            {k: round(v, 2) for k, v in ours_runs[-1].items() if k != "probe"},
            {k: round(v, 2) for k, v in ref_runs[-1].items() if k != "probe"},
            flush=True,
        )

    agreement = {
        "image_emb_max_rel_diff": rel_err(outs["image_emb"], intermediates["image_emb"]),
        "decoder_64px_max_abs_diff": float(
            np.abs(
                np.clip(np.asarray(outs["decoder"]), -1, 1)
                - intermediates["decoder"].transpose(0, 2, 3, 1)
            ).max()
        ),  # fmt: skip
        "final_128px_max_abs_diff": float(np.abs(final_ours - final_ref).max()),
        "final_128px_mean_abs_diff": float(np.abs(final_ours - final_ref).mean()),
    }
    stages = []
    for stage in ("text", "prior", "decoder", "super_res", "end_to_end"):
        jx, tr = stage_summary(ours_runs, stage), stage_summary(ref_runs, stage)
        stages.append({
            "stage": stage, "steps": STEPS.get(stage), "jax": jx, "torch": tr,
            "torch_over_jax": harness.ratio(tr, jx),
            "jax_first_call_s": first[stage], "torch_first_call_s": ref_first[stage],
            "jax_first_call_excess_s": first[stage] - (jx["median_s"] or float("nan")),
        })  # fmt: skip
    valid = harness.section_valid(gate, *(s[side] for s in stages for side in ("jax", "torch")))
    return {"gate": gate, "valid": valid, "repeats": repeats, "jax_compile_s": compile_s,
            "stages": stages, "chain_agreement": agreement}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Where the sampler's time goes (issue 20, section 2): one decoder forward on both sides, our
# 25-step loop against the same steps as a Python loop of jitted single steps, and the 3x3
# convolutions alone.


def decoder_inputs(ours: Ours, text, empty, seed: int = 5):
    """A guided decoder call's inputs at batch 2 x BATCH: ([cond; null], x, t) in our layout."""
    g = np.random.default_rng(seed)
    image_emb = jnp.asarray(g.standard_normal((BATCH, 256)).astype(np.float32))
    cond = {"image_emb": image_emb, "drop_image": jnp.zeros((BATCH,), bool),
            **{k: text[k] for k in ("text_emb", "text_tokens", "text_mask")}}  # fmt: skip
    null = null_cond(cond, null_text=empty)
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, null)
    x = jnp.asarray(g.standard_normal((2 * BATCH, 64, 64, 3)).astype(np.float32))
    t = jnp.asarray(np.array([999, 624, 208, 0] * 2))
    return cond, both, x, t


def decoder_forward_calls(ours: Ours, pipe, text, empty) -> dict:
    """One decoder forward (text projection + UNet) at batch 8 = cond + null of 4 prompts, as
    {"jax": call, "torch": call} plus its compile seconds, XLA FLOPs and the two outputs' max
    relative difference (both sides warmed up)."""
    _, both, x, t = decoder_inputs(ours, text, empty)
    before = compile_cache.stats()
    forward = jax.jit(ours.fns["decoder"]).lower(ours.decoder_params, x, t, both).compile()
    compile_s = compile_seconds(before)
    cost = forward.cost_analysis() or {}
    with torch.no_grad():
        swap = lambda a: torch.cat([a[BATCH:], a[:BATCH]])  # noqa: E731  [null; cond] order
        ctx, emb = pipe.text_proj(
            image_embeddings=torch.from_numpy(np.asarray(both["image_emb"][:BATCH])),
            prompt_embeds=swap(torch.from_numpy(np.array(both["text_emb"]))),
            text_encoder_hidden_states=swap(torch.from_numpy(np.array(both["text_tokens"]))),
            do_classifier_free_guidance=True,
        )
        mask = F.pad(swap(torch.from_numpy(np.array(both["text_mask"]))), (4, 0), value=True)
        xt, tt = swap(nchw(x)), swap(torch.from_numpy(np.asarray(t)))

    def theirs():
        with torch.no_grad():
            return pipe.decoder(xt, tt, encoder_hidden_states=ctx, class_labels=emb,
                                attention_mask=mask).sample  # fmt: skip

    def mine():
        return jax.block_until_ready(forward(ours.decoder_params, x, t, both))

    diff = rel_err(mine(), swap(theirs()).numpy().transpose(0, 2, 3, 1))  # also the warm-up
    return {"jax": mine, "torch": theirs, "jax_compile_s": compile_s,
            "xla_flops": cost.get("flops"), "max_rel_diff": diff, "compiled": forward}  # fmt: skip


def bench_decoder_forward(ours: Ours, pipe, text, empty, repeats: int) -> dict:
    calls = decoder_forward_calls(ours, pipe, text, empty)
    gate = harness.quiet_gate("decoder_forward")
    result = harness.interleave({k: calls[k] for k in ("jax", "torch")}, repeats)
    return {"gate": gate, "valid": harness.section_valid(gate, *result.values()),
            "batch": 2 * BATCH, "jax_compile_s": calls["jax_compile_s"], **result,
            "torch_over_jax": harness.ratio(result["torch"], result["jax"]),
            "xla_flops": calls["xla_flops"], "max_rel_diff": calls["max_rel_diff"]}  # fmt: skip


def _single_step(model_fn, table, params, x, i, rng, cond, null, scale):
    """One ancestral step of diffusion.p_sample_loop's body, for a Python loop of jitted calls."""
    opts = dict(clip_denoised=True, clip_range=1.0, denoised_fn=None)
    _, _, out = samplers._predict(model_fn, table, params, x, i, cond, null, scale, opts)
    noise = diffusion.step_noise(rng, i, x.shape)
    return out["mean"] + (i > 0).astype(jnp.float32) * jnp.exp(0.5 * out["log_variance"]) * noise


def bench_decoder_loops(ours: Ours, text, empty, repeats: int) -> dict:
    """Our 25-step decoder p_sample_loop (one jit, fori_loop) against the same 25 steps as a
    Python loop of one jitted step each: the loop's own cost, and the per-step time."""
    cond, _, _, _ = decoder_inputs(ours, text, empty)
    null = null_cond(cond, null_text=empty)
    scale = jnp.full((BATCH,), GUIDANCE["decoder"], jnp.float32)
    x_T = jnp.asarray(np.random.default_rng(2).standard_normal((BATCH, 64, 64, 3)), jnp.float32)
    rng, table, fn, params = (
        jax.random.key(4),
        ours.tables["decoder"],
        ours.fns["decoder"],
        ours.decoder_params,
    )
    steps = table.num_timesteps

    def loop():
        return jax.block_until_ready(diffusion.p_sample_loop(
            fn, table, params, x_T, rng, cond, null_cond=null, guidance_scale=scale))  # fmt: skip

    step = jax.jit(functools.partial(_single_step, fn))

    def python_loop():
        x = x_T
        for i in range(steps - 1, -1, -1):
            x = step(table, params, x, jnp.int32(i), rng, cond, null, scale)
        return jax.block_until_ready(x)

    before = compile_cache.stats()
    a = loop()
    loop_compile = compile_seconds(before)
    before = compile_cache.stats()
    b = python_loop()
    step_compile = compile_seconds(before)
    gate = harness.quiet_gate("decoder_loops")
    result = harness.interleave({"fori_loop": loop, "python_loop": python_loop}, repeats)
    per_step = {k: (v["median_s"] or float("nan")) / steps for k, v in result.items()}
    return {"gate": gate, "valid": harness.section_valid(gate, *result.values(), min_runs=1),
            "steps": steps, "batch": BATCH, **result, "per_step_s": per_step,
            "jax_compile_s": {"fori_loop": loop_compile, "single_step": step_compile},
            "max_abs_diff_loops": float(jnp.max(jnp.abs(a - b)))}  # fmt: skip


# The bench-karlo-small decoder's 3x3 convolutions at batch 8: (spatial size, channels).
CONV_SHAPES = [(64, 64), (32, 128), (16, 192), (8, 256)]


def bench_convolutions(repeats: int, calls: int = 10) -> dict:
    """XLA's CPU convolution against torch's (oneDNN) at the decoder's shapes, with each side's
    CPU utilisation (CPU seconds per wall second): ~1.0 is one of the two cores."""
    g = np.random.default_rng(0)
    out = []
    gate = harness.quiet_gate("convolutions")
    for size, ch in CONV_SHAPES:
        x = g.standard_normal((2 * BATCH, size, size, ch)).astype(np.float32)
        w = (g.standard_normal((3, 3, ch, ch)) * 0.05).astype(np.float32)
        conv = jax.jit(conv3x3)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()

        def mine(xj=xj, wj=wj, conv=conv):
            for _ in range(calls):
                y = conv(xj, wj)
            return jax.block_until_ready(y)

        def theirs(tx=tx, tw=tw):
            with torch.no_grad():
                for _ in range(calls):
                    y = F.conv2d(tx, tw, padding=1)
            return y

        mine(), theirs()
        result = harness.interleave({"jax": mine, "torch": theirs}, repeats)
        for side in result.values():
            for key in ("min_s", "median_s"):
                side[key] = side[key] / calls if side[key] else None
        gflop = 2 * 2 * BATCH * size * size * 9 * ch * ch / 1e9
        out.append({"shape_nhwc": [2 * BATCH, size, size, ch], "gflop": gflop, **result,
                    "torch_over_jax": harness.ratio(result["torch"], result["jax"])})  # fmt: skip
    return {
        "gate": gate,
        "calls_per_repeat": calls,
        "shapes": out,
        "valid": harness.section_valid(gate, *(s[k] for s in out for k in ("jax", "torch"))),
    }


# The decoder's attention at train batch 8: (spatial size, heads); head dim 32, and the added
# key/values of the 77 text tokens + 4 extra context tokens (SimpleCrossAttn).
ATTENTION_SHAPES = [(32, 4), (16, 6), (8, 8)]
CONTEXT_TOKENS = 81


def bench_train_kernels(repeats: int, min_repeat_s: float = 0.4) -> dict:
    """The train step's two big kernels forward + backward at the decoder's train-batch shapes:
    3x3 convolutions (gradients for input and kernel) and attention (gradients for q, k, v),
    XLA's against torch's (oneDNN convolutions, scaled_dot_product_attention as diffusers
    calls it), each side's CPU utilisation beside it."""
    g = np.random.default_rng(1)
    gate = harness.quiet_gate("train kernels")
    rows, counts = [], []

    def add(kind, shape, mine, theirs, gflop=None):
        # Calls per repeat: enough for min_repeat_s on the slower side, so that a repeat is long
        # enough for the foreign-load check to be meaningful (short repeats read as noise).
        mine(1), theirs(1)
        start = time.perf_counter()
        mine(1), theirs(1)
        calls = max(3, math.ceil(min_repeat_s / (time.perf_counter() - start) * 2))
        counts.append(calls)
        result = harness.interleave({"jax": lambda: mine(calls), "torch": lambda: theirs(calls)},
                                    repeats)  # fmt: skip
        for side in result.values():
            for key in ("min_s", "median_s"):
                side[key] = side[key] / calls if side[key] else None
        rows.append({"kernel": kind, "shape": shape, "gflop": gflop, "calls": calls, **result,
                     "torch_over_jax": harness.ratio(result["torch"], result["jax"])})  # fmt: skip

    def torch_backward(fn, tensors):
        def run(calls):
            for _ in range(calls):
                for t in tensors:
                    t.grad = None
                fn(*tensors).square().sum().backward()
            return tensors[0].grad

        return run

    for size, ch in CONV_SHAPES:
        x = g.standard_normal((TRAIN_BATCH, size, size, ch)).astype(np.float32)
        w = (g.standard_normal((3, 3, ch, ch)) * 0.05).astype(np.float32)

        def loss(x, w):
            y = conv3x3(x, w)
            return jnp.sum(y * y)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        xj, wj = jnp.asarray(x), jnp.asarray(w)

        def mine(calls, grad=grad, xj=xj, wj=wj):
            for _ in range(calls):
                out = grad(xj, wj)
            return jax.block_until_ready(out)

        tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
        tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_()
        gflop = 3 * 2 * TRAIN_BATCH * size * size * 9 * ch * ch / 1e9  # fwd + 2 bwd convs
        add("conv3x3 fwd+bwd", [TRAIN_BATCH, size, size, ch], mine,
            torch_backward(lambda a, b: F.conv2d(a, b, padding=1), [tx, tw]), gflop)  # fmt: skip

    from unclip_jax.models.layers import attention

    for size, heads in ATTENTION_SHAPES:
        lq, lk, d = size * size, size * size + CONTEXT_TOKENS, 32
        q = g.standard_normal((TRAIN_BATCH, lq, heads, d)).astype(np.float32)
        k, v = (g.standard_normal((TRAIN_BATCH, lk, heads, d)).astype(np.float32) for _ in range(2))
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) ** 2),
                                argnums=(0, 1, 2)))  # fmt: skip
        args = [jnp.asarray(a) for a in (q, k, v)]

        def mine(calls, grad=grad, args=args):
            for _ in range(calls):
                out = grad(*args)
            return jax.block_until_ready(out)

        tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).contiguous().requires_grad_()
                      for a in (q, k, v))  # fmt: skip
        gflop = 3 * 2 * 2 * TRAIN_BATCH * heads * lq * lk * d / 1e9  # QK^T, PV: fwd + 2x bwd
        add("attention fwd+bwd", [TRAIN_BATCH, lq, lk, heads, d], mine,
            torch_backward(F.scaled_dot_product_attention, [tq, tk, tv]), gflop)  # fmt: skip
    return {
        "gate": gate,
        "calls_per_repeat": counts,
        "rows": rows,
        "valid": harness.section_valid(gate, *(r[k] for r in rows for k in ("jax", "torch"))),
    }


def capture_intermediates(pipe):
    """Hooks that keep the pipeline's image embeddings and clamped 64 px images; returns
    (store, remove)."""
    store = {}

    def keep_emb(module, args, kwargs, output):
        store["image_emb"] = kwargs["image_embeddings"].detach().numpy().copy()

    handle = pipe.text_proj.register_forward_hook(keep_emb, with_kwargs=True)
    original = pipe.decoder_scheduler.step

    def step(*args, **kwargs):
        out = original(*args, **kwargs)
        store["decoder"] = out.prev_sample.clamp(-1, 1).numpy().copy()
        return out

    def remove():
        handle.remove()
        del pipe.decoder_scheduler.step  # back to the class's method

    pipe.decoder_scheduler.step = step
    return store, remove


# ------------------------------------------------------------------------------------------------
# Training: one AdamW step of the decoder, the hybrid loss on both sides.


class TorchHybridLoss:
    """The decoder's hybrid loss in torch: eps MSE + the VB term of the learned-range variance
    (the mean behind a stop-gradient), as unclip_jax.diffusion.training_losses computes it."""

    def __init__(self, pipe):
        self.text_proj, self.unet = pipe.text_proj, pipe.decoder
        arrays = schedule_arrays(diffusion.get_named_beta_schedule("cosine", 1000))
        arrays["log_betas"] = np.log(arrays["betas"])
        self.s = {k: torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}

    def _at(self, name, t):
        return self.s[name][t][:, None, None, None]

    def __call__(self, x0, t, noise, cond) -> torch.Tensor:
        x_t = self._at("sqrt_alphas_cumprod", t) * x0 + self._at(
            "sqrt_one_minus_alphas_cumprod", t) * noise  # fmt: skip
        cf = self.text_proj.learned_classifier_free_guidance_embeddings[None]
        image_emb = torch.where(cond["drop_image"][:, None], cf, cond["image_emb"])
        ctx, emb = self.text_proj(image_embeddings=image_emb, prompt_embeds=cond["text_emb"],
                                  text_encoder_hidden_states=cond["text_tokens"],
                                  do_classifier_free_guidance=False)  # fmt: skip
        mask = F.pad(cond["text_mask"], (4, 0), value=True)
        out = self.unet(x_t, t, encoder_hidden_states=ctx, class_labels=emb,
                        attention_mask=mask).sample  # fmt: skip
        eps, var = out[:, :3], out[:, 3:]
        mse = (noise - eps).square().mean((1, 2, 3))
        # VB term, eps frozen: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), decoder NLL at t = 0.
        pred_x0 = self._at("sqrt_recip_alphas_cumprod", t) * x_t - self._at(
            "sqrt_recipm1_alphas_cumprod", t) * eps.detach()  # fmt: skip
        c1, c2 = self._at("posterior_mean_coef1", t), self._at("posterior_mean_coef2", t)
        model_mean, true_mean = c1 * pred_x0 + c2 * x_t, c1 * x0 + c2 * x_t
        min_log = self._at("posterior_log_variance_clipped", t)
        frac = (var + 1) / 2
        model_log_var = frac * self._at("log_betas", t) + (1 - frac) * min_log
        kl = 0.5 * (-1 + model_log_var - min_log + torch.exp(min_log - model_log_var)
                    + (true_mean - model_mean).square() * torch.exp(-model_log_var))  # fmt: skip
        kl = kl.mean((1, 2, 3)) / math.log(2)
        nll = -discretized_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        vb = torch.where(t == 0, nll.mean((1, 2, 3)) / math.log(2), kl)
        return (mse + vb).mean()  # rescaled_mse: vb * T / 1000 = vb at T = 1000


def discretized_log_likelihood(x, means, log_scales):
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered, inv_std = x - means, torch.exp(-log_scales)
    plus, minus = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_plus = torch.log(plus.clamp(min=1e-12))
    log_one_minus = torch.log((1 - minus).clamp(min=1e-12))
    log_delta = torch.log((plus - minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus, log_delta))


def train_batch(rng: np.random.Generator, text, empty) -> dict:
    """A batch of 8: random images in [-1, 1], image embeddings, and CLIP text features (the
    4 prompts twice)."""
    rep = lambda a: np.concatenate([np.asarray(a)] * 2)  # noqa: E731
    return {
        "image": np.clip(rng.standard_normal((TRAIN_BATCH, 64, 64, 3)) * 0.5, -1, 1).astype(
            np.float32
        ),
        "image_emb": rng.standard_normal((TRAIN_BATCH, 256)).astype(np.float32),
        "text_emb": rep(text["text_emb"]),
        "text_tokens": rep(text["text_tokens"]),
        "text_mask": rep(text["text_mask"]),
    }


def torch_cond(batch, drop_image, drop_text, empty) -> dict:
    keys = ("image_emb", "text_emb", "text_tokens", "text_mask")
    cond = {k: torch.from_numpy(np.array(batch[k])) for k in keys}
    cond["drop_image"] = torch.from_numpy(np.asarray(drop_image))
    d = torch.from_numpy(np.asarray(drop_text))
    for k in ("text_emb", "text_tokens", "text_mask"):
        null = torch.from_numpy(np.asarray(empty[k]))[None].expand_as(cond[k])
        cond[k] = torch.where(d.reshape((-1,) + (1,) * (cond[k].ndim - 1)), null, cond[k])
    return cond


def training_calls(ours: Ours, pipe, text, empty) -> dict:
    """One decoder train step on each side, {"jax": call, "torch": call} (both warmed up), its
    compile seconds, the compiled step, the agreement at fixed inputs, and `done()` to put the
    torch modules back in eval mode."""
    g = np.random.default_rng(7)
    batch = train_batch(g, text, empty)
    table = diffusion.create_diffusion("cosine", 1000, var_type="learned_range",
                                       loss_type="rescaled_mse")  # fmt: skip

    # --- agreement at fixed inputs: the same t, noise and drops on both sides.
    t = np.array([0, 1, 17, 250, 500, 749, 998, 999], np.int32)
    noise = g.standard_normal((TRAIN_BATCH, 64, 64, 3)).astype(np.float32)
    drop_image = np.array([1, 0, 0, 0, 1, 0, 0, 0], bool)
    drop_text = np.array([0, 1, 0, 1, 1, 0, 0, 0], bool)
    tcond = torch_cond(batch, drop_image, drop_text, empty)
    jcond = {k: jnp.asarray(v.numpy()) for k, v in tcond.items()}

    def fixed_loss(params):
        def model_fn(x_t, t_model):
            return ours.decoder.apply({"params": params}, x_t, t_model, jcond)

        terms = diffusion.training_losses(table, model_fn, jnp.asarray(batch["image"]),
                                          jnp.asarray(t), jnp.asarray(noise))  # fmt: skip
        return jnp.mean(terms["loss"])

    loss_j, grads_j = jax.jit(jax.value_and_grad(fixed_loss))(ours.decoder_params)
    gnorm_j = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(grads_j))))
    torch_loss = TorchHybridLoss(pipe)
    modules = [pipe.text_proj, pipe.decoder]
    params_t = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
        m.zero_grad()
    loss_t = torch_loss(nchw(batch["image"]), torch.from_numpy(t.astype(np.int64)), nchw(noise),
                        tcond)  # fmt: skip
    loss_t.backward()
    gnorm_t = float(torch.sqrt(sum(p.grad.square().sum() for p in params_t)))
    agreement = {"loss_jax": float(loss_j), "loss_torch": loss_t.item(),
                 "loss_rel_diff": abs(float(loss_j) - loss_t.item()) / abs(loss_t.item()),
                 "grad_norm_jax": gnorm_j, "grad_norm_torch": gnorm_t,
                 "grad_norm_rel_diff": abs(gnorm_j - gnorm_t) / gnorm_t}  # fmt: skip

    # --- ours: the library's decoder loss (random t, noise, drops) in the jitted donated step.
    optim = ml_collections.ConfigDict(OPTIM)
    tx, schedule = make_optimizer(optim)
    loss_fn = functools.partial(decoder_loss, model=ours.decoder, table=table,
                                image_drop=IMAGE_DROP, caption_drop=CAPTION_DROP,
                                null_text=empty)  # fmt: skip
    step = make_train_step(loss_fn, tx, schedule, ema_decay=OPTIM["ema_decay"])
    state = TrainState.create(jax.tree.map(jnp.array, ours.decoder_params), tx)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    rng = jax.random.key(3)
    before = compile_cache.stats()
    compiled = compile_train_step(step, state, jbatch, rng)
    compile_s = compile_seconds(before)
    state, metrics = compiled(state, jbatch, rng)  # first call (allocation), not timed
    jax.block_until_ready(metrics)
    box = {"state": state, "metrics": metrics}

    def jax_step():
        box["state"], box["metrics"] = compiled(box["state"], jbatch, rng)
        return jax.block_until_ready((box["state"], box["metrics"]))

    # --- torch: the same step written out (forward, backward, clip, AdamW, EMA).
    opt = torch.optim.AdamW(params_t, lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]),
                            eps=OPTIM["eps"], weight_decay=OPTIM["weight_decay"])  # fmt: skip
    ema = [p.detach().clone() for p in params_t]
    tb = {"image": nchw(batch["image"])}
    gen = torch.Generator().manual_seed(3)
    step_count = [0]

    def torch_step():
        tt = torch.randint(0, 1000, (TRAIN_BATCH,), generator=gen)
        eps = torch.randn(tb["image"].shape, generator=gen)
        di = torch.rand(TRAIN_BATCH, generator=gen) < IMAGE_DROP
        dt = torch.rand(TRAIN_BATCH, generator=gen) < CAPTION_DROP
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(tb["image"], tt, eps, torch_cond(batch, di.numpy(), dt.numpy(), empty))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_t, OPTIM["grad_clip"])
        opt.step()
        s = step_count[0]
        decay = min(OPTIM["ema_decay"], (1 + s) / (10 + s))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params_t], 1 - decay)
        step_count[0] += 1
        return loss.item()

    torch_step()  # warm-up (allocator, AdamW state)

    def done():
        for m in modules:
            m.eval()

    return {"jax": jax_step, "torch": torch_step, "jax_compile_s": compile_s,
            "compiled": compiled, "agreement": agreement, "box": box, "done": done}  # fmt: skip


def bench_training(ours: Ours, pipe, text, empty, repeats: int) -> dict:
    calls = training_calls(ours, pipe, text, empty)
    gate = harness.quiet_gate("training")
    result = harness.interleave({k: calls[k] for k in ("jax", "torch")}, repeats)
    calls["done"]()
    return {
        "gate": gate, "valid": harness.section_valid(gate, *result.values()),
        "batch": TRAIN_BATCH, "image_size": 64, "optimizer": OPTIM,
        "jax_compile_s": calls["jax_compile_s"], **result,
        "torch_over_jax": harness.ratio(result["torch"], result["jax"]),
        "jax_loss_last": float(calls["box"]["metrics"]["loss"]),
        "agreement_fixed_inputs": calls["agreement"],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------


def machine() -> dict:
    import diffusers
    import transformers

    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


TARGETS = {"end_to_end": 1.25, "stage": 1.0, "train_step": 1.25}  # torch / jax, issue 20


def targets(sampling: dict, training: dict) -> dict:
    """Each target of issue 20 (section 2) with the measured torch/jax ratio and whether it
    is met."""
    out = {}
    for s in sampling["stages"]:
        goal = TARGETS["end_to_end"] if s["stage"] == "end_to_end" else TARGETS["stage"]
        if s["stage"] != "text":  # tokenising + the text tower: not a sampling stage
            out[s["stage"]] = {
                "goal": goal,
                "torch_over_jax": s["torch_over_jax"],
                "met": bool(s["torch_over_jax"] and s["torch_over_jax"] >= goal),
            }
    ratio = training["torch_over_jax"]
    out["train_step"] = {
        "goal": TARGETS["train_step"],
        "torch_over_jax": ratio,
        "met": bool(ratio and ratio >= TARGETS["train_step"]),
    }
    return out


def build_both_sides():
    """The random-weight Karlo folder built, loaded by diffusers and converted by us, in a
    temporary folder: (pipe, ours, the schedulers' timestep grids)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "karlo-small"
        build_reference(folder)
        pipe = load_reference(folder)
        grids = {}
        for name in STEPS:
            scheduler = getattr(pipe, f"{name}_scheduler")
            scheduler.set_timesteps(STEPS[name])
            grids[name] = scheduler.timesteps.numpy().copy()
        ours = Ours(folder, grids)
    return pipe, ours, grids


def conv3x3(x, w):
    """A 'same' 3x3 NHWC convolution, as the UNets' `layers.conv` computes it."""
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (not for the README)")
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help="where to write the JSON")
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    args = parser.parse_args()
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    repeats = {"sampling": 2 if args.quick else 3, "forward": 3 if args.quick else 7,
               "loops": 1 if args.quick else 2, "conv": 3 if args.quick else 7,
               "training": 3 if args.quick else 5,
               "train_kernels": 3 if args.quick else 5}  # fmt: skip
    only = {x for x in args.only.split(",") if x}
    torch.set_grad_enabled(True)
    t0 = time.perf_counter()

    pipe, ours, grids = build_both_sides()
    print(f"built and converted in {time.perf_counter() - t0:.0f} s; timesteps "
          f"{ {k: v.tolist() for k, v in grids.items()} }")  # fmt: skip

    report = {
        "benchmark": "bench-karlo-small (shared/BENCHMARKS.md), random weights, float32, CPU",
        "machine": machine(),
        "repeats": repeats,
        "load_limit": harness.LOAD_LIMIT,
        "foreign_cores_limit": harness.FOREIGN_LIMIT,
        "notes": [
            "Timing rules (benchmarks/harness.py): each timed section starts only once the"
            " 1-minute load average is <= load_limit (`gate`); the two sides' repeats alternate;"
            " a repeat during which other processes used more than foreign_cores_limit cores"
            " (/proc/stat busy time minus this process's CPU time) is dropped; min and median"
            " of the valid repeats; torch_over_jax = ratio of medians (> 1: ours faster)."
            " Compile time (tracing + lowering + XLA, from jax.monitoring) is reported apart"
            " and never inside a timed repeat. The persistent compilation cache is off.",
            "Reference = diffusers UnCLIPPipeline (deprecated.unclip), components loaded from the"
            " saved folder; per-stage times from its progress-bar hooks; the gap before a loop"
            " counts to that stage (text projection -> decoder, bicubic upscale -> super_res).",
            "Ours = converters on the same folder; one jitted p_sample_loop per stage on the"
            " UnCLIPScheduler grid (create_diffusion(use_timesteps=...)); super_res_last at t=0"
            " via lax.cond in the model_fn. Stage times block on each stage's result.",
            "Both chains start from the same latents and use the same per-step noise (diffusers'"
            " scheduler noise draw is fed ours), so the final images are compared directly.",
            "Tokenizer: a 600-id BPE trained on the prompts (OpenAI's vocabulary is not available"
            " offline); the text tower keeps vocab 49408.",
        ],
    }

    if only and args.out.exists():  # a partial rerun updates the sections it ran
        previous = json.loads(args.out.read_text())
        report = previous | {k: v for k, v in report.items() if k != "repeats"}
        report["diagnosis"] = previous.get("diagnosis", {})

    def write(**parts) -> None:
        # Written after each phase, so that a run cut short still leaves its numbers.
        report.update(parts, wall_s=time.perf_counter() - t0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")

    def wanted(name):
        return not only or name in only

    text, empty = ours.text(PROMPTS)
    calls = denoiser_agreement(ours, pipe, text, empty)
    print("one call per network, max rel diff:", {k: f"{v:.1e}" for k, v in calls.items()})
    write(denoiser_agreement_max_rel_diff=calls)
    diagnosis = report.get("diagnosis", {})
    if wanted("forward"):
        diagnosis["decoder_forward"] = bench_decoder_forward(ours, pipe, text, empty,
                                                             repeats["forward"])  # fmt: skip
        print("decoder forward:", _brief(diagnosis["decoder_forward"]), flush=True)
        write(diagnosis=diagnosis)
    if wanted("conv"):
        diagnosis["convolutions"] = bench_convolutions(repeats["conv"])
        for c in diagnosis["convolutions"]["shapes"]:
            print("conv", c["shape_nhwc"], _brief(c), flush=True)
        write(diagnosis=diagnosis)
    if wanted("train_kernels"):
        diagnosis["train_kernels"] = bench_train_kernels(repeats["train_kernels"])
        for r in diagnosis["train_kernels"]["rows"]:
            print(r["kernel"], r["shape"], _brief(r), flush=True)
        write(diagnosis=diagnosis)
    if wanted("loops"):
        diagnosis["decoder_loops"] = bench_decoder_loops(ours, text, empty, repeats["loops"])
        print("decoder loops:", diagnosis["decoder_loops"]["per_step_s"], flush=True)
        write(diagnosis=diagnosis)
    sampling = training = None
    if wanted("sampling"):
        sampling = bench_sampling(ours, pipe, repeats["sampling"])
        write(sampling=sampling)
        for s in sampling["stages"]:
            print(f"{s['stage']:>10}  {_brief(s)}")
        print("chain agreement:", sampling["chain_agreement"], flush=True)
    if wanted("training"):
        training = bench_training(ours, pipe, text, empty, repeats["training"])
        write(training=training)
        print(f"train step  {_brief(training)}  compile {training['jax_compile_s']:.1f} s  "
              f"{training['agreement_fixed_inputs']}")  # fmt: skip
    if sampling and training:
        write(targets=targets(sampling, training))
        print("targets:", report["targets"])
    print(f"wrote {args.out} in {report['wall_s']:.0f} s")


def _brief(r: dict) -> str:
    def ms(side):
        m = r[side]["median_s"]
        return "-" if m is None else f"{m * 1e3:.1f} ms (util {r[side]['cpu_util']})"

    ratio = r.get("torch_over_jax")
    return f"jax {ms('jax')}  torch {ms('torch')}  torch/jax " + (
        "-" if ratio is None else f"{ratio:.2f}"
    )


if __name__ == "__main__":
    main()
