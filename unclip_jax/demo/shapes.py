"""The embedded default (`make demo`): a tiny unCLIP stack and GLIDE base trained on `shapes`.

`run(config, out_dir)` goes through the stages in order, timing each (wall and CPU seconds):

    data       build the procedural shapes split (configs/shapes_demo.py: data.config)
    clip       contrastive CLIP with a BPE trained on the captions        -> runs/clip
    embed      CLIP image/text embeddings of the train split              -> embeddings/
    prior      diffusion prior (text -> image embedding)                  -> runs/prior
    ar_prior   autoregressive prior                                       -> runs/ar_prior
    decoder    32 px decoder on image embeddings                          -> runs/decoder
    upsampler  32 -> 64 upsampler                                         -> runs/upsampler
    glide      32 px GLIDE base                                           -> runs/glide
    sample     grids, one row per prompt (unCLIP and GLIDE)               -> samples/{unclip,glide}
               and their caption faithfulness (eval.faithfulness.evaluate_shapes), over all
               samples, the seen and the held-out compositions
    ablation   guidance scale x prior type (eval.ablate.run_ablation)     -> ablation/
    split_eval caption faithfulness on the first captions of the `validation` and
               `test_compositional` splits at 32 px: unCLIP with each prior, GLIDE, and the
               decoder from each caption's own image embedding (the priors' ceiling), beside the
               detector's own score on the ground-truth renders at 32 px, and CLIP's
               zero-shot colour and shape on one-object images (does CLIP itself tell
               a held-out pair's shape?)
                                                                          -> split_eval/

Reuse. A training stage whose run folder holds its final step is skipped; one with an earlier
checkpoint resumes (the shared loop's own resume). The run's config is recorded beside it
(demo_stage.json) and a rerun with a different model or data refuses to mix them. Sampling, the
ablation and split_eval are cached by a fingerprint (their settings + the step and training config
of every model they read) kept in demo.json: a second run with the same config only reloads the
records, which is what keeps it under two minutes on CPU (compiled samplers do not survive the
process). Everything, timings included, goes to <out>/demo.json; `format_report` renders the final
table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import pathlib
import resource
import shutil
import time

import numpy as np

log = logging.getLogger(__name__)

TRAINED = ("clip", "prior", "ar_prior", "decoder", "upsampler", "glide")


# ------------------------------------------------------------------------------------ helpers
def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (XLA's threads included)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _fingerprint(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _to_plain(value):
    """ConfigDicts, tuples and numpy scalars as JSON values."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def latest_step(workdir: pathlib.Path) -> int | None:
    """The last finished checkpoint of a run (orbax names them by step), without opening it."""
    folder = pathlib.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=None)


def final_metrics(workdir: pathlib.Path) -> dict:
    """The last measurement of the run's metrics.jsonl (loss and friends), {} if none; event
    records (a damaged checkpoint set aside) are skipped."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [r for r in map(json.loads, lines) if "event" not in r]
    return records[-1] if records else {}


class Interrupted(Exception):
    """A training stage stopped early on SIGTERM or a preemption notice; the demo stops there
    (rather than going on to the next stage) and a rerun resumes it."""


class Demo:
    """The state of one demo run: its folders, its report and the previous run's report."""

    def __init__(self, config, out_dir):
        self.config = config
        self.out = pathlib.Path(out_dir).absolute()
        self.out.mkdir(parents=True, exist_ok=True)
        self.data_dir = pathlib.Path(config.data.dir or self.out / "data").absolute()
        self.embeddings = self.out / "embeddings"
        path = self.out / "demo.json"
        self.previous = json.loads(path.read_text()) if path.exists() else {}
        self.report = {"config": _to_plain(config), "stages": {}, "out": str(self.out)}

    def run_dir(self, name: str) -> pathlib.Path:
        return self.out / "runs" / name

    @contextlib.contextmanager
    def stage(self, name: str, output):
        """Time a stage; the body fills the yielded record (skipped, numbers...)."""
        record = {"output": str(output), "skipped": False}
        print(f"[demo] {name} ...", flush=True)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        yield record
        record["seconds"] = round(time.perf_counter() - wall, 2)
        record["cpu_seconds"] = round(_cpu_seconds() - cpu, 2)
        self.report["stages"][name] = record
        done = "reused" if record["skipped"] else "done"
        print(f"[demo] {name} {done} in {record['seconds']:.1f} s", flush=True)
        self.save()

    def cached(self, name: str, fingerprint: str) -> dict | None:
        """The previous run's record of a stage with this fingerprint, if its files remain."""
        old = self.previous.get("stages", {}).get(name)
        if old and old.get("fingerprint") == fingerprint and pathlib.Path(old["output"]).exists():
            return old
        return None

    def reuse(self, name: str, fingerprint: str, record: dict) -> bool:
        """Fill `record` from the previous run's (same fingerprint, files still there) and say so;
        otherwise stamp the fingerprint on it, for the stage to compute."""
        old = self.cached(name, fingerprint)
        if old is None:
            record["fingerprint"] = fingerprint
            return False
        record.update({k: v for k, v in old.items() if k not in ("seconds", "cpu_seconds")})
        record["skipped"] = True
        return True

    def save(self) -> None:
        path = self.out / "demo.json"
        path.write_text(json.dumps(_to_plain(self.report), indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------------ training
def stage_config(demo: Demo, name: str):
    """The stage's training config: its base config, the demo's numbers and overrides."""
    from unclip_jax import config_utils

    s = demo.config.stages[name]
    overrides = [
        f"data.dir={demo.data_dir}",
        f"data.config={demo.config.data.config}",
        f"optim.steps={s.steps}",
        f"optim.batch_size={s.batch_size}",
        f"optim.lr={s.lr}",
        f"ckpt.save_every={max(1, s.steps // 4)}",  # a killed run resumes from its last quarter
        "ckpt.keep_every=0",
        f"train.log_every={max(1, min(50, s.steps // 10))}",
        f"seed={demo.config.seed}",
    ]
    if name in ("prior", "ar_prior", "decoder"):
        overrides.append(f"data.embeddings={demo.embeddings}")
    config = config_utils.load_config(s.config, overrides + list(s.overrides))
    with config.unlocked():
        config.train.tensorboard = False  # metrics.jsonl is enough here
        # No held-out losses or sample grids during training: the demo samples at the end.
        for key in ("eval_every", "sample_every"):
            if key in config.train:
                config.train[key] = 0
    return config


def _identity(config) -> dict:
    """What must not change between a run and its resumption (steps and logging may)."""
    plain = json.loads(config.to_json())
    plain["optim"].pop("steps", None)
    plain["optim"].pop("total_steps", None)
    plain.pop("ckpt", None)
    for key in ("dir", "embeddings"):  # folders may move with the output folder
        plain["data"].pop(key, None)
    for key in (
        "log_every",
        "eval_every",
        "eval_batches",
        "sample_every",
        "sample_respacing",
        "tensorboard",
    ):  # what is logged, not what is trained
        plain.get("train", {}).pop(key, None)
    return plain


def train_stage(demo: Demo, name: str) -> None:
    """Train one model unless its run already holds the final step (then resume or skip)."""
    from unclip_jax.train.loop import train

    workdir = demo.run_dir(name)
    config = stage_config(demo, name)
    with demo.stage(name, workdir) as record:
        identity_path = workdir / "demo_stage.json"
        if identity_path.exists():
            old = json.loads(identity_path.read_text())
            if old != _identity(config):
                diff = sorted(k for k in set(old) | set(_identity(config))
                              if old.get(k) != _identity(config).get(k))  # fmt: skip
                raise ValueError(f"{workdir} was trained with a different config ({diff} "
                                 "differ): remove it or use another --out")  # fmt: skip
        step = latest_step(workdir)
        record["resumed_from"] = step
        if step is not None and step >= config.optim.steps:
            record["skipped"] = True
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            identity_path.write_text(json.dumps(_identity(config), indent=1) + "\n")
            done = train(config, workdir)["step"]
            if done < config.optim.steps:  # SIGTERM or a preemption notice: the loop saved
                raise Interrupted(f"{name} stopped at step {done} of {config.optim.steps} "
                                  "(SIGTERM or preemption; its checkpoint is saved): run the same "
                                  "command again to resume")  # fmt: skip
        record["step"] = latest_step(workdir)
        metrics = final_metrics(workdir)
        record["final_loss"] = metrics.get("loss")
        record["steps_per_s"] = metrics.get("steps_per_s")


def trained_models(demo: Demo) -> dict:
    """What the sampling stages read, for their fingerprints: per trained model its latest step
    and the training config it was trained with (a run retrained to the same step with another
    config, e.g. a different mean_type, must not reuse the old samples)."""
    out = {}
    for name in TRAINED:
        identity = demo.run_dir(name) / "demo_stage.json"
        config = json.loads(identity.read_text()) if identity.exists() else None
        out[name] = {"step": latest_step(demo.run_dir(name)), "config": config}
    return out


def stage_fingerprint(demo: Demo, settings) -> str:
    """The cache key of a sampling stage: its settings, every trained model's step and training
    config (trained_models) and the seed."""
    return _fingerprint([settings, trained_models(demo), demo.config.seed])


def embed_stage(demo: Demo) -> None:
    """CLIP embeddings of the train split (data.embeddings' resumable writer)."""
    from unclip_jax.data.embed_cli import run_embed

    clip_step = latest_step(demo.run_dir("clip"))
    with demo.stage("embed", demo.embeddings) as record:
        marker = demo.embeddings / "demo_clip_step.json"
        done = json.loads(marker.read_text()) if marker.exists() else None
        if done is not None and done.get("clip_step") != clip_step:
            raise ValueError(f"{demo.embeddings} holds the embeddings of another CLIP step: remove "
                             "it (and the runs trained on it) or use another --out")  # fmt: skip
        if done is not None and done.get("complete"):  # no need to load CLIP at all
            record.update(skipped=True, examples=done["examples"])
            return
        args = argparse.Namespace(
            dataset=f"shapes:{demo.config.data.config}", data_dir=str(demo.data_dir),
            split="train", out=str(demo.embeddings), clip_config=None,
            clip_checkpoint=str(demo.run_dir("clip")), clip_step=None, clip_weights="params",
            clip_hf=None, clip_dtype=None, tokenizer=None,
            batch_size=demo.config.embed_batch_size, examples_per_shard=4096,
            token_dtype="float32", no_stats=False,
        )  # fmt: skip
        report = run_embed(args)  # resumes shard by shard
        marker.write_text(json.dumps({"clip_step": clip_step, "complete": report.complete,
                                      "examples": report.num_examples}))  # fmt: skip
        record["skipped"] = bool(report.already_complete)
        record["examples"] = report.num_examples


# ------------------------------------------------------------------------------------ sampling
class Pipelines:
    """The unCLIP and GLIDE pipelines, loaded on first use (a cached rerun never loads them)."""

    def __init__(self, demo: Demo):
        self.demo = demo
        self._unclip = self._glide = None

    @property
    def unclip(self):
        if self._unclip is None:
            from unclip_jax.pipelines.unclip import pipeline_from_runs

            d = self.demo
            self._unclip = pipeline_from_runs(
                clip=d.run_dir("clip"), decoder=d.run_dir("decoder"), prior=d.run_dir("prior"),
                ar_prior=d.run_dir("ar_prior"), upsamplers=[d.run_dir("upsampler")],
            )  # fmt: skip
        return self._unclip

    @property
    def glide(self):
        if self._glide is None:
            from unclip_jax.pipelines.glide import pipeline_from_runs

            self._glide = pipeline_from_runs(self.demo.run_dir("glide"))
        return self._glide


def faithfulness(images, prompts, held_out) -> dict:
    """evaluate_shapes over all samples, the seen and the held-out compositions."""
    from unclip_jax.eval.faithfulness import evaluate_shapes

    images = np.asarray(images)
    out = {}
    for group, keep in (("all", [True] * len(prompts)),
                        ("seen", [p not in held_out for p in prompts]),
                        ("held_out", [p in held_out for p in prompts])):  # fmt: skip
        idx = [i for i, k in enumerate(keep) if k]
        if idx:
            out[group] = evaluate_shapes(images[idx], [prompts[i] for i in idx])
    return _to_plain(out)  # NaN (an attribute no caption states) -> None, as in demo.json


def sample_stage(demo: Demo, pipes: Pipelines) -> None:
    """A grid per pipeline: one row per prompt, `per_prompt` samples each, then faithfulness."""
    import jax

    from unclip_jax.pipelines.outputs import save_samples

    s = demo.config.sample
    steps = {name: model["step"] for name, model in trained_models(demo).items()}
    fingerprint = stage_fingerprint(demo, _to_plain(s))
    out = demo.out / "samples"
    with demo.stage("sample", out) as record:
        if demo.reuse("sample", fingerprint, record):
            return
        prompts = [p for p in s.prompts for _ in range(s.per_prompt)]
        rng = jax.random.key(demo.config.seed)
        start = time.perf_counter()
        result = pipes.unclip(prompts, rng, prior=s.prior, prior_guidance=s.prior_guidance,
                              decoder_guidance=s.decoder_guidance,
                              decoder_respacing=str(s.decoder_steps),
                              upsample=s.upsample)  # fmt: skip
        images = np.asarray(jax.device_get(result["images"]))
        paths = save_samples(out / "unclip", images, dict(
            pipeline="unclip", prompts=prompts, prior=s.prior, prior_guidance=s.prior_guidance,
            decoder_guidance=s.decoder_guidance, decoder_steps=s.decoder_steps,
            upsampled=s.upsample, seed=demo.config.seed, model_steps=steps,
            seconds=time.perf_counter() - start), ncol=s.per_prompt)  # fmt: skip
        record["unclip"] = {"grid": paths["grid"], "record": paths["record"],
                            "faithfulness": faithfulness(images, prompts, s.held_out)}  # fmt: skip
        start = time.perf_counter()
        result = pipes.glide(prompts, jax.random.fold_in(rng, 1), guidance_scale=s.glide_guidance,
                             base_respacing=str(s.glide_steps))  # fmt: skip
        images = np.asarray(jax.device_get(result["images"]))
        paths = save_samples(out / "glide", images, dict(
            pipeline="glide", prompts=prompts, guidance=s.glide_guidance, steps=s.glide_steps,
            seed=demo.config.seed, model_steps=steps,
            seconds=time.perf_counter() - start), ncol=s.per_prompt)  # fmt: skip
        record["glide"] = {"grid": paths["grid"], "record": paths["record"],
                           "faithfulness": faithfulness(images, prompts, s.held_out)}  # fmt: skip


def ablation_stage(demo: Demo, pipes: Pipelines) -> None:
    """Guidance scale x prior type on a few prompts (eval.ablate), cached like the samples."""
    a = demo.config.ablation
    out = demo.out / "ablation"
    with demo.stage("ablation", out) as record:
        try:
            from unclip_jax.eval import ablate
        except ImportError as err:  # the ablation module is optional for the rest of the demo
            record.update(skipped=True, missing=str(err))
            print(f"[demo] ablation unavailable ({err}); skipped", flush=True)
            return
        fingerprint = stage_fingerprint(demo, _to_plain(a))
        if demo.reuse("ablation", fingerprint, record):
            return
        result = ablate.run_ablation(
            prompts=list(a.prompts), out_dir=out, unclip=pipes.unclip, glide=pipes.glide,
            prior_types=tuple(a.prior_types), decoder_scales=tuple(a.decoder_scales),
            prior_scales=tuple(a.prior_scales), glide_scales=tuple(a.glide_scales),
            samples_per_prompt=a.samples_per_prompt, seed=demo.config.seed,
            decoder_respacing=str(a.decoder_steps), glide_respacing=str(a.glide_steps),
            evaluate_faithfulness=True, upsample=a.upsample,
        )  # fmt: skip
        record["summary"] = list(result.get("summary") or ablate.summarize(result["rows"]))
        record["paths"] = result.get("paths", {})
        record["timings_s"] = result.get("timings_s", {})
        record["rows"] = len(result["rows"])


# What split_eval samples: unCLIP (prior -> decoder) with each prior of split_eval.priors, the
# decoder alone from each caption's own image (its CLIP image embedding, as `data embed` computes
# them for training: the ceiling a perfect prior would reach, which tells a weak prior from a weak
# decoder), and GLIDE.
PIPE_PRIOR = {"unclip_diffusion": "diffusion", "unclip_ar": "ar"}


def split_eval_pipes(e) -> tuple[str, ...]:
    """split_eval's rows: unCLIP with each prior of `e.priors` (`unclip_diffusion`, `unclip_ar`),
    the decoder from each caption's own image embedding (`unclip_image_emb`, the priors' ceiling)
    and GLIDE."""
    unclip = tuple(f"unclip_{p}" for p in e.priors)
    if not unclip or any(u not in PIPE_PRIOR for u in unclip) or len(set(unclip)) < len(unclip):
        raise ValueError(f"split_eval.priors must name 'diffusion' and/or 'ar', not {e.priors!r}")
    return (*unclip, "unclip_image_emb", "glide")


CLIP_DIAGNOSTICS = ("clip_zero_shot", "clip_probe")  # split_eval keys that are not pipelines


def one_object_examples(split: str, count: int) -> list:
    """The first `count` one-object examples of `split` (index 0 upward)."""
    from unclip_jax.data import shapes

    examples, index = [], 0
    while len(examples) < count:
        if index >= 100 * count:
            raise ValueError(f"fewer than {count} one-object images in {index} of {split}")
        example = shapes.render_example(split, index)
        index += 1
        if len(example.objects) == 1:
            examples.append(example)
    return examples


def _clip_image_embeds(clip, examples) -> np.ndarray:
    from unclip_jax.data.embeddings import clip_images

    size = clip.image_model.vision.image_size
    return np.asarray(clip.images(clip_images([{"image": ex.image} for ex in examples], size)))


def clip_zero_shot(clip, split: str, count: int) -> dict:
    """CLIP's zero-shot colour and shape on the first `count` one-object images of `split`: each
    image's class is the nearest of the 18 prompts "a {color} {shape}". On `test_compositional`
    every one-object image shows a held-out pair, so a CLIP that learned shape apart from colour
    scores as well there as on `validation`, and one that learned only the seen pairs scores about
    chance (1/3) on shape: then unCLIP's held-out failures start in CLIP, before the prior and
    the decoder (which may still recover some of the shape from the image embedding)."""
    from unclip_jax.data import shapes
    from unclip_jax.eval.clip_metrics import zero_shot_predictions

    combos = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    examples = one_object_examples(split, count)
    text = clip.text([f"a {c} {s}" for c, s in combos])["text_emb"]
    predicted = np.asarray([combos[i] for i in zero_shot_predictions(
        _clip_image_embeds(clip, examples), text)])  # fmt: skip
    truth = np.asarray([(ex.objects[0].color, ex.objects[0].shape) for ex in examples])
    hit = predicted == truth  # [count, (colour, shape)]
    return {"n": count, "color": float(hit[:, 0].mean()), "shape": float(hit[:, 1].mean()),
            "both": float(hit.all(-1).mean())}  # fmt: skip


def clip_probe(clip, splits, count: int, train_count: int) -> dict:
    """Linear probes for colour and for shape on CLIP's image embeddings, fitted on the first
    `train_count` one-object images of `train` (seen pairs only) and read on the first `count`
    one-object images of each split: {split: {"n", "train_n", "color", "shape"}}. The text tower
    plays no part, so a held-out shape read at chance here (1/3) means the image embedding itself
    puts a purple triangle among the purple shapes it saw, as far as a linear reader can tell (the
    quality recipe's decoder, a non-linear reader, still draws the held-out shape from true
    embeddings half the time)."""
    from unclip_jax.data import shapes
    from unclip_jax.eval.clip_metrics import linear_probe

    def labels(examples, attr, names):
        return np.asarray([list(names).index(getattr(ex.objects[0], attr)) for ex in examples])

    train = one_object_examples("train", train_count)
    train_embeds = _clip_image_embeds(clip, train)
    out = {}
    for split in splits:
        examples = one_object_examples(split, count)
        embeds = _clip_image_embeds(clip, examples)
        out[split] = {"n": count, "train_n": train_count}
        for attr, names in (("color", shapes.COLORS), ("shape", shapes.SHAPES)):
            predicted = linear_probe(train_embeds, labels(train, attr, names), embeds)
            out[split][attr] = float(np.mean(predicted == labels(examples, attr, names)))
    return out


def split_eval_stage(demo: Demo, pipes: Pipelines) -> None:
    """Faithfulness on the splits' own captions (`shapes.render_example`, index 0 upward): every
    caption sampled once by each of split_eval_pipes at the demo's sample settings, in chunks of
    `batch` (one compiled sampler per pipeline), read at 32 px without the upsampler; and the
    ground-truth renders area-downsampled to 32 px, read the same way."""
    import jax

    from unclip_jax.data import shapes
    from unclip_jax.data.embeddings import clip_images
    from unclip_jax.eval.faithfulness import evaluate_shapes
    from unclip_jax.imaging import area_downsample
    from unclip_jax.pipelines.outputs import save_samples

    e, s = demo.config.split_eval, demo.config.sample
    if e.captions % e.batch:
        raise ValueError(f"split_eval.captions ({e.captions}) must be a multiple of "
                         f"split_eval.batch ({e.batch})")  # fmt: skip
    steps = {name: model["step"] for name, model in trained_models(demo).items()}
    pipe_names = split_eval_pipes(e)
    settings = [_to_plain(e), s.prior_guidance, s.decoder_guidance, s.glide_guidance, pipe_names]
    fingerprint = stage_fingerprint(demo, settings)
    out = demo.out / "split_eval"
    with demo.stage("split_eval", out) as record:
        if demo.reuse("split_eval", fingerprint, record):
            return
        rng = jax.random.key(demo.config.seed + 1)
        probes = clip_probe(pipes.unclip.clip, e.splits, e.zero_shot, e.probe_train)
        for split_index, split in enumerate(e.splits):
            examples = [shapes.render_example(split, i) for i in range(e.captions)]
            captions = [ex.caption for ex in examples]
            truth = np.stack([ex.image for ex in examples]).astype(np.float32)
            truth = area_downsample(truth, 32)
            truth_score = evaluate_shapes(truth, captions, value_range=(0, 255))
            result = {
                "ground_truth_32px": _to_plain(truth_score),
                "clip_zero_shot": clip_zero_shot(pipes.unclip.clip, split, e.zero_shot),
                "clip_probe": probes[split],
            }
            for pipe in pipe_names:
                start, chunks = time.perf_counter(), []
                for c in range(0, e.captions, e.batch):
                    key = jax.random.fold_in(rng, 1000 * split_index + c)
                    chunk = captions[c : c + e.batch]
                    if pipe in PIPE_PRIOR:
                        images = pipes.unclip(chunk, key, prior=PIPE_PRIOR[pipe], upsample=False,
                                              prior_guidance=s.prior_guidance,
                                              decoder_guidance=s.decoder_guidance,
                                              decoder_respacing=str(e.steps))["images"]  # fmt: skip
                    elif pipe == "unclip_image_emb":
                        clip = pipes.unclip.clip
                        own = [{"image": ex.image} for ex in examples[c : c + e.batch]]
                        pixels = clip_images(own, clip.image_model.vision.image_size)
                        images = pipes.unclip.decode(clip.images(pixels), key, prompts=chunk,
                                                     guidance_scale=s.decoder_guidance,
                                                     respacing=str(e.steps))  # fmt: skip
                    else:
                        images = pipes.glide(chunk, key, guidance_scale=s.glide_guidance,
                                             base_respacing=str(e.steps))["images"]  # fmt: skip
                    chunks.append(np.asarray(jax.device_get(images)))
                images = np.concatenate(chunks)
                seconds = time.perf_counter() - start
                paths = save_samples(out / split / pipe, images, dict(
                    pipeline=pipe, split=split, captions=captions, steps=e.steps,
                    prior=PIPE_PRIOR.get(pipe),
                    guidance=s.glide_guidance if pipe == "glide" else s.decoder_guidance,
                    seed=demo.config.seed, model_steps=steps, seconds=seconds), ncol=8)  # fmt: skip
                result[pipe] = _to_plain(evaluate_shapes(images, captions))
                result[pipe].update(grid=paths["grid"], seconds=round(seconds, 2))
            record[split] = result


def prior_eval_stage(demo: Demo, pipes: Pipelines) -> None:
    """The unCLIP paper's case for a prior, on each split's own captions (`shapes.render_example`,
    index 0 upward): the mean cosine of each example's true CLIP image embedding with
    - the embedding each prior samples for its caption (at the demo's prior guidance),
    - the caption's CLIP text embedding (what the decoder gets with no prior), and
    - the mean of the split's image embeddings (a prior that ignored its caption; an oracle, since
      it is the mean of the very embeddings it is scored against);
    and `*_top1`: how often the example's own image is the nearest of the split's images to that
    embedding (chance: 1 / n; shapes captions repeat, so same-caption images tie)."""
    import jax

    from unclip_jax.data import shapes
    from unclip_jax.eval.clip_metrics import unit_rows, zero_shot_predictions

    e, s = demo.config.prior_eval, demo.config.sample
    fingerprint = stage_fingerprint(demo, [_to_plain(e), s.prior_guidance])
    out = demo.out / "prior_eval.json"
    with demo.stage("prior_eval", out) as record:
        if demo.reuse("prior_eval", fingerprint, record):
            return
        clip = pipes.unclip.clip
        rng = jax.random.key(demo.config.seed + 2)
        for split_index, split in enumerate(e.splits):
            examples = [shapes.render_example(split, i) for i in range(e.captions)]
            captions = [ex.caption for ex in examples]
            image = unit_rows(np.asarray(_clip_image_embeds(clip, examples), np.float64))
            text = clip.text(captions)
            mean = image.mean(0, keepdims=True)
            candidates = {"text": text["text_emb"], "split_mean_image": mean}
            for prior in e.priors:
                key = jax.random.fold_in(rng, split_index)
                candidates[prior] = pipes.unclip.image_embeddings(
                    captions, key, prior=prior, guidance_scale=s.prior_guidance, text=text
                )
            result = {"n": len(examples)}
            for name, z in candidates.items():
                z = np.broadcast_to(unit_rows(np.asarray(z, np.float64)), image.shape)
                result[name] = round(float(np.mean(np.sum(z * image, -1))), 4)
                nearest = zero_shot_predictions(z, image)  # the split's image nearest to z
                own = np.array([captions[j] == captions[i] for i, j in enumerate(nearest)])
                result[f"{name}_top1"] = round(float(own.mean()), 4)
            record[split] = result
        record["summary"] = [
            f"{split}: cosine with the true image embedding, "
            + ", ".join(
                f"{name} {record[split][name]:.2f}"
                for name in (*e.priors, "text", "split_mean_image")
            )
            for split in e.splits
        ]
        out.write_text(json.dumps({split: record[split] for split in e.splits}, indent=1) + "\n")


# ------------------------------------------------------------------------------------ the demo
class NotEnoughResources(RuntimeError):
    """The machine lacks the memory or the disk a demo run needs (one line, before any work)."""


def available_memory_gb() -> float | None:
    """MemAvailable of /proc/meminfo in GB (None where there is no such file: not checked)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        return None
    return None


def preflight(config, out_dir) -> None:
    """Raise NotEnoughResources when this machine has less available memory than the demo's
    measured peak (config.needs.memory_gb), or less free disk under `out_dir` than a whole run
    writes less what is already there (config.needs.disk_gb: a rerun needs little)."""
    needs = config.get("needs")
    if needs is None:
        return
    out = pathlib.Path(out_dir).absolute()
    existing = out
    while not existing.exists():
        existing = existing.parent
    have_disk = shutil.disk_usage(existing).free / 1e9
    files = out.rglob("*") if out.exists() else ()
    written = sum(p.stat().st_size for p in files if p.is_file()) / 1e9
    need_disk = max(needs.disk_gb - written, 0.0)
    if have_disk < need_disk:
        raise NotEnoughResources(f"not enough disk for the demo under {out}: {have_disk:.1f} GB "
                                 f"free, a run writes about {need_disk:.1f} GB more (choose "
                                 "another --out)")  # fmt: skip
    have_memory = available_memory_gb()
    if have_memory is not None and have_memory < needs.memory_gb:
        raise NotEnoughResources(f"not enough memory for the demo: {have_memory:.1f} GB "
                                 f"available, it needs about {needs.memory_gb:.1f} GB (close "
                                 "other programs, or run it on a larger machine)")  # fmt: skip


def run(config, out_dir) -> dict:
    """Run (or reuse) every stage of the demo under `out_dir`; returns the report (demo.json)."""
    from unclip_jax.data.shapes_builder import build_shapes

    preflight(config, out_dir)
    demo = Demo(config, out_dir)
    start_wall, start_cpu = time.perf_counter(), _cpu_seconds()
    with demo.stage("data", demo.data_dir) as record:
        builder = build_shapes(str(demo.data_dir), config.data.config)
        record["train_examples"] = builder.info.splits["train"].num_examples
    try:
        train_stage(demo, "clip")
        embed_stage(demo)
        for name in ("prior", "ar_prior", "decoder", "upsampler", "glide"):
            train_stage(demo, name)
        pipes = Pipelines(demo)
        sample_stage(demo, pipes)
        if config.ablation.enabled:
            ablation_stage(demo, pipes)
        if config.prior_eval.enabled:
            prior_eval_stage(demo, pipes)
        if config.split_eval.enabled:
            split_eval_stage(demo, pipes)
    except Interrupted as stop:
        demo.report["interrupted"] = str(stop)
        print(f"[demo] {stop}", flush=True)
    demo.report["total_seconds"] = round(time.perf_counter() - start_wall, 2)
    demo.report["total_cpu_seconds"] = round(_cpu_seconds() - start_cpu, 2)
    demo.save()
    return demo.report


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        f"{value:.2f}")  # fmt: skip


def format_report(report: dict) -> list[str]:
    """The final table: stage, seconds, CPU seconds, output, key numbers; then the ablation."""
    lines = [f"{'stage':<10}{'wall s':>8}{'cpu s':>8}  {'':<6}  output / numbers"]
    for name, r in report["stages"].items():
        notes = []
        if "final_loss" in r:
            notes.append(f"step {r.get('step')} loss {_fmt(r['final_loss'])}")
        for pipe in ("unclip", "glide"):
            f = r.get(pipe, {}).get("faithfulness", {})
            if f:
                seen, held = f.get("seen", {}), f.get("held_out", {})
                notes.append(
                    f"{pipe} faithful (seen / held-out): caption {_fmt(seen.get('caption'))} / "
                    f"{_fmt(held.get('caption'))}, colour {_fmt(seen.get('color'))} / "
                    f"{_fmt(held.get('color'))}, shape {_fmt(seen.get('shape'))} / "
                    f"{_fmt(held.get('shape'))}"
                )
        tag = "reused" if r.get("skipped") else ""
        lines.append(f"{name:<10}{r['seconds']:>8.1f}{r['cpu_seconds']:>8.1f}  {tag:<6}  "
                     f"{r['output']}")  # fmt: skip
        lines += [f"{'':<36}{n}" for n in notes]
    lines.append(f"{'total':<10}{report['total_seconds']:>8.1f}{report['total_cpu_seconds']:>8.1f}"
                 f"  report: {pathlib.Path(report['out']) / 'demo.json'}")  # fmt: skip
    split_eval = report["stages"].get("split_eval", {})
    for split in ("validation", "test_compositional"):
        r = split_eval.get(split)
        if r:
            lines.append(f"{split} captions, faithful (caption / colour / shape / relation):")
            pipes = [k for k in r if k not in ("ground_truth_32px", *CLIP_DIAGNOSTICS)]
            for name in (*pipes, "ground_truth_32px"):
                f = r[name]
                attrs = ("caption", "color", "shape", "relation")
                numbers = " / ".join(_fmt(f.get(a)) for a in attrs)
                tint = _fmt(f.get("background_error"))
                lines.append(f"  {name:<18}{numbers}  background off by {tint}/255  "
                             f"(n={f.get('n')})")  # fmt: skip
            z = r.get("clip_zero_shot")
            if z:
                lines.append(f"  CLIP zero-shot on one-object images (colour / shape / both): "
                             f"{_fmt(z['color'])} / {_fmt(z['shape'])} / {_fmt(z['both'])} "
                             f"(n={z['n']})")  # fmt: skip
            p = r.get("clip_probe")
            if p:
                lines.append(f"  CLIP linear probe (colour / shape): {_fmt(p['color'])} / "
                             f"{_fmt(p['shape'])} (fitted on {p['train_n']} seen-pair train "
                             "images)")  # fmt: skip
    for line in report["stages"].get("prior_eval", {}).get("summary", []):
        lines.append(f"priors, {line}")
    if report.get("interrupted"):
        lines.append(f"interrupted: {report['interrupted']}")
    ablation = report["stages"].get("ablation", {})
    if ablation.get("summary"):
        lines.append("ablation:")
        lines += [f"  {line}" for line in ablation["summary"]]
    return lines + next_steps(report)


def next_steps(report: dict) -> list[str]:
    """The report's last lines: the grids to look at, and commands to run next on the demo's
    runs (or how to resume an interrupted demo)."""
    out = pathlib.Path(report["out"])
    if out.is_relative_to(pathlib.Path.cwd()):  # outputs/demo, as the user typed it
        out = out.relative_to(pathlib.Path.cwd())
    if report.get("interrupted"):
        return ["next: run `make demo` (or the same `unclip-jax demo` command) again: it resumes "
                "where it stopped"]  # fmt: skip
    lines = []
    sample = report["stages"].get("sample", {})
    grids = [(name, out / "samples" / name / "grid.png") for name in ("unclip", "glide")
             if name in sample]  # fmt: skip
    if grids:
        lines.append("look at: " + "; ".join(f"{path} ({name}: a row per prompt)"
                                             for name, path in grids))  # fmt: skip
    runs = out / "runs"
    decode = (f"--clip {runs / 'clip'} --decoder {runs / 'decoder'} "
              f"--upsamplers {runs / 'upsampler'}")  # fmt: skip
    unclip = f"{decode} --prior-run {runs / 'prior'}"
    lines += [
        "next: your own prompts (colours and shapes of `shapes`), written to outputs/samples:",
        f'  unclip-jax sample "a green square above a red circle" --pipeline unclip {unclip}',
        f'  unclip-jax sample "a green square above a red circle" --base {runs / "glide"} '
        "--guidance 3",
        f"  unclip-jax vary {out / 'samples' / 'unclip' / 'images' / 'sample_000.png'} {decode}",
        "then: README.md, 'Train on your own image-caption pairs'",
    ]
    return lines
