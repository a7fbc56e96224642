"""Guidance-scale x prior-type ablations of unCLIP against GLIDE (issue 7; the unCLIP paper's
Figures 7-9 in miniature): caption faithfulness, CLIP score and diversity per setting.

A setting is (pipeline, prior type, prior guidance, decoder guidance); for GLIDE the base stage's
guidance. Every (setting, prompt, sample) row of one prior type goes through the pipeline in
batches of one shape (the last padded) with per-example guidance scales, so each stage compiles
once per prior type, not once per scale (DESIGN 6). The CLIP metrics embed every image in batches
of one shape too. Outputs (`run_ablation`): ablation.csv, ablation.json (rows, settings, timings,
the plain-words summary), three plots and one grid per setting (rows = prompts, columns = samples).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import pathlib
import time

import numpy as np

from unclip_jax import storage
from unclip_jax.eval.report import FAITHFULNESS_KEYS, json_safe, plot_ablation, summarize

log = logging.getLogger(__name__)

__all__ = ["run_ablation", "summarize", "parse_scales", "add_ablate_arguments", "run_ablate"]

UNCLIP_PRIORS = ("diffusion", "ar", "none")
CSV_COLUMNS = ("pipeline", "prior", "prior_scale", "decoder_scale", "n", *FAITHFULNESS_KEYS,
               "background_error", "clip_score", "diversity", "grid")  # fmt: skip


def _check_scales(values, what: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{what}: give at least one guidance scale")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"{what}: guidance scales must be finite and >= 0, got {bad}")
    return values


def _check_prompts(prompts, evaluate_faithfulness: bool) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    prompts = [str(p).strip() for p in prompts]
    if not prompts or not all(prompts):
        raise ValueError("the ablation needs at least one non-empty prompt")
    if evaluate_faithfulness:
        from unclip_jax.eval.faithfulness import parse_caption

        for p in prompts:  # fail before any sampling, naming the caption
            parse_caption(p)
    return prompts


def _settings(unclip, glide, prior_types, prior_scales, decoder_scales, glide_scales):
    """[(pipeline, prior, prior_scale, decoder_scale)] in sweep order; the skipped priors."""
    settings, skipped = [], []
    for prior in prior_types:
        if prior not in UNCLIP_PRIORS:
            raise ValueError(f"unknown prior type {prior!r}; expected one of {UNCLIP_PRIORS}")
        if unclip is None:
            skipped.append((prior, "no unCLIP pipeline given"))
            continue
        if prior != "none" and prior not in unclip.priors:
            skipped.append((prior, f"the pipeline has no {prior!r} prior"))
            continue
        # The "none" prior uses the text embedding itself: prior guidance does not apply.
        for ps in [math.nan] if prior == "none" else prior_scales:
            settings += [("unclip", prior, ps, ds) for ds in decoder_scales]
    if glide is not None:
        settings += [("glide", "glide", math.nan, gs) for gs in glide_scales]
    for prior, why in skipped:
        log.warning("ablation: prior type %r skipped (%s)", prior, why)
    return settings, skipped


def _chunks(n: int, size: int):
    """(start, stop) of batches of `size` rows over n rows (the last is padded by the caller)."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _pad(values: list, size: int) -> list:
    return values + [values[-1]] * (size - len(values))


def _sample_group(pipe_kind, pipe, rows, prompts, *, batch, rng, unclip_kwargs, glide_kwargs):
    """Images [len(rows), H, W, 3] (host) for rows [(setting, prompt_index)] of one prior type."""
    import jax

    images, seconds = [], []
    for i, (start, stop) in enumerate(_chunks(len(rows), batch)):
        chunk = _pad(rows[start:stop], batch)
        texts = [prompts[p] for _, p in chunk]
        scales = np.asarray([s[3] for s, _ in chunk], np.float32)
        key = jax.random.fold_in(rng, i)
        t0 = time.perf_counter()
        if pipe_kind == "glide":
            out = pipe(texts, key, guidance_scale=scales, **glide_kwargs)
        else:
            prior = chunk[0][0][1]
            prior_scales = None
            if prior != "none":
                prior_scales = np.asarray([s[2] for s, _ in chunk], np.float32)
            out = pipe(texts, key, prior=prior, prior_guidance=prior_scales,
                       decoder_guidance=scales, **unclip_kwargs)  # fmt: skip
        host = np.asarray(jax.device_get(out["images"]), np.float32)[: stop - start]
        seconds.append(time.perf_counter() - t0)
        images.append(host)
    return np.concatenate(images), seconds


def _label(setting) -> str:
    pipeline, prior, ps, ds = setting
    if pipeline == "glide":
        return f"glide_g{ds:g}"
    return f"unclip_{prior}" + ("" if math.isnan(ps) else f"_p{ps:g}") + f"_d{ds:g}"


def _clip_embeddings(clip, images: list, prompts, max_batch):
    """L2-normalised CLIP image embeddings [N, E] of images (of any sizes: GLIDE and unCLIP may
    end at different ones; one pass per size) and text embeddings [P, E] of the prompts."""
    from unclip_jax.eval import clip_metrics as cm

    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    image_emb = None
    for idx in by_shape.values():
        emb = cm.clip_image_embeddings(clip.model, clip.params, np.stack([images[i] for i in idx]),
                                       batch_size=max_batch)  # fmt: skip
        if image_emb is None:
            image_emb = np.zeros((len(images), emb.shape[1]), np.float32)
        image_emb[idx] = emb
    tokens = clip.tokenizer(list(prompts))
    text_emb = cm.clip_text_embeddings(clip.model, clip.params, tokens.input_ids,
                                       eot_positions=tokens.eot_positions,
                                       batch_size=max_batch)  # fmt: skip
    return image_emb, text_emb


def _metrics(images, prompt_index, prompts, evaluate_faithfulness, image_emb, text_emb) -> dict:
    from unclip_jax.eval import clip_metrics as cm

    row = {k: math.nan for k in (*FAITHFULNESS_KEYS, "background_error", "clip_score", "diversity")}
    if evaluate_faithfulness:
        from unclip_jax.eval.faithfulness import evaluate_shapes

        result = evaluate_shapes(images, [prompts[p] for p in prompt_index])
        row |= {f"faithfulness_{k}": result[k] for k in
                ("count", "color", "shape", "size", "relation", "caption")}  # fmt: skip
        row["background_error"] = result["background_error"]
    if image_emb is not None:
        row["clip_score"] = float(np.mean(
            cm.clip_score_from_embeddings(image_emb, text_emb[prompt_index])))  # fmt: skip
        if np.bincount(prompt_index).max() >= 2:
            row["diversity"] = cm.diversity(image_emb, groups=list(prompt_index))
    return row


def run_ablation(*, prompts: list[str], out_dir, unclip=None, glide=None,
                 prior_types=("diffusion", "ar", "none"), decoder_scales=(1.0, 2.0, 4.0),
                 prior_scales=(1.0,), glide_scales=None, samples_per_prompt=4, seed=0,
                 clip=None, decoder_respacing=None, glide_respacing=None,
                 evaluate_faithfulness=True, max_batch: int = 64, upsample: bool = True,
                 decoder_sampler: str | None = None) -> dict:  # fmt: skip
    """Sweep guidance scales x prior types of an UnclipPipeline (and GLIDE's scales of a
    GlidePipeline); write the table, plots and grids to out_dir; return rows and paths.

    unclip / glide: the pipelines (either may be None). Prior types the unCLIP pipeline lacks are
    skipped with a logged note. glide_scales defaults to decoder_scales. clip: the ClipEncoder of
    the CLIP metrics (default unclip.clip; without one they are NaN). Faithfulness needs prompts
    of the shapes grammar. Rows hold, per setting: pipeline, prior, prior_scale (NaN where it
    does not apply), decoder_scale (GLIDE: its base guidance), n, faithfulness_<attribute>,
    clip_score, diversity (NaN when not measured) and the grid's path.
    """
    if unclip is None and glide is None:
        raise ValueError("the ablation needs an unCLIP pipeline, a GLIDE pipeline or both")
    if int(samples_per_prompt) < 1 or int(max_batch) < 1:
        raise ValueError(f"samples_per_prompt ({samples_per_prompt}) and max_batch ({max_batch}) "
                         "must be >= 1")  # fmt: skip
    prompts = _check_prompts(prompts, evaluate_faithfulness)
    decoder_scales = _check_scales(decoder_scales, "decoder scales")
    prior_scales = _check_scales(prior_scales, "prior scales")
    glide_scales = _check_scales(decoder_scales if glide_scales is None else glide_scales,
                                 "GLIDE scales")  # fmt: skip
    settings, skipped = _settings(unclip, glide, list(prior_types), prior_scales, decoder_scales,
                                  glide_scales)  # fmt: skip
    if not settings:
        raise ValueError(f"nothing to run: every prior type was skipped ({skipped})")
    # A gs:// folder is written locally (matplotlib, csv) and uploaded at the end; the record
    # names the files where they end up.
    out = storage.path(out_dir)
    work = storage.local_mirror(out_dir) if storage.is_remote(out_dir) else out
    (work / "grids").mkdir(parents=True, exist_ok=True)
    n = int(samples_per_prompt)

    # Rows of one group (a prior type, or GLIDE) go through its pipeline together.
    groups: dict[str, list] = {}
    for s in settings:
        groups.setdefault(s[1], []).extend((s, p) for p in range(len(prompts)) for _ in range(n))
    # One batch size for every unCLIP group: the decoder and upsamplers then compile once.
    unclip_rows = [len(r) for g, r in groups.items() if g != "glide"]
    unclip_batch = min(int(max_batch), max(unclip_rows)) if unclip_rows else 0
    unclip_kwargs = dict(decoder_respacing=decoder_respacing, decoder_sampler=decoder_sampler,
                         upsample=upsample)  # fmt: skip
    glide_kwargs = {} if glide_respacing is None else {"base_respacing": str(glide_respacing)}
    import jax  # here, not at the top: `unclip-jax --help` builds this module's parser without JAX

    rng = jax.random.key(seed)
    images_of, timings = {}, {}
    for name, rows in groups.items():
        is_glide = name == "glide"
        batch = min(int(max_batch), len(rows)) if is_glide else unclip_batch
        t0 = time.perf_counter()
        images, seconds = _sample_group("glide" if is_glide else "unclip",
                                        glide if is_glide else unclip, rows, prompts, batch=batch,
                                        rng=rng, unclip_kwargs=unclip_kwargs,
                                        glide_kwargs=glide_kwargs)  # fmt: skip
        timings[name] = {"seconds": time.perf_counter() - t0, "batch": batch,
                         "chunks": len(seconds), "chunk_seconds": seconds}  # fmt: skip
        log.info(
            "ablation: %s sampled %d rows in %.1f s", name, len(rows), timings[name]["seconds"]
        )
        for row, image in zip(rows, images, strict=True):
            images_of.setdefault(row[0], []).append((row[1], image))

    # CLIP metrics: one embedding pass over every image (images of any resolution).
    clip = clip if clip is not None else getattr(unclip, "clip", None)
    t0 = time.perf_counter()
    order = [(s, p, im) for s in settings for p, im in images_of[s]]
    image_emb = text_emb = None
    if clip is not None:
        image_emb, text_emb = _clip_embeddings(clip, [im for _, _, im in order], prompts,
                                               max_batch)  # fmt: skip
    table, offset = [], 0
    for s in settings:
        members = images_of[s]
        images = np.stack([im for _, im in members])
        prompt_index = np.asarray([p for p, _ in members])
        emb = None if image_emb is None else image_emb[offset : offset + len(members)]
        offset += len(members)
        grid = out / "grids" / f"{_label(s)}.png"
        _save_grid(images, prompt_index, len(prompts), n, work / "grids" / grid.name)
        row = dict(pipeline=s[0], prior=s[1], prior_scale=s[2], decoder_scale=s[3],
                   n=len(members))  # fmt: skip
        row |= _metrics(images, prompt_index, prompts, evaluate_faithfulness, emb, text_emb)
        row["grid"] = str(grid)
        table.append(row)
    timings["metrics_seconds"] = time.perf_counter() - t0

    summary = summarize(table)
    paths = {"csv": str(out / "ablation.csv"), "json": str(out / "ablation.json"),
             "grids": [r["grid"] for r in table]}  # fmt: skip
    _write_csv(table, work / "ablation.csv")
    plots = plot_ablation(table, work, fidelity="faithfulness_caption"
                          if evaluate_faithfulness else "clip_score")  # fmt: skip
    paths["plots"] = [str(out / pathlib.Path(p).name) for p in plots]
    record = {
        "rows": table,
        "summary": summary,
        "settings": dict(prompts=prompts, prior_types=list(prior_types),
                         decoder_scales=decoder_scales, prior_scales=prior_scales,
                         glide_scales=glide_scales if glide is not None else None,
                         samples_per_prompt=n, seed=seed, decoder_respacing=decoder_respacing,
                         glide_respacing=glide_respacing, decoder_sampler=decoder_sampler,
                         upsample=upsample, max_batch=int(max_batch),
                         evaluate_faithfulness=evaluate_faithfulness,
                         skipped=[{"prior": p, "reason": r} for p, r in skipped]),
        "timings_s": timings,
        "paths": paths,
    }  # fmt: skip
    (work / "ablation.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
    if work != out:
        storage.publish(work, out)
    for line in summary:
        log.info("ablation: %s", line)
    return {"rows": table, "paths": paths, "summary": summary, "timings_s": timings,
            "skipped": skipped}  # fmt: skip


def _save_grid(images, prompt_index, num_prompts, n, path) -> None:
    """Rows = prompts, columns = samples (images arrive prompt-major already)."""
    from unclip_jax.imaging import make_grid, save_png

    order = np.argsort(prompt_index, kind="stable")
    save_png(make_grid(images[order], ncol=n), path)


def _write_csv(rows, path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(row[k], float) and math.isnan(row[k])
                             else row[k] for k in CSV_COLUMNS})  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The `unclip-jax ablate` command.


def parse_scales(values, what: str) -> list[float]:
    """Guidance scales from the command line: "1 2 4" or "1,2,4"; ValueError naming the flag."""
    out = []
    for value in values or []:
        for part in str(value).replace(",", " ").split():
            try:
                out.append(float(part))
            except ValueError:
                raise ValueError(f"{what}: {part!r} is not a number") from None
    return _check_scales(out, what)


def read_prompts(prompts, prompts_file=None) -> list[str]:
    """Prompts given as arguments plus those of a file (one per line); ValueError when none."""
    prompts = [p for p in (prompts or []) if p.strip()]
    if prompts_file:
        path = pathlib.Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompt file {path} holds no prompts")
        prompts += lines
    if not prompts:
        raise ValueError("no prompts: give them as arguments or with --prompts FILE")
    return prompts


def add_ablate_arguments(parser) -> None:
    """The flags of `unclip-jax ablate`."""
    parser.add_argument("prompt", nargs="*", help="prompts (or --prompts FILE, one per line)")
    parser.add_argument("--prompts", help="a text file with one prompt per line")
    parser.add_argument("--clip", help="unCLIP: the CLIP run folder (also the metrics' CLIP)")
    parser.add_argument("--decoder", help="unCLIP: the decoder run folder")
    parser.add_argument("--prior-run", help="unCLIP: the diffusion prior's run folder")
    parser.add_argument("--ar-prior-run", help="unCLIP: the autoregressive prior's run folder")
    parser.add_argument("--upsamplers", nargs="*", metavar="RUN", default=[],
                        help="unCLIP: upsampler run folders, in order")  # fmt: skip
    parser.add_argument("--glide-base", help="GLIDE: the base model's run folder (adds GLIDE)")
    parser.add_argument("--glide-upsampler", help="GLIDE: an upsampler run folder (optional)")
    parser.add_argument("--prior-types", nargs="+", default=list(UNCLIP_PRIORS),
                        choices=UNCLIP_PRIORS, help="unCLIP prior types to sweep")  # fmt: skip
    parser.add_argument(
        "--decoder-scales",
        nargs="+",
        default=["1", "2", "4"],
        metavar="SCALE",
        help="decoder guidance scales (also GLIDE's unless --glide-scales)",
    )
    parser.add_argument("--prior-scales", nargs="+", default=["1"], metavar="SCALE",
                        help="diffusion/AR prior guidance scales")  # fmt: skip
    parser.add_argument(
        "--glide-scales",
        nargs="+",
        metavar="SCALE",
        help="GLIDE guidance scales (default: the decoder scales)",
    )
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, help="respaced steps of the decoder and GLIDE base (default: configs')"
    )
    parser.add_argument("--max-batch", type=int, default=64, help="rows per pipeline call")
    parser.add_argument("--no-upsample", action="store_true",
                        help="unCLIP: stop at the decoder's resolution")  # fmt: skip
    parser.add_argument(
        "--no-faithfulness",
        action="store_true",
        help="skip caption faithfulness (prompts outside the shapes grammar)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/ablation", help="output folder")


def _check_run(path, flag: str) -> str:
    if not pathlib.Path(path).is_dir():
        raise FileNotFoundError(f"{flag}: run folder not found: {path}")
    return str(path)


def run_ablate(args) -> dict:
    """`unclip-jax ablate`: build the pipelines from run folders, run the sweep, print a table."""
    from unclip_jax.eval.report import format_table

    prompts = read_prompts(args.prompt, args.prompts)
    decoder_scales = parse_scales(args.decoder_scales, "--decoder-scales")
    prior_scales = parse_scales(args.prior_scales, "--prior-scales")
    glide_scales = None
    if args.glide_scales:
        glide_scales = parse_scales(args.glide_scales, "--glide-scales")
    if args.samples_per_prompt < 1 or args.max_batch < 1 or (args.steps is not None
                                                             and args.steps < 1):  # fmt: skip
        raise ValueError("--samples-per-prompt, --max-batch and --steps must be >= 1")
    if bool(args.clip) != bool(args.decoder):
        raise ValueError("unCLIP needs both --clip RUN and --decoder RUN")
    if not args.clip and not args.glide_base:
        raise ValueError("nothing to ablate: give --clip and --decoder (unCLIP), --glide-base "
                         "(GLIDE) or both")  # fmt: skip
    runs = {"--clip": args.clip, "--decoder": args.decoder, "--prior-run": args.prior_run,
            "--ar-prior-run": args.ar_prior_run, "--glide-base": args.glide_base,
            "--glide-upsampler": args.glide_upsampler}  # fmt: skip
    for flag, path in runs.items():
        if path:
            _check_run(path, flag)
    for path in args.upsamplers or []:
        _check_run(path, "--upsamplers")
    unclip = glide = None
    if args.clip:
        from unclip_jax.pipelines.unclip import pipeline_from_runs

        unclip = pipeline_from_runs(clip=args.clip, decoder=args.decoder, prior=args.prior_run,
                                    ar_prior=args.ar_prior_run,
                                    upsamplers=args.upsamplers or ())  # fmt: skip
    if args.glide_base:
        from unclip_jax.pipelines import glide as glide_pipeline

        glide = glide_pipeline.pipeline_from_runs(args.glide_base, args.glide_upsampler)
    steps = None if args.steps is None else str(args.steps)
    result = run_ablation(prompts=prompts, out_dir=args.out, unclip=unclip, glide=glide,
                          prior_types=tuple(args.prior_types), decoder_scales=decoder_scales,
                          prior_scales=prior_scales, glide_scales=glide_scales,
                          samples_per_prompt=args.samples_per_prompt, seed=args.seed,
                          decoder_respacing=steps, glide_respacing=steps,
                          evaluate_faithfulness=not args.no_faithfulness,
                          max_batch=args.max_batch, upsample=not args.no_upsample)  # fmt: skip
    for prior, reason in result["skipped"]:
        print(f"skipped prior type {prior!r}: {reason}")
    print(format_table(result["rows"]))
    print("\n".join(result["summary"]))
    print(
        f"wrote {result['paths']['csv']}, {result['paths']['json']}, "
        f"{len(result['paths']['plots'])} plots and {len(result['paths']['grids'])} grids"
    )
    return result
