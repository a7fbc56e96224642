"""The embedded default demo in miniature (configs/shapes_demo.py:mini): every stage end to end on
`shapes` tiny with a few steps per model, every artefact written and parsed (grids, JSON records,
the ablation table and plots); then a second run reuses every trained model and cached stage."""

import csv
import json
import pathlib
import shlex
import types

import numpy as np
from PIL import Image

from unclip_jax import cli, config_utils
from unclip_jax.data import shapes as shapes_data
from unclip_jax.demo import shapes

TRAINED = ("clip", "prior", "ar_prior", "decoder", "upsampler", "glide")


def _png(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


def test_mini_demo_end_to_end_then_reused(tmp_path):
    config = config_utils.load_config("shapes_demo:mini")
    out = tmp_path / "demo"
    report = shapes.run(config, out)

    stages = report["stages"]
    assert list(stages) == ["data", "clip", "embed", *TRAINED[1:], "sample", "ablation",
                            "prior_eval", "split_eval"]  # fmt: skip
    assert json.loads((out / "demo.json").read_text())["stages"].keys() == stages.keys()
    for name in TRAINED:
        record = stages[name]
        assert not record["skipped"] and record["step"] == config.stages[name].steps, name
        assert record["final_loss"] is not None and record["seconds"] > 0
    assert (out / "runs" / "clip" / "tokenizer").is_dir()
    assert (out / "embeddings" / "null_text.npz").exists()

    prompts = [p for p in config.sample.prompts for _ in range(config.sample.per_prompt)]
    for pipe, size in (("unclip", 64), ("glide", 32)):
        record = json.loads((out / "samples" / pipe / "record.json").read_text())
        assert record["prompts"] == prompts and len(record["images"]) == len(prompts)
        assert _png(record["images"][0]) == (size, size)
        assert _png(record["grid"])[0] > size
        faith = stages["sample"][pipe]["faithfulness"]
        assert set(faith) == {"all", "seen", "held_out"}
        assert 0.0 <= faith["all"]["caption"] <= 1.0

    ablation = stages["ablation"]
    with open(ablation["paths"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == ablation["rows"] > 0
    assert {r["pipeline"] for r in rows} == {"unclip", "glide"}
    assert json.loads(pathlib.Path(ablation["paths"]["json"]).read_text())
    for plot in ablation["paths"]["plots"]:
        assert _png(plot)[0] > 100
    assert ablation["summary"] and all(isinstance(line, str) for line in ablation["summary"])
    e = config.split_eval
    for split in e.splits:
        result = stages["split_eval"][split]
        # The first captions' ground-truth renders at 32 px read exactly (the detector's ceiling).
        assert result["ground_truth_32px"]["caption"] == 1.0
        zero_shot = result["clip_zero_shot"]
        assert zero_shot["n"] == e.zero_shot
        assert all(0.0 <= zero_shot[k] <= 1.0 for k in ("color", "shape", "both"))
        assert zero_shot["both"] <= min(zero_shot["color"], zero_shot["shape"])
        probe = result["clip_probe"]
        assert probe["n"] == e.zero_shot and probe["train_n"] == e.probe_train
        assert all(0.0 <= probe[k] <= 1.0 for k in ("color", "shape"))
        for pipe in shapes.split_eval_pipes(e):
            assert result[pipe]["n"] == e.captions and 0.0 <= result[pipe]["caption"] <= 1.0
            record = json.loads((out / "split_eval" / split / pipe / "record.json").read_text())
            assert record["captions"][0] == shapes_data.render_example(split, 0).caption
            assert len(record["images"]) == e.captions and _png(record["images"][0]) == (32, 32)
    # The prior's case, per split: cosines with the true image embeddings, and retrieval.
    for split in config.prior_eval.splits:
        result = stages["prior_eval"][split]
        assert result["n"] == config.prior_eval.captions
        for name in ("diffusion", "ar", "text", "split_mean_image"):
            assert -1.0 <= result[name] <= 1.0 and 0.0 <= result[f"{name}_top1"] <= 1.0
    assert json.loads((out / "prior_eval.json").read_text()).keys() == set(config.prior_eval.splits)
    table = "\n".join(shapes.format_report(report))
    assert "seen / held-out" in table and "total" in table
    assert "test_compositional captions" in table and "CLIP zero-shot" in table
    assert "CLIP linear probe" in table and "priors, validation: cosine" in table
    # The last lines: the grids to look at, and commands that run on the demo's runs as printed.
    lines = shapes.format_report(report)
    last = lines[next(i for i, line in enumerate(lines) if line.startswith("look at: ")) :]
    assert "samples/unclip/grid.png" in last[0] and len(last) == 6
    commands = [line.strip() for line in last if line.strip().startswith("unclip-jax ")]
    assert len(commands) == 3
    for command in commands:
        args = cli.build_parser().parse_args(shlex.split(command)[1:])
        for run in ("clip", "decoder", "base", "prior_run"):
            if getattr(args, run, None):
                assert (pathlib.Path(getattr(args, run)) / "checkpoints").is_dir(), command
        if args.command == "vary":
            assert pathlib.Path(args.image).is_file()

    # A second run trains nothing and reuses the samples and the ablation.
    again = shapes.run(config, out)["stages"]
    assert all(again[name]["skipped"]
               for name in (*TRAINED, "embed", "sample", "ablation", "prior_eval",
                            "split_eval"))  # fmt: skip
    assert again["sample"]["unclip"] == stages["sample"]["unclip"]
    assert sum(again[name]["cpu_seconds"] for name in again) < 60

    # A model retrained to the same step with another config (here: another mean type) changes
    # the sampling stages' fingerprints, so their cached records are not reused.
    demo = shapes.Demo(config, out)
    before = shapes.trained_models(demo)
    fingerprint = shapes.stage_fingerprint(demo, shapes._to_plain(config.sample))
    assert again["sample"]["fingerprint"] == fingerprint  # the key the sample stage stored
    identity = out / "runs" / "decoder" / "demo_stage.json"
    retrained = json.loads(identity.read_text())
    assert retrained["diffusion"]["mean_type"] == "velocity"  # the demo's (shapes_demo.VELOCITY)
    retrained["diffusion"]["mean_type"] = "epsilon"
    identity.write_text(json.dumps(retrained))
    after = shapes.trained_models(demo)
    assert after["decoder"]["step"] == before["decoder"]["step"]
    assert after["decoder"]["config"] != before["decoder"]["config"]
    assert after["glide"] == before["glide"]
    changed = shapes.stage_fingerprint(demo, shapes._to_plain(config.sample))
    assert changed != fingerprint and demo.cached("sample", changed) is None


def test_demo_stops_when_a_stage_is_preempted(tmp_path, monkeypatch):
    """A stage whose training stops early (SIGTERM: the loop saves and returns its step) ends the
    demo there, reported, instead of going on to the next stage with a half-trained model."""
    from unclip_jax.train import loop

    trained = []

    def preempted_train(config, workdir):
        trained.append(pathlib.Path(workdir).name)
        return {"step": 1, "metrics": {}, "workdir": str(workdir)}

    monkeypatch.setattr(loop, "train", preempted_train)
    config = config_utils.load_config("shapes_demo:mini")
    report = shapes.run(config, tmp_path / "demo")
    assert trained == ["clip"] and list(report["stages"]) == ["data"]
    assert "clip stopped at step 1 of 3" in report["interrupted"]
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["interrupted"] == report["interrupted"]
    assert any(line.startswith("interrupted: clip") for line in shapes.format_report(report))


class _ColourOnlyClip:
    """A stand-in CLIP that reads each image's colour exactly and always answers "circle"."""

    combos = [(c, s) for c in shapes_data.COLORS for s in shapes_data.SHAPES]
    image_model = types.SimpleNamespace(vision=types.SimpleNamespace(image_size=64))

    def text(self, prompts):
        assert prompts == [f"a {c} {s}" for c, s in self.combos]
        return {"text_emb": np.eye(len(self.combos))}

    def images(self, pixels):
        rgb = (np.asarray(pixels) + 1.0) * 127.5
        palette = np.asarray(list(shapes_data.COLORS.values()), np.float64)
        out = np.zeros((len(rgb), len(self.combos)))
        for i, image in enumerate(rgb):
            ink = image[np.abs(image - shapes_data.BACKGROUND).sum(-1) > 60]
            colour = list(shapes_data.COLORS)[np.linalg.norm(palette - np.median(ink, 0), axis=-1)
                                              .argmin()]  # fmt: skip
            out[i, self.combos.index((colour, "circle"))] = 1.0
        return out


def test_clip_zero_shot_scores_colour_and_shape_apart():
    count = 24
    examples = [e for e in (shapes_data.render_example("test_compositional", i) for i in range(200))
                if len(e.objects) == 1][:count]  # fmt: skip
    circles = np.mean([e.objects[0].shape == "circle" for e in examples])
    assert 0.0 < circles < 1.0
    result = shapes.clip_zero_shot(_ColourOnlyClip(), "test_compositional", count)
    assert result == {"n": count, "color": 1.0, "shape": circles, "both": circles}


class _LookupClip:
    """A stand-in CLIP image tower that embeds each known one-object image by `embed(object)`."""

    image_model = types.SimpleNamespace(vision=types.SimpleNamespace(image_size=64))

    def __init__(self, embed, examples):
        self.embed = embed
        self.table = {ex.image.tobytes(): ex.objects[0] for ex in examples}

    def images(self, pixels):
        uint8 = np.round((np.asarray(pixels) + 1.0) * 127.5).astype(np.uint8)
        return np.stack([self.embed(self.table[image.tobytes()]) for image in uint8])


def test_clip_probe_reads_factored_embeddings_and_fails_on_entangled_ones():
    splits, count, train_count = ("validation", "test_compositional"), 24, 90
    examples = [ex for split, n in (("train", train_count), *((s, count) for s in splits))
                for ex in shapes.one_object_examples(split, n)]  # fmt: skip
    colors, kinds = list(shapes_data.COLORS), list(shapes_data.SHAPES)
    combos = [(c, k) for c in colors for k in kinds]

    def factored(obj):  # colour and shape in separate coordinates: a held-out pair reads exactly
        return np.r_[np.eye(len(colors))[colors.index(obj.color)],
                     np.eye(len(kinds))[kinds.index(obj.shape)]]  # fmt: skip

    def entangled(obj):  # one coordinate per pair: a pair never seen in train has no weight
        return np.eye(len(combos))[combos.index((obj.color, obj.shape))]

    result = shapes.clip_probe(_LookupClip(factored, examples), splits, count, train_count)
    for split in splits:
        assert result[split] == {"n": count, "train_n": train_count, "color": 1.0, "shape": 1.0}
    result = shapes.clip_probe(_LookupClip(entangled, examples), splits, count, train_count)
    assert result["validation"]["shape"] == 1.0
    # Held-out pairs embed on unseen coordinates, so the probe answers one shape for all of them.
    held_out = shapes.one_object_examples("test_compositional", count)
    most = max(np.mean([ex.objects[0].shape == k for ex in held_out]) for k in kinds)
    assert result["test_compositional"]["shape"] <= most < 1.0


def test_demo_says_in_one_line_when_memory_or_disk_is_short(tmp_path, monkeypatch, capsys):
    """Before any work: the measured needs of the default demo against what the machine has."""
    config = config_utils.load_config("shapes_demo")
    assert config.needs.memory_gb > 1 and config.needs.disk_gb > 0.1  # measured, not a stub
    out = tmp_path / "demo"
    monkeypatch.setattr(shapes, "available_memory_gb", lambda: config.needs.memory_gb / 2)
    assert cli.main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not enough memory for the demo" in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing started
    monkeypatch.setattr(shapes, "available_memory_gb", lambda: None)  # no /proc/meminfo

    class Usage:
        free = int(config.needs.disk_gb / 2 * 1e9)

    monkeypatch.setattr(shapes.shutil, "disk_usage", lambda path: Usage)
    assert cli.main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"not enough disk for the demo under {out}" in err and len(err.splitlines()) == 1, err
    # A rerun needs only what is not written yet.
    out.mkdir()
    with open(out / "written.bin", "wb") as f:  # sparse: its size counts, no disk is used
        f.truncate(int(config.needs.disk_gb * 0.6 * 1e9))
    shapes.preflight(config, out)
