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
