"""The ablation sweep and `unclip-jax eval` on random-weight tiny runs (tests/run_fixtures.py):
every artefact is written and parses, each stage compiles once per prior type, the eval functions
read a samples folder, and user errors are one clear line. Random models show no guidance effects,
so these tests check the mechanics, not the science."""

import argparse
import csv
import functools
import json
import math

import jax
import numpy as np
import pytest
from PIL import Image
from run_fixtures import make_random_runs

from unclip_jax.data import shapes
from unclip_jax.eval import ablate, report
from unclip_jax.pipelines import glide as glide_pipeline
from unclip_jax.pipelines.outputs import save_samples
from unclip_jax.pipelines.unclip import pipeline_from_runs

PROMPTS = ["a red circle", "a blue square"]  # short: the tiny GLIDE reads 16 bytes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_random_runs(tmp_path_factory.mktemp("runs"),
                            names=("clip", "prior", "decoder", "glide_base"))  # fmt: skip


def _count_traces(stage):
    """Wrap a stage's model_fn (a static argument of the jitted samplers) to count its traces."""
    calls = {"n": 0}
    inner = stage.model_fn

    @functools.wraps(inner)
    def counted(*args, **kwargs):
        calls["n"] += 1  # runs only while tracing
        return inner(*args, **kwargs)

    stage.model_fn = counted
    return calls


def test_ablation_writes_everything_and_compiles_once(runs, tmp_path):
    unclip = pipeline_from_runs(clip=runs["clip"], decoder=runs["decoder"], prior=runs["prior"])
    glide = glide_pipeline.pipeline_from_runs(runs["glide_base"])
    decoder_traces = _count_traces(unclip.decoder)
    glide_traces = _count_traces(glide.base)
    out = tmp_path / "ablation"
    # 8 rows per prior type in batches of 5: two chunks each, the second padded.
    result = ablate.run_ablation(
        prompts=PROMPTS, out_dir=out, unclip=unclip, glide=glide,
        prior_types=("diffusion", "ar", "none"), decoder_scales=(1.0, 3.0),
        samples_per_prompt=2, decoder_respacing="2", glide_respacing="2", max_batch=5,
    )  # fmt: skip
    # ar is skipped (no AR prior in the pipeline) with a note; the rest ran.
    assert [p for p, _ in result["skipped"]] == ["ar"]
    rows = result["rows"]
    assert [(r["pipeline"], r["prior"], r["decoder_scale"]) for r in rows] == [
        ("unclip", "diffusion", 1.0), ("unclip", "diffusion", 3.0),
        ("unclip", "none", 1.0), ("unclip", "none", 3.0),
        ("glide", "glide", 1.0), ("glide", "glide", 3.0),
    ]  # fmt: skip
    for r in rows:
        assert r["n"] == 4
        assert 0.0 <= r["faithfulness_caption"] <= 1.0
        assert math.isfinite(r["clip_score"]) and 0.0 <= r["diversity"] <= 2.0
    # One compilation per stage: the prior's sampler once, the decoder once for both prior types
    # (one batch shape), GLIDE's base once, whatever the number of scales and chunks.
    assert unclip.priors["diffusion"].sampler.compilations == 1
    assert decoder_traces["n"] == 1
    assert glide_traces["n"] == 1
    assert result["timings_s"]["diffusion"]["chunks"] == 2

    with open(out / "ablation.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[2]["prior_scale"] == ""
    record = json.loads((out / "ablation.json").read_text())  # strict JSON: NaN written as null
    assert len(record["rows"]) == len(rows) and record["rows"][2]["prior_scale"] is None
    assert record["settings"]["skipped"][0]["prior"] == "ar"
    assert set(record["timings_s"]) >= {"diffusion", "none", "glide", "metrics_seconds"}
    assert len(result["paths"]["plots"]) == 3
    for path in result["paths"]["plots"]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert len(list((out / "grids").glob("*.png"))) == len(rows)
    with Image.open(out / "grids" / "unclip_diffusion_p1_d3.png") as im:
        # rows = prompts, columns = samples: 2 x 2 decoder-size (32 px) images, 2 px padding
        assert im.size == (2 + 2 * 34, 2 + 2 * 34)
    assert len(result["summary"]) == 4
    assert all(": yes" in s or ": no" in s or "not measured" in s for s in result["summary"])


def test_summarize_states_each_claim():
    def row(pipeline, prior, ds, fid, div, ps=1.0):
        return dict(pipeline=pipeline, prior=prior, prior_scale=ps, decoder_scale=ds,
                    faithfulness_caption=fid, diversity=div, clip_score=20.0)  # fmt: skip

    rows = [row("unclip", "diffusion", 1, 0.2, 0.5), row("unclip", "diffusion", 4, 0.6, 0.3),
            row("unclip", "ar", 1, 0.1, 0.4), row("unclip", "ar", 4, 0.5, 0.2),
            row("glide", "glide", 1, 0.3, 0.2, math.nan),
            row("glide", "glide", 4, 0.7, 0.1, math.nan)]  # fmt: skip
    lines = report.summarize(rows)
    assert lines[0].startswith("guidance raises caption faithfulness: yes")
    assert lines[1].startswith("guidance lowers diversity: yes")
    assert lines[2].startswith("unCLIP more diverse than GLIDE at equal guidance: yes")
    assert "0.500 vs GLIDE 0.200" in lines[2]
    assert "AR prior (caption faithfulness): yes" in lines[3]
    rows[1]["faithfulness_caption"] = 0.1  # guidance now lowers diffusion's faithfulness
    assert report.summarize(rows)[0].startswith("guidance raises caption faithfulness: no")
    only = report.summarize([rows[0]])
    assert all("not measured" in s for s in only)


def _samples_folder(path):
    """A samples folder of ground-truth renders (two per caption), as `sample` writes one."""
    examples = [shapes.render_example("validation", i) for i in range(3)]  # 6 images, as the
    # reference below: one CLIP image compilation serves both
    images = np.stack([e.image for e in examples for _ in range(2)]).astype(np.float32)
    prompts = [e.caption for e in examples for _ in range(2)]
    save_samples(path, images / 127.5 - 1.0, {"pipeline": "unclip", "prompts": prompts})
    return prompts


def _parse(add_arguments, argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_eval_on_a_samples_folder(runs, tmp_path, capsys):
    folder = tmp_path / "samples"
    _samples_folder(folder)
    args = _parse(report.add_eval_arguments, [str(folder), "--clip", runs["clip"],
                                              "--reference-split", "train",
                                              "--reference-count", "6"])  # fmt: skip
    result = report.run_eval(args)
    assert result["faithfulness"]["caption"] == 1.0  # renders match their own captions
    assert math.isfinite(result["clip_score"]) and math.isfinite(result["frechet_distance"])
    assert 0.0 <= result["diversity"] <= 2.0
    written = json.loads((folder / "eval.json").read_text())
    assert written["n"] == 6 and written["reference"]["n"] == 6
    assert "faithfulness caption" in capsys.readouterr().out
    # Without CLIP: faithfulness only; the missing metrics say why.
    args = _parse(report.add_eval_arguments, [str(folder), "--out", str(tmp_path / "e.json")])
    result = report.run_eval(args)
    assert result["clip_score"] is None and any("no --clip" in n for n in result["notes"])


def test_user_errors(runs, tmp_path):
    good = ["--clip", runs["clip"], "--decoder", runs["decoder"], "--out", str(tmp_path / "o")]
    cases = [
        (["a red circle", "--clip", str(tmp_path / "missing"), "--decoder", runs["decoder"]],
         FileNotFoundError, "--clip: run folder not found"),
        (["a red circle", *good, "--decoder-scales", "1", "x"], ValueError,
         "--decoder-scales: 'x' is not a number"),
        (["a red circle", *good, "--prior-scales", "-1"], ValueError, "finite and >= 0"),
        (["a red circle", "--glide-base", runs["glide_base"], "--clip", runs["clip"]],
         ValueError, "both --clip RUN and --decoder RUN"),
        ([*good], ValueError, "no prompts"),
    ]  # fmt: skip
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases.append(([*good, "--prompts", str(empty)], ValueError, "holds no prompts"))
    cases.append(([*good, "--prompts", str(tmp_path / "nope.txt")], FileNotFoundError,
                  "prompt file not found"))  # fmt: skip
    for argv, error, message in cases:
        with pytest.raises(error, match=message):
            ablate.run_ablate(_parse(ablate.add_ablate_arguments, argv))
    with pytest.raises(ValueError, match="outside the shapes grammar"):
        ablate.run_ablation(prompts=["a photo of a dog"], out_dir=tmp_path, unclip=object())
    with pytest.raises(FileNotFoundError, match="record.json"):
        report.run_eval(_parse(report.add_eval_arguments, [str(tmp_path)]))


def test_random_runs_restore_as_train_states(runs):
    from unclip_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(f"{runs['prior']}/checkpoints", enable_async=False)
    try:
        state, config, _ = ckpt.restore()
    finally:
        ckpt.close()
    assert config["kind"] == "prior"
    assert set(state) == {"step", "params", "ema_params", "opt_state", "skipped"}
    same = jax.tree.map(np.array_equal, state["params"], state["ema_params"])
    assert all(jax.tree.leaves(same))
