"""Reading ablation results and sample folders: the plain-words summary against the papers' claims,
the plots, the printed table, and `unclip-jax eval` (metrics of a folder that `sample` wrote).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib

import numpy as np

from unclip_jax import storage

log = logging.getLogger(__name__)

ATTRIBUTES = ("count", "color", "shape", "size", "relation", "caption")
FAITHFULNESS_KEYS = tuple(f"faithfulness_{a}" for a in ATTRIBUTES)


def _finite(x) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def json_safe(value):
    """NaN -> None (strict JSON), NumPy scalars -> Python numbers, tuples -> lists."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _lines(rows) -> dict[tuple, list[dict]]:
    """Rows grouped into curves over the decoder scale: (pipeline, prior, prior_scale)."""
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["pipeline"], r["prior"], r["prior_scale"] if _finite(r["prior_scale"]) else None)
        lines.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r["decoder_scale"]) for k, v in lines.items()}


def _line_name(key) -> str:
    pipeline, prior, ps = key
    if pipeline == "glide":
        return "GLIDE"
    return f"unCLIP {prior} prior" + ("" if ps is None else f" (prior scale {ps:g})")


def _fidelity(rows) -> str | None:
    """The fidelity metric the rows measure: caption faithfulness, else the CLIP score."""
    for key in ("faithfulness_caption", "clip_score"):
        if any(_finite(r.get(key)) for r in rows):
            return key
    return None


def _verdict(checks: list[bool]) -> str:
    return "yes" if all(checks) else "no"


def summarize(rows) -> list[str]:
    """Whether the rows show what the GLIDE/unCLIP papers report, as yes / no / not measured with
    the numbers: (1) guidance raises faithfulness, (2) guidance lowers diversity, (3) unCLIP is
    more diverse than GLIDE at equal guidance, (4) the diffusion prior is at least as faithful as
    the AR prior. "yes" means every comparison in the rows agrees; tiny or untrained models may
    well show "no". Faithfulness falls back to the CLIP score when it was not measured."""
    lines = _lines(rows)
    fid = _fidelity(rows)
    fid_name = {"faithfulness_caption": "caption faithfulness", "clip_score": "CLIP score"}
    out = []

    def trend(metric, name, want_up, claim):
        parts, checks = [], []
        for key, curve in lines.items():
            ends = [r for r in curve if _finite(r.get(metric))]
            if len(ends) < 2 or ends[0]["decoder_scale"] == ends[-1]["decoder_scale"]:
                continue
            lo, hi = ends[0], ends[-1]
            up = hi[metric] > lo[metric]
            checks.append(up if want_up else hi[metric] < lo[metric])
            parts.append(f"{_line_name(key)}: {lo[metric]:.3f} at {lo['decoder_scale']:g} -> "
                         f"{hi[metric]:.3f} at {hi['decoder_scale']:g}")  # fmt: skip
        if not checks:
            return f"{claim}: not measured (needs {name} at two or more guidance scales)"
        return f"{claim}: {_verdict(checks)} ({'; '.join(parts)})"

    if fid is None:
        out.append("guidance raises faithfulness: not measured (no faithfulness or CLIP score)")
    else:
        out.append(trend(fid, fid_name[fid], True, f"guidance raises {fid_name[fid]}"))
    out.append(trend("diversity", "diversity", False, "guidance lowers diversity"))

    # unCLIP vs GLIDE at equal guidance: unCLIP's diffusion prior where present.
    glide = {r["decoder_scale"]: r for r in rows if r["pipeline"] == "glide"}
    unclip = [r for r in rows if r["pipeline"] == "unclip" and _finite(r.get("diversity"))]
    priors = [p for p in ("diffusion", "ar", "none") if any(r["prior"] == p for r in unclip)]
    claim = "unCLIP more diverse than GLIDE at equal guidance"
    pairs = []
    if priors:
        chosen = [r for r in unclip if r["prior"] == priors[0]]
        first_ps = chosen[0]["prior_scale"]  # one prior scale: the first swept
        for r in chosen:
            g = glide.get(r["decoder_scale"])
            same_ps = r["prior_scale"] == first_ps or not _finite(first_ps)
            if g is not None and same_ps and _finite(g.get("diversity")):
                pairs.append((r["decoder_scale"], r["diversity"], g["diversity"]))
    if not pairs:
        out.append(f"{claim}: not measured (needs unCLIP and GLIDE diversity at a common scale)")
    else:
        text = "; ".join(f"scale {s:g}: unCLIP ({priors[0]} prior) {u:.3f} vs GLIDE {g:.3f}"
                         for s, u, g in pairs)  # fmt: skip
        out.append(f"{claim}: {_verdict([u > g for _, u, g in pairs])} ({text})")

    # Diffusion vs AR prior at equal (prior scale, decoder scale).
    claim = "diffusion prior at least as good as the AR prior"
    by = {(r["prior"], r["prior_scale"], r["decoder_scale"]): r for r in rows}
    pairs = []
    if fid is not None:
        for (prior, ps, ds), r in by.items():
            other = by.get(("ar", ps, ds))
            if prior == "diffusion" and other is not None and _finite(r.get(fid)) and _finite(
                    other.get(fid)):  # fmt: skip
                pairs.append((ps, ds, r[fid], other[fid]))
    if not pairs:
        out.append(f"{claim}: not measured (needs both priors at common scales)")
    else:
        text = "; ".join(f"prior {ps:g} decoder {ds:g}: {d:.3f} vs {a:.3f}"
                         for ps, ds, d, a in pairs)  # fmt: skip
        mean_d = np.mean([d for *_, d, _ in pairs])
        mean_a = np.mean([a for *_, a in pairs])
        out.append(f"{claim} ({fid_name[fid]}): {_verdict([d >= a for *_, d, a in pairs])} "
                   f"(mean {mean_d:.3f} vs {mean_a:.3f}; {text})")  # fmt: skip
    return out


def plot_ablation(rows, out_dir, *, fidelity: str = "faithfulness_caption") -> list[str]:
    """Three PNGs: fidelity vs decoder guidance, diversity vs guidance, and the fidelity-diversity
    trade-off (points labelled by scale); one line per prior type (and prior scale), GLIDE its own.
    Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    out = pathlib.Path(out_dir)
    lines = _lines(rows)
    fid_label = {"faithfulness_caption": "caption faithfulness", "clip_score": "CLIP score"}.get(
        fidelity, fidelity)  # fmt: skip
    paths = []

    def values(curve, key):
        return [r[key] if _finite(r.get(key)) else np.nan for r in curve]

    for key, ylabel, name in ((fidelity, fid_label, "faithfulness_vs_guidance.png"),
                              ("diversity", "diversity (CLIP cosine distance)",
                               "diversity_vs_guidance.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
        for line, curve in lines.items():
            ax.plot(
                [r["decoder_scale"] for r in curve],
                values(curve, key),
                marker="o",
                linestyle="--" if line[0] == "glide" else "-",
                label=_line_name(line),
            )
        ax.set_xlabel("guidance scale (decoder / GLIDE base)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(str(out / name))

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    for line, curve in lines.items():
        x, y = values(curve, "diversity"), values(curve, fidelity)
        ax.plot(x, y, marker="o", linestyle="--" if line[0] == "glide" else "-",
                label=_line_name(line))  # fmt: skip
        for r, xi, yi in zip(curve, x, y, strict=True):
            if np.isfinite(xi) and np.isfinite(yi):
                ax.annotate(f"{r['decoder_scale']:g}", (xi, yi), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))  # fmt: skip
    ax.set_xlabel("diversity (CLIP cosine distance)")
    ax.set_ylabel(fid_label)
    ax.set_title("fidelity-diversity trade-off (labels: guidance scale)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png")
    plt.close(fig)
    paths.append(str(out / "tradeoff.png"))
    return paths


def format_table(rows) -> str:
    """The ablation rows as a fixed-width text table (NaN shown as '-')."""

    def num(x, width):
        return f"{x:>{width}.3f}" if _finite(x) else f"{'-':>{width}}"

    head = (f"{'pipeline':<8}{'prior':>10}{'p-scale':>8}{'scale':>7}{'n':>4}{'faithful':>9}"
            f"{'color':>7}{'shape':>7}{'CLIP':>8}{'divers.':>8}")  # fmt: skip
    lines = [head]
    for r in rows:
        ps = f"{r['prior_scale']:g}" if _finite(r["prior_scale"]) else "-"
        lines.append(f"{r['pipeline']:<8}{r['prior']:>10}{ps:>8}{r['decoder_scale']:>7g}"
                     f"{r['n']:>4}{num(r.get('faithfulness_caption'), 9)}"
                     f"{num(r.get('faithfulness_color'), 7)}{num(r.get('faithfulness_shape'), 7)}"
                     f"{num(r.get('clip_score'), 8)}{num(r.get('diversity'), 8)}")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# `unclip-jax eval`: metrics of a folder that `unclip-jax sample` wrote.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_samples(folder) -> tuple[list[str], np.ndarray, dict]:
    """(prompts [N], images [N, H, W, 3] in [-1, 1], record) of a samples folder (record.json
    with "prompts" and "images", as pipelines/outputs.save_samples writes)."""
    from unclip_jax.imaging import load_image

    folder = storage.path(folder)
    path = folder / "record.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: eval reads a folder written by "
                                "`unclip-jax sample` (record.json + images/)")  # fmt: skip
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    prompts, files = record.get("prompts"), record.get("images")
    if not isinstance(prompts, list) or not isinstance(files, list) or not files:
        raise ValueError(f"{path} needs non-empty lists 'prompts' and 'images'")
    if len(prompts) != len(files):
        raise ValueError(f"{path}: {len(prompts)} prompts but {len(files)} images")
    resolved = []
    for f in files:  # as recorded, else relative to the folder (the folder may have moved)
        p = storage.path(f)
        for candidate in (p, folder / p, folder / "images" / p.name):
            if candidate.is_file():
                resolved.append(candidate)
                break
        else:
            raise FileNotFoundError(f"image {f} of {path} not found")
    first = load_image(resolved[0])
    images = np.stack([first] + [load_image(p, first.shape[0]) for p in resolved[1:]])
    return [str(p) for p in prompts], images, record


def reference_images(*, folder=None, split=None, count: int = 64) -> np.ndarray:
    """Reference images [N, H, W, 3] in [-1, 1]: a folder's image files (or a samples folder's),
    or the first `count` ground-truth renders of a shapes split."""
    from unclip_jax.imaging import load_image

    if folder is not None:
        folder = storage.path(folder)
        if (folder / "record.json").is_file():
            return read_samples(folder)[1]
        if storage.is_remote(folder):
            folder = storage.local_copy(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"reference folder not found: {folder}")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise ValueError(f"reference folder {folder} holds {len(files)} images; need >= 2")
        first = load_image(files[0])
        return np.stack([first] + [load_image(p, first.shape[0]) for p in files[1:]])
    from unclip_jax.data import shapes

    if count < 2:
        raise ValueError(f"--reference-count must be >= 2, got {count}")
    if split not in shapes.SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {shapes.SPLITS}")
    renders = [shapes.render_example(split, i).image for i in range(count)]
    return np.stack(renders).astype(np.float32) / 127.5 - 1.0


def evaluate_folder(folder, *, clip=None, reference=None, reference_split=None,
                    reference_count: int = 64, faithfulness: bool | None = None,
                    batch_size: int = 64) -> dict:  # fmt: skip
    """Metrics of a samples folder: caption faithfulness (when every prompt is a shapes caption;
    faithfulness=True insists, False skips), CLIP score and diversity (with a ClipEncoder),
    and the Fréchet distance of CLIP image features against reference images (a folder or the
    renders of a shapes split). Missing metrics are None with a reason in "notes"."""
    from unclip_jax.eval import clip_metrics as cm
    from unclip_jax.eval.faithfulness import evaluate_shapes, parse_caption

    prompts, images, record = read_samples(folder)
    result: dict = {"folder": str(folder), "n": len(prompts), "image_size": list(images.shape[1:3]),
                    "prompts": sorted(set(prompts)), "notes": []}  # fmt: skip
    if faithfulness is None:
        try:
            for p in set(prompts):
                parse_caption(p)
            faithfulness = True
        except ValueError as err:
            faithfulness = False
            result["notes"].append(f"faithfulness not measured: {err}")
    result["faithfulness"] = None
    if faithfulness:
        summary = evaluate_shapes(images, prompts)
        result["faithfulness"] = {k: summary[k] for k in ATTRIBUTES}
        result["faithfulness"] |= {k: summary[k] for k in
                                   ("background_error", "n", "n_size", "n_relation")}  # fmt: skip
    result["clip_score"] = result["diversity"] = result["frechet_distance"] = None
    if clip is None:
        result["notes"].append("CLIP metrics not measured: no --clip run")
    else:
        image_emb = cm.clip_image_embeddings(clip.model, clip.params, images, batch_size=batch_size)
        tokens = clip.tokenizer(prompts)
        text_emb = cm.clip_text_embeddings(clip.model, clip.params, tokens.input_ids,
                                           eot_positions=tokens.eot_positions,
                                           batch_size=batch_size)  # fmt: skip
        result["clip_score"] = float(np.mean(cm.clip_score_from_embeddings(image_emb, text_emb)))
        try:
            result["diversity"] = cm.diversity(image_emb, groups=prompts)
        except ValueError:
            result["notes"].append("diversity not measured: no prompt has two samples")
        if reference is not None or reference_split is not None:
            ref = reference_images(folder=reference, split=reference_split,
                                   count=reference_count)  # fmt: skip
            ref_emb = cm.clip_image_embeddings(clip.model, clip.params, ref,
                                               batch_size=batch_size)  # fmt: skip
            if len(image_emb) < 2:
                result["notes"].append("Fréchet distance not measured: fewer than 2 samples")
            else:
                result["frechet_distance"] = cm.frechet_distance(image_emb, ref_emb)
                result["reference"] = {"folder": None if reference is None else str(reference),
                                       "split": reference_split, "n": len(ref)}  # fmt: skip
    result["record"] = {k: record.get(k) for k in ("pipeline", "prior", "seed") if k in record}
    return result


def format_eval(result) -> str:
    """The eval result as a two-column table."""
    rows = [("images", str(result["n"]))]
    f = result.get("faithfulness")
    if f:
        rows += [(f"faithfulness {a}", "-" if not _finite(f[a]) else f"{f[a]:.3f}")
                 for a in ATTRIBUTES]  # fmt: skip
    for key, name in (("clip_score", "CLIP score"), ("diversity", "diversity"),
                      ("frechet_distance", "Fréchet distance (CLIP)")):  # fmt: skip
        value = result.get(key)
        rows.append((name, "-" if value is None else f"{value:.4f}"))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join([f"{k:<{width}}{v}" for k, v in rows] + result.get("notes", []))


def add_eval_arguments(parser) -> None:
    """The flags of `unclip-jax eval`."""
    parser.add_argument("folder", help="a samples folder (record.json + images/)")
    parser.add_argument("--clip", help="a CLIP run folder: CLIP score, diversity, Fréchet")
    parser.add_argument("--reference", help="reference images: a folder of images or samples")
    parser.add_argument("--reference-split", help="reference: renders of this shapes split")
    parser.add_argument("--reference-count", type=int, default=64,
                        help="renders of --reference-split to use (default 64)")  # fmt: skip
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--faithfulness",
        dest="faithfulness",
        action="store_const",
        const=True,
        help="require caption faithfulness (error on non-shapes prompts)",
    )
    group.add_argument("--no-faithfulness", dest="faithfulness", action="store_const",
                       const=False, help="skip caption faithfulness")  # fmt: skip
    parser.add_argument("--out", help="where to write eval.json (default: FOLDER/eval.json)")


def run_eval(args) -> dict:
    """`unclip-jax eval`: print the metrics of a samples folder and write eval.json."""
    if args.reference and args.reference_split:
        raise ValueError("give --reference or --reference-split, not both")
    if (args.reference or args.reference_split) and not args.clip:
        raise ValueError("a Fréchet distance needs CLIP features: add --clip RUN")
    clip = None
    if args.clip:
        from unclip_jax.pipelines.unclip import clip_from_run

        if not storage.path(args.clip).is_dir():
            raise FileNotFoundError(f"--clip: run folder not found: {args.clip}")
        clip = clip_from_run(args.clip)
    result = evaluate_folder(args.folder, clip=clip, reference=args.reference,
                             reference_split=args.reference_split,
                             reference_count=args.reference_count,
                             faithfulness=args.faithfulness)  # fmt: skip
    result["clip_run"] = args.clip
    out = storage.path(args.out) if args.out else storage.path(args.folder) / "eval.json"
    storage.write_text(out, json.dumps(json_safe(result), indent=2) + "\n")
    print(format_eval(result))
    print(f"wrote {out}")
    return result
