"""The GPU suite (issue 20, section 5); run through benchmarks/gpu_suite.sh.

Three parts, each recorded (or its failure, or why it was skipped) in OUT/gpu_suite.json:

1. `train_step`: the decoder train step at paper width (decoder64:paper, 3.5B, bf16 compute,
   remat) on one device, at the largest per-device batch of `--batches` that compiles and runs;
   step time (median of timed steps after a warm-up), XLA's `cost_analysis()` FLOPs and the MFU
   against the device's dense bf16 peak (goal >= 40% on H100/H200).
2. `karlo_sampling`: bench-karlo-small end to end (prior 25, decoder 25, super-res 7 steps,
   batch 4) for unclip-jax and diffusers' UnCLIPPipeline on the same device (goal torch/jax >=
   1.5), in float32 and in half precision (ours bfloat16 compute, `--dtype bfloat16`; diffusers
   float16, as Karlo is usually run). Needs torch (with CUDA) and diffusers; skipped, with the
   reason, when either is absent. On a CPU (the dry run) the half-precision pair is ours alone.
3. `attention`: `jax.nn.dot_product_attention` (cuDNN's fused kernel where there is one, XLA's
   otherwise) against our plain attention (models/layers.py) at the UNets' shapes, forward and
   forward + backward, bf16.

`--dry-run` runs the same code at tiny sizes on whatever backend there is (CI runs it on the
CPU), so the script is known to work before a GPU is ever lent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# Dense bf16 peak FLOP/s by device kind (substring match, first wins).
PEAKS = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
         ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12)]  # fmt: skip


def peak_flops(kind: str) -> float | None:
    return next((p for name, p in PEAKS if name.lower() in kind.lower()), None)


def timeit(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


# ------------------------------------------------------------------------------ 1. train step
def train_step(dry_run: bool, batches: list[int], repeats: int) -> dict:
    import scale_plan

    spec = scale_plan.MODELS["decoder64"].tiny if dry_run else scale_plan.MODELS["decoder64"].paper
    tried = []
    for batch in sorted(batches, reverse=True):  # the largest that fits
        try:
            return _train_step_at(spec, batch, repeats) | {"tried": tried}
        except Exception as error:  # out of memory at this batch: try the next smaller one
            tried.append({"per_device_batch": batch, "error": f"{type(error).__name__}: "
                          f"{str(error).splitlines()[0][:300]}"})  # fmt: skip
    return {"spec": spec, "status": "failed", "tried": tried}


def _train_step_at(spec: str, batch: int, repeats: int) -> dict:
    """One device, FSDP rules (a 1-device mesh), remat: compile, run, time, MFU."""
    import flax.linen as nn
    import scale_plan
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from unclip_jax.data import loader
    from unclip_jax.train.state import TrainState
    from unclip_jax.train.step import compile_train_step, make_train_step

    with tempfile.TemporaryDirectory() as workdir:
        built = scale_plan.build(spec, "fsdp", 1, None, True, pathlib.Path(workdir))
    sharding = loader.batch_sharding(built.mesh)
    shapes = scale_plan.batch_specs(built.config, batch, sharding)
    rng = np.random.default_rng(0)

    def value(s):
        if s.dtype == jnp.bool_:
            return jnp.ones(s.shape, bool)
        if jnp.issubdtype(s.dtype, jnp.integer):
            return jnp.asarray(rng.integers(0, 100, s.shape), s.dtype)
        return jnp.asarray(np.clip(rng.standard_normal(s.shape), -1, 1), s.dtype)

    data = {k: value(s) for k, s in shapes.items()}
    optim = built.config.optim
    step = make_train_step(built.kind.loss_fn, built.tx, built.schedule,
                           ema_decay=optim.ema_decay)  # fmt: skip
    with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
        create = jax.jit(lambda r: TrainState.create(built.kind.init(r), built.tx),
                         out_shardings=built.shardings)  # fmt: skip
        state = create(jax.random.key(0))
        start = time.perf_counter()
        compiled = compile_train_step(
            step, state, data, jax.random.key(1), state_shardings=built.shardings,
            batch_shardings=jax.tree.map(lambda _: sharding, data),
            replicated=NamedSharding(built.mesh, P()),
        )  # fmt: skip
        compile_s = time.perf_counter() - start
        box = {"state": state}

        def run():
            box["state"], metrics = compiled(box["state"], data, jax.random.key(1))
            jax.block_until_ready(metrics)

        timing = timeit(run, repeats)
    flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    memory = compiled.memory_analysis()
    peak = peak_flops(jax.devices()[0].device_kind)
    return {
        "spec": spec, "per_device_batch": batch, "params": scale_plan.param_count(built),
        "compile_s": compile_s, **timing, "xla_flops_per_step": flops,
        "achieved_flops": flops / timing["median_s"], "peak_flops": peak,
        "mfu": flops / timing["median_s"] / peak if peak else None, "goal_mfu": 0.4,
        "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0)), "status": "ok",
    }  # fmt: skip


# ------------------------------------------------------------------------------ 2. karlo sampling
def karlo_sampling(dry_run: bool, repeats: int) -> dict:
    """Both precisions: {"float32": ..., "half": ...}, each as `_karlo_pair` measures it."""
    out = _karlo_pair(dry_run, repeats, half=False)
    if out["status"] != "ok":
        return out
    half = _karlo_pair(dry_run, repeats, half=True, torch_half=out["torch_device"] == "cuda")
    return {"status": "ok", "float32": out, "half": half,
            "torch_over_jax": out["torch_over_jax"]}  # fmt: skip


def _karlo_pair(dry_run: bool, repeats: int, *, half: bool, torch_half: bool = True) -> dict:
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as error:
        return {"status": "skipped", "why": f"needs torch and diffusers ({error})"}
    import bench_karlo_small as bench

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dry_run:  # tiny: 2 steps per stage
        bench.STEPS = {"prior": 2, "decoder": 2, "super_res": 2}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "karlo-small"
        bench.build_reference(folder)
        pipe = bench.load_reference(folder).to(device)
        if half and torch_half:
            pipe = pipe.to(device, torch.float16)
        grids = {}
        for name in bench.STEPS:
            scheduler = getattr(pipe, f"{name}_scheduler")
            scheduler.set_timesteps(bench.STEPS[name])
            grids[name] = scheduler.timesteps.cpu().numpy().copy()
        ours = bench.Ours(folder, grids, dtype=jnp.bfloat16 if half else jnp.float32)
    rng = np.random.default_rng(1)
    latents = {"prior": rng.standard_normal((bench.BATCH, 256)),
               "decoder": rng.standard_normal((bench.BATCH, 64, 64, 3)),
               "super_res": rng.standard_normal((bench.BATCH, 128, 128, 3))}  # fmt: skip
    latents = {k: v.astype(np.float32) for k, v in latents.items()}
    keys = {k: jax.random.key(10 + i) for i, k in enumerate(bench.STEPS)}

    def mine():
        text, empty = ours.text(bench.PROMPTS)
        z = ours.sample_prior(text, empty, jnp.asarray(latents["prior"]), keys["prior"])
        x = ours.sample_decoder(z, text, empty, jnp.asarray(latents["decoder"]), keys["decoder"])
        y = ours.sample_super_res(x, jnp.asarray(latents["super_res"]), keys["super_res"])
        return np.asarray(jnp.clip(y * 0.5 + 0.5, 0.0, 1.0))

    def theirs():
        with torch.no_grad():
            return pipe(bench.PROMPTS, generator=torch.Generator(device).manual_seed(0),
                        prior_num_inference_steps=bench.STEPS["prior"],
                        decoder_num_inference_steps=bench.STEPS["decoder"],
                        super_res_num_inference_steps=bench.STEPS["super_res"],
                        prior_guidance_scale=bench.GUIDANCE["prior"],
                        decoder_guidance_scale=bench.GUIDANCE["decoder"],
                        output_type="np").images  # fmt: skip

    start = time.perf_counter()
    images = mine()
    first = time.perf_counter() - start
    ours_t, ref_t = [], []
    compare = half and not torch_half  # a CPU dry run: ours in bf16 alone
    if not compare:
        theirs()  # warm-up
    for _ in range(repeats):  # interleaved
        ours_t.append(timeit(mine, 1, warmup=0)["median_s"])
        if not compare:
            ref_t.append(timeit(theirs, 1, warmup=0)["median_s"])
    jax_s = statistics.median(ours_t)
    torch_s = statistics.median(ref_t) if ref_t else None
    return {"status": "ok", "torch_device": device, "steps": dict(bench.STEPS),
            "batch": bench.BATCH, "jax_dtype": "bfloat16" if half else "float32",
            "torch_dtype": ("float16" if half else "float32") if ref_t else None,
            "jax_first_call_s": first, "jax_runs_s": ours_t, "torch_runs_s": ref_t,
            "jax_median_s": jax_s, "torch_median_s": torch_s,
            "jax_images_finite": bool(np.isfinite(images).all()),
            "torch_over_jax": torch_s / jax_s if torch_s else None, "goal": 1.5}  # fmt: skip


# ------------------------------------------------------------------------------ 3. attention
def attention(dry_run: bool, repeats: int) -> dict:
    from unclip_jax.models import layers

    on_gpu = jax.default_backend() == "gpu"
    # (batch, tokens, heads, head dim): the 64 px UNet's 32x32 and 16x16 attention at batch 16,
    # and a 64x64 map (the 256 px GLIDE upsampler's scale) at batch 4.
    shapes = [(2, 64, 2, 32)] if dry_run else [(16, 1024, 8, 64), (16, 256, 16, 64),
                                               (4, 4096, 8, 64)]  # fmt: skip
    impls = {"plain": lambda q, k, v: layers.attention(q, k, v, implementation="dense"),
             "xla_fused": lambda q, k, v: jax.nn.dot_product_attention(
                 q, k, v, implementation="xla")}  # fmt: skip
    if on_gpu:
        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, implementation="cudnn"
        )
    out = []
    for b, n, h, d in shapes:
        rng = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(r, (b, n, h, d), jnp.bfloat16) for r in rng)
        row = {"shape_blhd": [b, n, h, d]}
        reference = None
        for name, fn in impls.items():
            try:
                fwd = jax.jit(fn)
                bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32)
                                       .sum(), argnums=(0, 1, 2)))  # fmt: skip
                result = fwd(q, k, v)
                if reference is None:
                    reference = result
                err = float(jnp.max(jnp.abs(result.astype(jnp.float32)
                                            - reference.astype(jnp.float32))))  # fmt: skip
                row[name] = {
                    "forward": timeit(lambda f=fwd, a=(q, k, v): jax.block_until_ready(f(*a)),
                                      repeats),
                    "forward_backward": timeit(
                        lambda f=bwd, a=(q, k, v): jax.block_until_ready(f(*a)), repeats),
                    "max_abs_diff_vs_plain": err,
                }  # fmt: skip
            except Exception as error:
                row[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        for key in ("xla_fused", "cudnn"):
            if "forward" in row.get(key, {}) and "forward" in row["plain"]:
                row[f"{key}_speedup_fwd_bwd"] = (
                    row["plain"]["forward_backward"]["median_s"]
                    / row[key]["forward_backward"]["median_s"]
                )
        out.append(row)
    return {"status": "ok", "shapes": out}


# ------------------------------------------------------------------------------ entry point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, any backend")
    parser.add_argument("--parts", default="train_step,karlo_sampling,attention")
    parser.add_argument("--batches", default="16,8,4,2,1", help="train step: per-device batches")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    result = {"device": {"platform": device.platform, "kind": device.device_kind,
                         "count": jax.device_count()},
              "jax": jax.__version__, "dry_run": args.dry_run, "parts": {}}  # fmt: skip
    repeats = 2 if args.dry_run else 5
    parts = {
        "train_step": lambda: train_step(args.dry_run, [2, 1] if args.dry_run else
                                         [int(b) for b in args.batches.split(",")], repeats),
        "karlo_sampling": lambda: karlo_sampling(args.dry_run, 1 if args.dry_run else 3),
        "attention": lambda: attention(args.dry_run, repeats),
    }  # fmt: skip
    for name in args.parts.split(","):
        start = time.perf_counter()
        print(f"[gpu_suite] {name} ...", flush=True)
        try:
            record = parts[name]()
        except Exception as error:
            record = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        record["wall_s"] = time.perf_counter() - start
        result["parts"][name] = record
        print(f"[gpu_suite] {name}: {record['status']} in {record['wall_s']:.0f} s", flush=True)
        (out / "gpu_suite.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    failed = [n for n, r in result["parts"].items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
