"""The `unclip-jax` command line: thin argument parsing over library functions.

Subcommands grow with the project (see the README's status table); those listed here work.
User errors (a missing config, an unknown key, a bad value) end with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

from unclip_jax import storage

DEMO_NOTE = (
    "unclip-jax demo: the embedded default. Builds the procedural shapes dataset, trains a\n"
    "tiny unCLIP stack (CLIP, diffusion and AR priors, 32 px decoder, 32->64 upsampler) and a\n"
    "tiny 32 px GLIDE base, samples grids for a few prompts (held-out compositions included)\n"
    "and runs a guidance x prior ablation (15 minutes measured on 2 CPU cores). A rerun\n"
    "reuses what it trained. SIGTERM saves the training stage under way and stops there;\n"
    "the same command resumes it.\n"
    "--toy (or --config toy2d[:tiny]) runs the diffusion-core toy demo instead."
)
TOY_NOTE = (
    "unclip-jax demo --toy: the diffusion-core toy demo (2-D data, class-conditional MLP, hybrid\n"
    "loss, every sampler with classifier-free guidance)."
)


class UserError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


# The run-folder flags of sample/vary/interpolate/inpaint/ablate/eval (argparse dests).
RUN_FLAGS = ("clip", "decoder", "prior_run", "ar_prior_run", "upsamplers", "base", "upsampler",
             "glide_base", "glide_upsampler")  # fmt: skip


def _add_step_arg(parser) -> None:
    parser.add_argument(
        "--step", action="append", default=[], metavar="[RUN=]N",
        help="read checkpoint step N of a run instead of its latest: N when one run is given, "
        "else RUN=N with RUN its flag (--step decoder=150); a run path RUN/checkpoints/N "
        "does the same",
    )  # fmt: skip


def _given_runs(args) -> dict[str, tuple[str, int | None]]:
    """{role: (dest, index in a list or None)} of the run flags given on this command line."""
    runs = {}
    for dest in RUN_FLAGS:
        value = getattr(args, dest, None)
        if isinstance(value, list | tuple):
            for i in range(len(value)):
                runs[dest if len(value) == 1 else f"{dest}.{i}"] = (dest, i)
        elif value:
            runs[dest] = (dest, None)
    return runs


def _run_path(args, dest: str, index: int | None) -> str:
    value = getattr(args, dest)
    return value[index] if index is not None else value


def _apply_steps(args) -> None:
    """--step [RUN=]N: point that run's path at RUN/checkpoints/N (checked to exist)."""
    from unclip_jax.run_paths import split_run_path

    runs = _given_runs(args)
    for spec in getattr(args, "step", None) or []:
        role, _, number = spec.rpartition("=")
        role = role.lstrip("-").replace("-", "_")
        if not number.isdigit():
            raise UserError(f"--step {spec}: the step must be a number (--step [RUN=]N)")
        if not role:
            if len(runs) != 1:
                given = ", ".join(runs) or "none"
                raise UserError(f"--step {spec}: name the run, e.g. --step decoder={number} "
                                f"(runs given: {given})")  # fmt: skip
            role = next(iter(runs))
        if role not in runs:
            raise UserError(f"--step {spec}: no run {role!r} on this command line (runs given: "
                            f"{', '.join(runs) or 'none'})")  # fmt: skip
        dest, index = runs[role]
        run, folder, _ = split_run_path(_run_path(args, dest, index))
        target = folder / number
        if not target.is_dir():
            have = sorted((int(p.name) for p in folder.glob("[0-9]*") if p.name.isdigit()),
                          reverse=True) if folder.is_dir() else []  # fmt: skip
            raise UserError(f"--step {spec}: run {run} has no checkpoint step {number} (it "
                            f"holds {', '.join(map(str, have)) or 'none'})")  # fmt: skip
        if index is None:
            setattr(args, dest, str(target))
        else:
            getattr(args, dest)[index] = str(target)


def _damage_report(args, err) -> str:
    """A DamagedCheckpoint's line, with the flag that selects an intact step on this command."""
    import os

    from unclip_jax.run_paths import split_run_path

    if not err.intact:
        return err.describe("")
    step = err.intact[0]
    if args.command == "data":
        return err.describe(f"--clip_step {step}" if args.data_command == "embed" else "")
    runs = _given_runs(args) if hasattr(args, "step") else {}
    for role, (dest, index) in runs.items():
        folder = split_run_path(_run_path(args, dest, index))[1]
        if os.path.abspath(folder) == os.path.abspath(err.directory):
            return err.describe(f"--step {step}" if len(runs) == 1 else f"--step {role}={step}")
    return err.describe("")


def _one_line(message, limit: int = 1000) -> str:
    """An error message as the one line the command prints (whitespace and newlines folded)."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 25] + " ... (message shortened)"


def _quiet_unraisable(unraisable) -> None:
    """Errors in orbax's abandoned async reads after a failed restore (coroutines closed on an
    event loop that is gone): the restore's own error is what the user sees."""
    logging.getLogger(__name__).debug("ignored during shutdown: %s", unraisable.exc_value)


def add_demo_arguments(parser) -> None:
    """`unclip-jax demo`: the shapes demo (configs/shapes_demo.py), or the toy with --toy."""
    _add_config_args(parser, default="shapes_demo")
    parser.add_argument("--toy", action="store_true",
                        help="the diffusion-core toy demo (same as --config toy2d)")  # fmt: skip
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument(
        "--retrain", action="store_true",
        help="toy demo: train again even if a matching model is saved (the shapes demo resumes "
        "or reuses its runs; start afresh with another --out)",
    )  # fmt: skip


def run_demo(args) -> None:
    from unclip_jax import config_utils

    spec = args.config
    if args.toy and config_utils.resolve(spec)[0].stem != "toy2d":
        spec = "toy2d"
    if config_utils.resolve(spec)[0].stem == "toy2d":
        _run_toy_demo(args, spec)
        return
    from unclip_jax.demo import shapes

    print(DEMO_NOTE, flush=True)
    config = config_utils.load_config(spec, args.set)
    try:  # checks memory and disk before any work
        report = shapes.run(config, pathlib.Path(args.out))
    except shapes.NotEnoughResources as err:
        raise UserError(str(err)) from None
    print("\n" + "\n".join(shapes.format_report(report)))


def _run_toy_demo(args, spec: str) -> None:
    from unclip_jax import config_utils
    from unclip_jax.demo import toy2d

    print(TOY_NOTE, flush=True)
    config = config_utils.load_config(spec, args.set)
    start = time.perf_counter()
    report = toy2d.run(config, pathlib.Path(args.out), retrain=args.retrain)
    print(f"\n{'sampler':<10}{'steps':>6}{'guidance':>10}{'faithful':>10}{'on mode':>9}")
    for r in report["results"]:
        print(
            f"{r['sampler']:<10}{r['steps']:>6}{r['guidance']:>10.1f}"
            f"{r['faithfulness']:>10.3f}{r['on_a_mode']:>9.3f}"
        )
    for name, seconds in report["timings_s"].items():
        print(f"{name:<22}{seconds:8.1f} s")
    out = pathlib.Path(args.out)
    print(f"total {time.perf_counter() - start:.1f} s; wrote {out / 'toy2d.png'}, "
          f"{out / 'toy2d.json'}")  # fmt: skip


def _cmd_train(args) -> None:
    from unclip_jax import config_utils
    from unclip_jax.parallel import distributed

    distributed.from_args(args)  # before anything touches a device
    import jax

    from unclip_jax.train.loop import train

    config = config_utils.load_config(args.config, args.set)
    summary = train(config, args.workdir)
    if jax.process_index() == 0:
        print(f"trained to step {summary['step']}; checkpoints and metrics in {args.workdir}")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = storage.path(args.prompts)
        if not path.is_file():
            raise UserError(f"prompt file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"prompt file {path} is not UTF-8 text (byte {err.start}): one "
                            "prompt per line") from None  # fmt: skip
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompts: give them as arguments or with --prompts FILE")
    return [p for p in prompts for _ in range(args.per_prompt)]


def _scales(values, count: int, what: str):
    """One guidance scale, or one per prompt."""
    if len(values) not in (1, count):
        raise UserError(f"{what}: give one scale or one per prompt ({count}), got {len(values)}")
    return [values[0]] * count if len(values) == 1 else list(values)


def _cmd_sample(args) -> None:
    import jax
    import numpy as np

    from unclip_jax.pipelines.outputs import save_samples

    prompts = _read_prompts(args)
    rng = jax.random.key(args.seed)
    start = time.perf_counter()
    if args.pipeline == "glide":
        from unclip_jax.pipelines.glide import pipeline_from_runs

        if not args.base:
            raise UserError("--pipeline glide needs --base RUN (a GLIDE base run folder)")
        if args.clip_guidance and args.guidance:
            raise UserError("--clip-guidance replaces classifier-free guidance: drop --guidance "
                            "(its scale is --clip-guidance-scale)")  # fmt: skip
        pipe = pipeline_from_runs(args.base, args.upsampler, dtype=args.dtype)
        clip_guidance, clip_scales = None, None
        if args.clip_guidance:  # GLIDE's CLIP guidance, instead of classifier-free guidance
            from unclip_jax.pipelines.glide import clip_guidance_from_run

            clip_scales = _scales(args.clip_guidance_scale or [3.0], len(prompts),
                                  "--clip-guidance-scale")  # fmt: skip
            clip_guidance = clip_guidance_from_run(args.clip_guidance, prompts, clip_scales,
                                                   stage=pipe.base)  # fmt: skip
            scales = None
        else:
            scales = _scales(args.guidance or [3.0], len(prompts), "--guidance")
        out = pipe(prompts, rng, guidance_scale=None if scales is None else
                   np.asarray(scales, np.float32), clip_guidance=clip_guidance,
                   base_respacing=str(args.steps or 100),
                   base_sampler=args.sampler or "ddpm")  # fmt: skip
        record = dict(pipeline="glide", base=args.base, upsampler=args.upsampler,
                      sampler=args.sampler, steps=args.steps or 100, guidance=scales,
                      clip_guidance=args.clip_guidance, clip_guidance_scale=clip_scales,
                      dtype=args.dtype)  # fmt: skip
    else:
        if args.clip_guidance:
            raise UserError("--clip-guidance guides GLIDE's base stage: use --pipeline glide")
        pipe = _unclip_pipeline(args)
        scales = _scales(args.guidance or [pipe.decoder_sample.get("guidance_scale", 1.0)],
                         len(prompts), "--guidance")  # fmt: skip
        prior_scales = None
        if args.prior_guidance:
            prior_scales = _scales(args.prior_guidance, len(prompts), "--prior-guidance")
        out = pipe(prompts, rng, prior=args.prior, prior_guidance=prior_scales,
                   decoder_guidance=np.asarray(scales, np.float32),
                   decoder_respacing=None if args.steps is None else str(args.steps),
                   decoder_sampler=args.sampler)  # fmt: skip
        record = dict(pipeline="unclip", runs=_unclip_runs(args), prior=args.prior,
                      prior_guidance=prior_scales, decoder_guidance=scales,
                      decoder_sampler=args.sampler or pipe.decoder_sample.get("sampler"),
                      decoder_steps=args.steps or pipe.decoder_sample.get("respacing"),
                      dtype=args.dtype)  # fmt: skip
    images = jax.device_get(out["images"])
    from unclip_jax import compile_cache

    record.update(
        prompts=prompts,
        seed=args.seed,
        seconds=time.perf_counter() - start,
        compile=compile_cache.stats()
        | {"cache_dir": jax.config.jax_compilation_cache_dir or "off"},
    )
    paths = save_samples(args.out, images, record)
    print(f"wrote {len(images)} images: {paths['grid']}, {paths['record']}")


def _unclip_runs(args) -> dict:
    return {"clip": args.clip, "prior": args.prior_run, "ar_prior": args.ar_prior_run,
            "decoder": args.decoder, "upsamplers": args.upsamplers or []}  # fmt: skip


def _unclip_pipeline(args):
    from unclip_jax.pipelines.unclip import pipeline_from_runs

    if not args.clip or not args.decoder:
        raise UserError("the unclip pipeline needs --clip RUN and --decoder RUN")
    if getattr(args, "prior", "none") == "diffusion" and not args.prior_run:
        raise UserError("--prior diffusion needs --prior-run RUN")
    if getattr(args, "prior", "none") == "ar" and not args.ar_prior_run:
        raise UserError("--prior ar needs --ar-prior-run RUN")
    return pipeline_from_runs(clip=args.clip, decoder=args.decoder, prior=args.prior_run,
                              ar_prior=args.ar_prior_run, upsamplers=args.upsamplers or (),
                              dtype=getattr(args, "dtype", None))  # fmt: skip


def _add_unclip_runs(parser, with_priors: bool = True) -> None:
    parser.add_argument("--clip", help="unCLIP: the CLIP run folder (its tokenizer inside)")
    parser.add_argument("--decoder", help="unCLIP: the decoder run folder")
    parser.add_argument("--upsamplers", nargs="*", metavar="RUN",
                        help="unCLIP: upsampler run folders, in order (every word after it "
                        "until the next flag: give prompts and images first)")  # fmt: skip
    if with_priors:
        parser.add_argument("--prior-run", help="unCLIP: the diffusion prior's run folder")
        parser.add_argument("--ar-prior-run", help="unCLIP: the autoregressive prior's run")


def _load_images(paths, size: int):
    import numpy as np

    from unclip_jax.imaging import load_image

    for p in paths:
        if not storage.path(p).is_file():
            raise UserError(f"image not found: {p}")
    return np.stack([load_image(p, size) for p in paths])


def _add_manipulation_args(parser, func, out: str) -> None:
    """The runs, DDIM steps, seed and output folder of `vary` and `interpolate` (no prior)."""
    _add_unclip_runs(parser, with_priors=False)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (inversion, decoding)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out)
    _add_step_arg(parser)
    _add_dtype_arg(parser)
    parser.set_defaults(func=func, prior="none", prior_run=None, ar_prior_run=None)


def _cmd_vary(args) -> None:
    import jax

    from unclip_jax.pipelines.outputs import save_samples

    pipe = _unclip_pipeline(args)
    image = _load_images([args.image], pipe.decoder.sample_shape[0])[0]
    out = pipe.variations(image, jax.random.key(args.seed), n=args.n, eta=args.eta,
                          respacing=f"ddim{args.steps}")  # fmt: skip
    record = dict(command="vary", image=args.image, n=args.n, eta=args.eta, steps=args.steps,
                  seed=args.seed, runs=_unclip_runs(args), dtype=args.dtype)  # fmt: skip
    paths = save_samples(args.out, jax.device_get(out["images"]), record, stem="variation")
    print(f"wrote {args.n} variations: {paths['grid']}")


def _cmd_interpolate(args) -> None:
    import jax
    import numpy as np

    from unclip_jax.pipelines.outputs import save_samples

    pipe = _unclip_pipeline(args)
    images = _load_images([args.image_a, args.image_b], pipe.decoder.sample_shape[0])
    thetas = np.linspace(0.0, 1.0, args.n)
    out = pipe.interpolate(images[0], images[1], jax.random.key(args.seed), thetas=thetas,
                           fixed_noise=args.fixed_noise, respacing=f"ddim{args.steps}")  # fmt: skip
    record = dict(command="interpolate", images=[args.image_a, args.image_b],
                  thetas=thetas.tolist(), fixed_noise=args.fixed_noise, steps=args.steps,
                  seed=args.seed, runs=_unclip_runs(args), dtype=args.dtype)  # fmt: skip
    paths = save_samples(args.out, jax.device_get(out["images"]), record, ncol=args.n,
                         stem="interpolation")  # fmt: skip
    print(f"wrote {args.n} interpolation frames: {paths['grid']}")


def _read_mask(path, image_path):
    """A mask file -> bool [H, W], True = repaint (white: luminance >= 128), checked against
    the image: both files exist and read, same pixel size, something to repaint."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    for p in (image_path, path):
        if not storage.path(p).is_file():
            raise UserError(f"file not found: {p}")
    unreadable = (OSError, UnidentifiedImageError, Image.DecompressionBombError)
    try:
        with Image.open(image_path) as im:
            image_size = im.size
    except unreadable as err:
        raise UserError(f"cannot read {image_path}: {err}") from None
    try:
        with Image.open(path) as im:
            if im.size != image_size:
                raise UserError(f"mask {path} is {im.size[0]}x{im.size[1]} but image "
                                f"{image_path} is {image_size[0]}x{image_size[1]}")  # fmt: skip
            repaint = np.asarray(im.convert("L")) >= 128
    except unreadable as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not repaint.any():
        raise UserError(f"mask {path} has no white pixels: nothing to repaint")
    return repaint


def _keep_mask(repaint, size: int):
    """[size, size, 1] float32, 1 = keep (GLIDE's convention), resized nearest."""
    import numpy as np
    from PIL import Image

    small = Image.fromarray(repaint.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return (np.asarray(small) < 128).astype(np.float32)[..., None]


def _cmd_inpaint(args) -> None:
    import jax
    import numpy as np

    from unclip_jax.pipelines.glide import pipeline_from_runs
    from unclip_jax.pipelines.outputs import save_samples

    prompts = _read_prompts(args)
    repaint = _read_mask(args.mask, args.image)
    pipe = pipeline_from_runs(args.base, args.upsampler, dtype=args.dtype)
    stage = pipe.upsampler or pipe.base
    if "inpaint" not in pipe.base.model.mode:
        print(f"note: {args.base} is a {pipe.base.model.mode!r} model, not an inpainting "
              "one; the kept pixels are only pasted into each predicted x0",
              file=sys.stderr)  # fmt: skip
    size = stage.model.image_size
    image = _load_images([args.image], size)[0]
    keep = _keep_mask(repaint, size)
    batch = len(prompts)
    scales = _scales(args.guidance or [3.0], batch, "--guidance")
    start = time.perf_counter()
    out = pipe(prompts, jax.random.key(args.seed), guidance_scale=np.asarray(scales, np.float32),
               base_respacing=str(args.steps), base_sampler=args.sampler,
               inpaint_image=np.broadcast_to(image, (batch,) + image.shape),
               inpaint_mask=np.broadcast_to(keep, (batch,) + keep.shape))  # fmt: skip
    record = dict(command="inpaint", image=args.image, mask=args.mask, base=args.base,
                  upsampler=args.upsampler, sampler=args.sampler, steps=args.steps,
                  guidance=scales, prompts=prompts, seed=args.seed, dtype=args.dtype,
                  seconds=time.perf_counter() - start)  # fmt: skip
    paths = save_samples(args.out, jax.device_get(out["images"]), record, stem="inpaint")
    print(f"wrote {batch} inpaintings: {paths['grid']}, {paths['record']}")


def _cmd_convert(args) -> None:
    from unclip_jax.convert import runs

    storage.check_bucket(args.out)
    out = storage.path(args.out)
    names = ("clip", "prior", "decoder", "upsampler")
    targets = [out / n for n in names] if args.source == "karlo" else [out]
    for target in targets:
        if (target / "checkpoints").exists():
            raise UserError(f"{target} already holds a run; choose another --out")
    if args.source == "clip":
        written = {"clip": runs.convert_clip(args.path, out, tokenizer=args.tokenizer)}
    elif args.source == "glide":
        written = {"glide": runs.convert_glide(args.path, out, tokenizer=args.tokenizer,
                                               mode=args.mode)}  # fmt: skip
    else:
        written = runs.convert_karlo(args.path, out)
    for name, folder in written.items():
        print(f"{name:<10} {folder}")
    if args.source == "karlo":
        ups = f" --upsamplers {written['upsampler']}" if "upsampler" in written else ""
        runs_args = f"--clip {written['clip']} --decoder {written['decoder']}{ups}"
        if "prior" in written:
            print(f'sample with: unclip-jax sample "a prompt" --pipeline unclip {runs_args} '
                  f"--prior-run {written['prior']}")  # fmt: skip
        print(f"vary an image with: unclip-jax vary IMAGE {runs_args}")
    if args.source == "glide":
        print(
            f'sample with: unclip-jax sample --base {written["glide"]} "a prompt" (an upsampler '
            "run: --upsampler, beside a base)"
        )


def _cmd_data_prepare(args) -> None:
    from unclip_jax.data.embed_cli import open_source

    builder = open_source(args.dataset, args.data_dir, args.validation_fraction)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    where = builder.data_dir
    if storage.is_remote(args.data_dir):
        where = f"{args.data_dir} (read from its local copy {builder.data_dir})"
    print(f"{builder.info.full_name} in {where}: " +
          ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))  # fmt: skip


def _cmd_data_embed(args) -> None:
    from unclip_jax.data.embed_cli import run_embed

    print(run_embed(args).summary())


def _add_sample_args(parser) -> None:
    parser.add_argument("prompt", nargs="*", help="prompts (or --prompts FILE, one per line)")
    parser.add_argument("--prompts", help="a text file with one prompt per line")
    parser.add_argument("--per-prompt", type=int, default=1, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0, help="random seed (recorded)")
    parser.add_argument("--out", default="outputs/samples", help="output folder")


def _add_stage_args(parser, stage: str, *, sampler, steps) -> None:
    """--sampler, --steps and --guidance (one scale or one per prompt) of a sampled stage."""
    parser.add_argument(
        "--sampler",
        choices=("ddpm", "ddim", "dpm++2m"),
        default=sampler,
        help=f"sampler of {stage} (default: {sampler or 'the config'})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=steps,
        help=f"respaced steps of {stage} (default: {steps or 'the config'})",
    )
    parser.add_argument("--guidance", type=float, nargs="+", metavar="SCALE",
                        help=f"classifier-free guidance of {stage}: one scale or one per "
                        "prompt (it takes every number after it: give prompts first)")  # fmt: skip
    _add_dtype_arg(parser)


def _add_dtype_arg(parser) -> None:
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the networks' compute dtype (bfloat16 is meant for GPUs and TPUs; params, "
        "norms, softmax and the sampler stay float32)",
    )


def _add_config_args(parser, default=None) -> None:
    parser.add_argument("--config", required=default is None, default=default,
                        help="config file or name[:variant], e.g. toy2d:tiny")  # fmt: skip
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.steps=2000 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unclip-jax",
        description="GLIDE and unCLIP (DALL-E 2) text-to-image diffusion in JAX/Flax.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    parser.add_argument(
        "--compilation-cache", metavar="DIR|off", default=None,
        help="JAX's persistent compilation cache: a folder, or off (default: "
        "$UNCLIP_JAX_COMPILATION_CACHE, else ~/.cache/unclip-jax/jax; see docs/results.md)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="the embedded default: train and sample a tiny unCLIP + GLIDE stack on shapes",
        description=DEMO_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_arguments(demo)
    demo.set_defaults(func=run_demo)

    train = sub.add_parser(
        "train",
        help="train a model with the shared sharded loop (resumes from --workdir)",
        description="Train config.kind on a mesh built from config.mesh; checkpoints, the data "
        "position and metrics.jsonl go to --workdir, and a rerun resumes there. SIGTERM saves "
        "and exits 0.",
    )
    _add_config_args(train)
    train.add_argument("--workdir", required=True, help="run folder (resumed if it holds one)")
    from unclip_jax.parallel import distributed

    distributed.add_arguments(train)
    train.set_defaults(func=_cmd_train)

    sample = sub.add_parser(
        "sample",
        help="text to images with a GLIDE or unCLIP pipeline from trained runs",
        description="Sample images for prompts; writes grid.png, images/*.png and record.json "
        "(every setting and seed) to --out.",
    )
    _add_sample_args(sample)
    sample.add_argument("--pipeline", choices=("glide", "unclip"), default="glide")
    sample.add_argument("--base", help="GLIDE: the base model's run folder")
    sample.add_argument("--upsampler", help="GLIDE: an upsampler run folder (optional)")
    sample.add_argument("--clip-guidance", metavar="RUN",
                        help="GLIDE: guide the base stage by the gradient of a noise-aware CLIP "
                        "run (train --config noised_clip_b64) instead of classifier-free "
                        "guidance")  # fmt: skip
    sample.add_argument("--clip-guidance-scale", type=float, nargs="+", metavar="SCALE",
                        help="GLIDE: the CLIP guidance scale, one or one per prompt (default 3; "
                        "give prompts first)")  # fmt: skip
    _add_unclip_runs(sample)
    sample.add_argument(
        "--prior", choices=("diffusion", "ar", "none"), default="diffusion",
        help="unCLIP: the prior (none: the CLIP text embedding itself)",
    )  # fmt: skip
    sample.add_argument(
        "--prior-guidance", type=float, nargs="+", metavar="SCALE",
        help="unCLIP: the prior's guidance, one scale or one per prompt (give prompts first)",
    )  # fmt: skip
    _add_stage_args(sample, "the base/decoder stage", sampler=None, steps=None)
    _add_step_arg(sample)
    sample.set_defaults(func=_cmd_sample)

    vary = sub.add_parser(
        "vary",
        help="unCLIP image variations: DDIM-invert an image, decode its (z_i, x_T) with eta > 0",
        description="Variations of one image (resized to the decoder's size): its CLIP "
        "embedding and DDIM-inverted noise decoded with DDIM eta (0 reconstructs it).",
    )
    vary.add_argument("image", help="an image file")
    vary.add_argument("--n", type=int, default=4, help="number of variations")
    vary.add_argument("--eta", type=float, default=0.8, help="DDIM eta (0: reconstruction)")
    _add_manipulation_args(vary, _cmd_vary, "outputs/vary")

    interp = sub.add_parser(
        "interpolate",
        help="unCLIP interpolation between two images (slerp of CLIP embeddings and latents)",
        description="Frames along slerp(z_a, z_b, theta); x_T slerped between the images' "
        "DDIM inversions (the endpoints reconstruct them) or fixed (--fixed-noise).",
    )
    interp.add_argument("image_a")
    interp.add_argument("image_b")
    interp.add_argument("--n", type=int, default=5, help="frames, theta from 0 to 1")
    interp.add_argument("--fixed-noise", action="store_true", help="one random x_T for all")
    _add_manipulation_args(interp, _cmd_interpolate, "outputs/interpolate")

    inpaint = sub.add_parser(
        "inpaint",
        help="GLIDE inpainting: repaint the white region of a mask, guided by prompts",
        description="Repaint the white pixels of MASK (same pixel size as IMAGE; black pixels "
        "are kept) with a GLIDE base run (an inpainting model: glide_inpaint64) and optionally "
        "an upsampler run (glide_upsample256:inpaint). The known pixels are put back into every "
        "predicted x0. Writes grid.png, images/ and record.json to --out.",
    )
    inpaint.add_argument("image", help="the image file (resized to the model's size)")
    inpaint.add_argument("mask", help="mask file: white = repaint, black = keep")
    _add_sample_args(inpaint)
    inpaint.set_defaults(out="outputs/inpaint")
    inpaint.add_argument("--base", required=True, help="GLIDE base (inpainting) run folder")
    inpaint.add_argument("--upsampler", help="GLIDE upsampler run folder (optional)")
    _add_stage_args(inpaint, "the base stage", sampler="ddpm", steps=100)
    _add_step_arg(inpaint)
    inpaint.set_defaults(func=_cmd_inpaint)

    convert = sub.add_parser(
        "convert",
        help="import public weights (transformers CLIP, diffusers unCLIP/Karlo, GLIDE) as run "
        "folders",
        description="Convert public weights into params-only run folders that sample/vary/"
        "interpolate/inpaint/ablate/eval read like trained runs and that a training config can "
        "start from (ckpt.init_from). Sources: clip = a transformers CLIP folder (config.json, "
        "model.safetensors, tokenizer files) -> OUT; karlo = a diffusers unCLIP folder "
        "(kakaobrain/karlo-v1-alpha's layout) -> OUT/clip, OUT/prior, OUT/decoder, "
        "OUT/upsampler; glide = one glide-text2im checkpoint (base.pt, base_inpaint.pt, "
        "upsample.pt, upsample_inpaint.pt) with --tokenizer glide_text2im/tokenizer -> OUT. "
        "Safetensors are read directly; GLIDE's torch pickles through a restricted reader that "
        "runs no code (tensors only). Nothing is downloaded.",
    )
    convert.add_argument("source", choices=("clip", "karlo", "glide"),
                         help="what the path holds")  # fmt: skip
    convert.add_argument("path", help="the weights folder (glide: the .pt file)")
    convert.add_argument("--out", required=True, help="run folder (karlo: a folder of runs)")
    convert.add_argument("--tokenizer", help="clip: tokenizer folder, if not beside the weights; "
                         "glide: the folder with encoder.json.gz + vocab.bpe.gz (glide-text2im's "
                         "tokenizer/) or vocab.json + merges.txt (required)")  # fmt: skip
    convert.add_argument(
        "--mode",
        choices=("base", "inpaint", "upsample", "upsample_inpaint"),
        help="glide: the checkpoint's model (default: read from the weights)",
    )
    convert.set_defaults(func=_cmd_convert)

    from unclip_jax.eval.ablate import add_ablate_arguments, run_ablate
    from unclip_jax.eval.report import add_eval_arguments, run_eval

    ablate_cmd = sub.add_parser(
        "ablate",
        help="guidance-scale x prior-type ablation of unCLIP (and GLIDE)",
        description="Sweep decoder/prior guidance scales and prior types (GLIDE's scales with "
        "--glide-base), batched with per-example scales (one compilation per stage); writes "
        "ablation.csv/json, three plots and grids/ to --out.",
    )
    add_ablate_arguments(ablate_cmd)
    _add_step_arg(ablate_cmd)
    ablate_cmd.set_defaults(func=run_ablate)
    eval_cmd = sub.add_parser(
        "eval",
        help="faithfulness, CLIP score, diversity and Frechet distance of a samples folder",
        description="Score a folder written by `sample` (record.json + images): shapes caption "
        "faithfulness per attribute, CLIP score and diversity (--clip RUN), Frechet distance on "
        "CLIP features against --reference or a shapes split.",
    )
    add_eval_arguments(eval_cmd)
    _add_step_arg(eval_cmd)
    eval_cmd.set_defaults(func=run_eval)

    from unclip_jax.data.embed_cli import add_embed_arguments

    data = sub.add_parser("data", help="prepare datasets (CLIP embeddings as a side dataset)")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    embed = data_sub.add_parser(
        "embed",
        help="CLIP image/text embeddings and text token features of a dataset split",
        description="Embed a split once with a CLIP (a clip run or a transformers folder) into a "
        "tfds array_record side dataset that prior and decoder runs read (data.embeddings): "
        "each host writes its own shards, a rerun resumes or does nothing, and the statistics "
        "the priors need are saved beside it.",
    )
    add_embed_arguments(embed)
    embed.set_defaults(func=_cmd_data_embed)
    prepare = data_sub.add_parser(
        "prepare",
        help="build a dataset (shapes or an image-text folder) as tfds array_record",
        description="Build `shapes[:tiny|small|default]` (the procedural captioned shapes) or "
        "`image_text:<folder>` (images + captions: a folder of .txt pairs, a CSV/parquet, or "
        "webdataset tar shards; unreadable images are skipped and reported) under --data_dir. "
        "Already built datasets are reused.",
    )
    prepare.add_argument("--dataset", required=True, help="shapes[:config] or image_text:<folder>")
    prepare.add_argument("--data_dir", required=True, help="tfds folder to build into")
    prepare.add_argument("--validation-fraction", type=float, default=0.0,
                         help="image_text: the fraction of pairs (chosen by a hash of their key) "
                         "that form a validation split, for held-out loss and sample grids; "
                         "fixed when the dataset is first built")  # fmt: skip
    prepare.set_defaults(func=_cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    # orbax logs every checkpoint phase through absl at INFO; keep -v readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from unclip_jax.run_paths import DamagedCheckpoint, DamagedCheckpointsOnly
    from unclip_jax.storage import StorageError

    sys.unraisablehook = _quiet_unraisable
    try:
        from unclip_jax import compile_cache

        compile_cache.enable(args.compilation_cache)
        _apply_steps(args)
        args.func(args)
    except DamagedCheckpoint as err:
        print(f"unclip-jax {args.command}: error: {_damage_report(args, err)}", file=sys.stderr)
        return 2
    except (UserError, FileNotFoundError, KeyError, TypeError, ValueError,
            DamagedCheckpointsOnly, StorageError) as err:  # fmt: skip
        # Config and input problems: one line, no traceback.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"unclip-jax {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
