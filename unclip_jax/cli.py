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

DEMO_NOTE = (
    "unclip-jax demo: the diffusion-core toy demo (2-D data, class-conditional MLP, hybrid loss,\n"
    "every sampler with classifier-free guidance). The embedded shapes/unCLIP demo is planned\n"
    "(issue 7); this is the furthest end-to-end path that exists today."
)


class UserError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


def _cmd_demo(args) -> None:
    from unclip_jax import config_utils
    from unclip_jax.demo import toy2d

    print(DEMO_NOTE, flush=True)
    config = config_utils.load_config(args.config, args.set)
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
    from unclip_jax.train.loop import train

    config = config_utils.load_config(args.config, args.set)
    summary = train(config, args.workdir)
    print(f"trained to step {summary['step']}; checkpoints and metrics.jsonl in {args.workdir}")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = pathlib.Path(args.prompts)
        if not path.is_file():
            raise UserError(f"prompt file not found: {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
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
        pipe = pipeline_from_runs(args.base, args.upsampler)
        scales = _scales(args.guidance or [3.0], len(prompts), "--guidance")
        out = pipe(prompts, rng, guidance_scale=np.asarray(scales, np.float32),
                   base_respacing=str(args.steps or 100), base_sampler=args.sampler)  # fmt: skip
        record = dict(pipeline="glide", base=args.base, upsampler=args.upsampler,
                      sampler=args.sampler, steps=args.steps or 100, guidance=scales)  # fmt: skip
    else:
        from unclip_jax.pipelines import unclip

        out, record = unclip.sample_from_args(args, prompts, rng)
    images = jax.device_get(out["images"])
    record.update(prompts=prompts, seed=args.seed, seconds=time.perf_counter() - start)
    paths = save_samples(args.out, images, record)
    print(f"wrote {len(images)} images: {paths['grid']}, {paths['record']}")


def _add_sample_args(parser) -> None:
    parser.add_argument("prompt", nargs="*", help="prompts (or --prompts FILE, one per line)")
    parser.add_argument("--prompts", help="a text file with one prompt per line")
    parser.add_argument("--per-prompt", type=int, default=1, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0, help="random seed (recorded)")
    parser.add_argument("--out", default="outputs/samples", help="output folder")


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train and sample the toy model that exercises the diffusion core",
        description=DEMO_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(demo, default="toy2d")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument(
        "--retrain", action="store_true", help="train again even if a matching model is saved"
    )
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser(
        "train",
        help="train a model with the shared sharded loop (resumes from --workdir)",
        description="Train config.kind on a mesh built from config.mesh; checkpoints, the data "
        "position and metrics.jsonl go to --workdir, and a rerun resumes there. SIGTERM saves "
        "and exits 0.",
    )
    _add_config_args(train)
    train.add_argument("--workdir", required=True, help="run folder (resumed if it holds one)")
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
    sample.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++2m"), default="ddpm",
                        help="sampler of the base/decoder stage")  # fmt: skip
    sample.add_argument("--steps", type=int, help="respaced steps of the base/decoder stage")
    sample.add_argument("--guidance", type=float, nargs="+", metavar="SCALE",
                        help="classifier-free guidance of the base/decoder stage: one scale "
                        "or one per prompt")  # fmt: skip
    sample.set_defaults(func=_cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    # orbax logs every checkpoint phase through absl at INFO; keep -v readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        args.func(args)
    except (UserError, FileNotFoundError, KeyError, TypeError, ValueError) as err:
        # Config and input problems: one line, no traceback.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"unclip-jax {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
