"""What sampling from karlo-v1-alpha needs, per stage, at batch 1 and 8: AOT, no weights.

    .venv/bin/python benchmarks/karlo_memory.py [--batches 1,8] [--out PATH]
    .venv/bin/python benchmarks/karlo_memory.py --tiny    # tiny configs (tests/test_scale_plan.py)

Each stage's sampler is the one `pipeline_from_diffusers` / `pipeline_from_runs` runs, at Karlo's
real sizes (configs prior_diffusion:karlo, decoder64:karlo, upsample256:karlo with
super_res_last, clip_vit_l14's text and image towers), with params as `jax.eval_shape` shapes
(nothing is allocated): the prior's 25 guided steps, the decoder's 25 guided steps (the
pipelines' default is 50; memory does not depend on the step count), super-res' 7 steps, and
one CLIP forward. Each is lowered and compiled for one device, and XLA's `memory_analysis()`
gives the bytes of arguments (params included), outputs and temporaries; peak = arguments +
outputs - aliased + temporaries. Compute in float32 (what the pipelines run today) and in
bfloat16 (the configs' `model.dtype`, params float32). Attention is traced in its accelerator
form (the CPU backend's blocked loop is a CPU speed-up only). The compiler is XLA's CPU backend
(no accelerator here): GPU and TPU buffer assignment differs in detail, not in kind (the weights
and the 2B-batch activations dominate). Results: benchmarks/results/karlo_memory.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from scale_plan import accelerator_attention

from unclip_jax import config_utils, diffusion
from unclip_jax.models import clip as clip_models
from unclip_jax.models import decoder as dec
from unclip_jax.models import prior as prior_models
from unclip_jax.pipelines.prior import PriorSampler
from unclip_jax.pipelines.unclip import make_last_step_model_fn

OUT = pathlib.Path(__file__).parent / "results" / "karlo_memory.json"
STEPS = {"prior": 25, "decoder": 25, "super_res": 7}
KARLO = {"prior": "prior_diffusion:karlo", "decoder": "decoder64:karlo",
         "super_res": "upsample256:karlo", "clip": "clip_vit_l14"}  # fmt: skip
TINY = {"prior": "prior_diffusion:tiny_karlo", "decoder": "decoder64:tiny",
        "super_res": "upsample256:tiny", "clip": "clip_vit_l14:tiny"}  # fmt: skip


def shapes_of(init, *args) -> dict:
    """Unboxed param shapes of init(rng, *args), nothing allocated."""
    return nn.meta.unbox(jax.eval_shape(lambda rng: init(rng, *args), jax.random.key(0)))


def count(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def text_cond(batch: int, clip_dim: int, text_dim: int, ctx: int) -> dict:
    return {"text_emb": spec((batch, clip_dim)), "text_tokens": spec((batch, ctx, text_dim)),
            "text_mask": spec((batch, ctx), bool)}  # fmt: skip


def prior_stage(name: str, batch: int, dtype):
    config = config_utils.load_config(name)
    model = prior_models.prior_from_config(config.model, dtype=dtype)
    params = shapes_of(lambda rng: prior_models.init_params(model, rng))
    sampler = PriorSampler(model, config.diffusion, respacing=str(STEPS["prior"]),
                           num_candidates=config.sample.num_candidates,
                           clamp=config.sample.clamp)  # fmt: skip
    cond = text_cond(batch, model.clip_dim, model.text_dim, model.text_ctx)
    scale = spec((batch,))
    lowered = sampler._jitted.lower(params, sampler.table, cond, jax.random.key(0), cond, scale,
                                    jnp.float32(5.0), None)  # fmt: skip
    return params, lowered


def lower_loop(stage: str, config, model_fn, params, size: int, cond, **guidance):
    """The pipelines' ancestral loop for `stage` (its STEPS, x_0 clamped), lowered on shapes."""
    batch = jax.tree.leaves(cond)[0].shape[0]
    table = diffusion.diffusion_from_config(config.diffusion, str(STEPS[stage]))
    return diffusion.p_sample_loop.lower(model_fn, table, params, spec((batch, size, size, 3)),
                                         jax.random.key(0), cond, clip_denoised=True,
                                         **guidance)  # fmt: skip


def decoder_stage(name: str, batch: int, dtype):
    config = config_utils.load_config(name)
    model = dec.decoder_from_config(config.model, dtype=dtype)
    ctx = config.model.text_ctx
    params = shapes_of(lambda rng: dec.init_params(model, rng, text_ctx=ctx))
    size = model.image_size
    cond = {"image_emb": spec((batch, model.clip_dim)), "drop_image": spec((batch,), bool),
            **text_cond(batch, model.clip_dim, model.text_dim, ctx)}  # fmt: skip
    guided = dict(null_cond=cond, guidance_scale=spec((batch,)))
    return params, lower_loop("decoder", config, dec.make_model_fn(model), params, size, cond,
                              **guided)  # fmt: skip


def super_res_stage(name: str, batch: int, dtype):
    config = config_utils.load_config(name)
    model = dec.upsampler_from_config(config.model, dtype=dtype)
    first = shapes_of(lambda rng: dec.init_params(model, rng))
    params = {"first": first, "last": first}  # super_res_first and super_res_last
    size, low = model.image_size, config.model.low_res_size
    cond = {"low_res": spec((batch, low, low, 3))}
    return params, lower_loop("super_res", config, make_last_step_model_fn(model), params, size,
                              cond)  # fmt: skip


def clip_stage(name: str, batch: int, dtype):
    config = config_utils.load_config(name)
    model = clip_models.clip_from_config(config.model, dtype=dtype)
    params = shapes_of(lambda rng: clip_models.init_params(model, rng))
    size = model.vision.image_size

    def forward(params, ids, eot, pixels):
        out = model.apply({"params": params}, ids, eot_positions=eot, images=pixels)
        return out.text_embeds, out.text_hidden_states, out.image_embeds

    ids = spec((batch, config.model.text.context_length), jnp.int32)
    lowered = jax.jit(forward).lower(params, ids, spec((batch,), jnp.int32),
                                     spec((batch, size, size, 3)))  # fmt: skip
    return params, lowered


STAGES = {"clip": clip_stage, "prior": prior_stage, "decoder": decoder_stage,
          "super_res": super_res_stage}  # fmt: skip


def measure(stage: str, batch: int, dtype, configs: dict = KARLO) -> dict:
    start = time.perf_counter()
    with accelerator_attention():
        params, lowered = STAGES[stage](configs[stage], batch, dtype)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")  # fmt: skip
    out = {f: int(getattr(mem, f)) for f in fields}
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                         - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])  # fmt: skip
    out |= {"stage": stage, "batch": batch, "compute_dtype": jnp.dtype(dtype).name,
            "params": count(params), "param_bytes": 4 * count(params),
            "steps": STEPS.get(stage), "compile_s": time.perf_counter() - start}  # fmt: skip
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--tiny", action="store_true", help="the tiny configs")
    args = parser.parse_args(argv)
    configs = TINY if args.tiny else KARLO
    out = pathlib.Path(args.out)
    result = {"benchmark": "karlo_memory", "jax": jax.__version__, "configs": configs,
              "backend": jax.default_backend(), "date": datetime.date.today().isoformat(),
              "runs": []}  # fmt: skip
    for stage in args.stages.split(","):
        for dtype in args.dtypes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                run = measure(stage, batch, jnp.dtype(dtype), configs)
                result["runs"].append(run)
                print(f"{stage:<10} {dtype:<9} batch {batch}: peak {run['peak_bytes'] / 1e9:.2f} "
                      f"GB (params {run['param_bytes'] / 1e9:.2f} GB, temporaries "
                      f"{run['temp_size_in_bytes'] / 1e9:.2f} GB), compiled in "
                      f"{run['compile_s']:.0f} s", flush=True)  # fmt: skip
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
