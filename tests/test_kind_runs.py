"""Every unCLIP model kind through `unclip-jax train` (issue 5): a 30-step CPU run of each tiny
config on `shapes` tiny lowers its loss and writes checkpoints, metrics and an EMA sample grid
(train/unclip_hooks.py). The clip run comes first: its CLIP embeds both splits into the side
dataset that the prior, AR prior and decoder runs read, as the demo does."""

import json
import math

import pytest
from PIL import Image

from unclip_jax import cli

STEPS = 30
COMMON = [f"optim.steps={STEPS}", "train.log_every=1", f"train.sample_every={STEPS}",
          f"ckpt.save_every={STEPS}", "train.tensorboard=False"]  # fmt: skip


def grid_size(columns: int, rows: int, tile: int) -> tuple[int, int]:
    """(width, height) of imaging.make_grid's grid: tiles with 2 px of padding around each."""
    return 2 + columns * (tile + 2), 2 + rows * (tile + 2)


# name -> (config, overrides, sample grid size). Small batches (a multiple of the 8 fake devices)
# and, for the UNets, one resolution level (as tests/test_decoder.py and test_upsampler.py) keep
# compiling and stepping within the CI budget. Retrieval grids: 4 captions x (own image + top 3)
# at 64 px; decoder: 4 x (original, decoding) at 16 px; upsampler: 4 x (low res, sample, truth).
FEW_STEPS = "train.sample_respacing='4'"  # the diffusion kinds' sampling steps in the grid
UNET = [FEW_STEPS, "optim.batch_size=8", "model.unet.channel_mult=(1,)"]
DECODER = [*UNET, "model.unet.image_size=16", "model.unet.attention_resolutions=''"]
RUNS = {
    "clip": ("clip_vit_b32:tiny", ["optim.batch_size=16"], grid_size(4, 4, 64)),
    "prior": ("prior_diffusion:tiny", [FEW_STEPS], grid_size(4, 4, 64)),
    "ar_prior": ("prior_ar:tiny", [], grid_size(4, 4, 64)),
    "decoder": ("decoder64:tiny", DECODER, grid_size(2, 4, 16)),
    "upsampler": ("upsample256:tiny", UNET, grid_size(3, 4, 64)),
}


MAX_RATIO = {"prior": 0.6, "ar_prior": 0.96, "decoder": 0.45, "upsampler": 0.45}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("kinds")


def train(root, name, *extra):
    """`unclip-jax train` of RUNS[name] in root/name; returns (exit code, workdir)."""
    config, overrides, _ = RUNS[name]
    argv = ["train", "--config", config, "--workdir", str(root / name)]
    for setting in [*COMMON, f"data.dir={root / 'data'}", *overrides, *extra]:
        argv += ["--set", setting]
    return cli.main(argv), root / name


@pytest.fixture(scope="module")
def clip_run(root):
    return train(root, "clip")


@pytest.fixture(scope="module")
def embeddings(root, clip_run):
    """The side dataset of both shapes splits (the hooks show held-out `validation` examples)."""
    assert clip_run[0] == 0
    out = root / "embeddings"
    for split in ("train", "validation"):
        argv = ["data", "embed", "--dataset", "shapes:tiny", "--data_dir", str(root / "data"),
                "--split", split, "--out", str(out), "--clip_checkpoint", str(clip_run[1]),
                "--batch_size", "64"]  # fmt: skip
        assert cli.main(argv) == 0
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_tiny_kind_trains_and_samples(name, root, request):
    if name == "clip":
        code, workdir = request.getfixturevalue("clip_run")
    elif name == "upsampler":  # source images only
        code, workdir = train(root, name)
    else:
        embeddings = request.getfixturevalue("embeddings")
        code, workdir = train(root, name, f"data.embeddings={embeddings}")
    assert code == 0

    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in lines]
    # Mean of the last 5 steps over the first 5, at most MAX_RATIO (measured: prior 0.40, AR
    # prior 0.92, decoder 0.23, upsampler 0.25): a model that does not learn stays near 1. The
    # tiny CLIP only falls from its init (2.90) to the chance plateau ln(16) = 2.77 in 30 steps
    # (its learning is tests/test_clip_training.py's): it must reach that plateau.
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    if name == "clip":
        assert last < math.log(16) + 0.02 < first, (first, last)
    else:
        assert last < MAX_RATIO[name] * first, (name, first, last, last / first)
    assert (workdir / "checkpoints" / str(STEPS)).is_dir()
    with Image.open(workdir / "samples" / f"step_{STEPS:06d}.png") as grid:
        grid.load()
        assert grid.mode == "RGB" and grid.size == RUNS[name][2]

    if name in ("clip", "prior", "ar_prior"):  # the retrieval grids' numbers
        lines = (workdir / "sample_metrics.jsonl").read_text().splitlines()
        [record] = [json.loads(x) for x in lines]
        assert record["step"] == STEPS and 0.0 <= record["sample_top1"] <= 1.0
        if name != "clip":
            # The mechanism of the prior's case (unCLIP, section 3): on held-out examples its
            # sampled embeddings are closer to the true image embeddings than the captions' own
            # text embeddings, which a prior that passed z_t through (or sampled the wrong space)
            # would not be. Measured after 30 steps: prior 0.90, AR prior 1.00, text -0.06. Over
            # a CLIP still at chance the image embeddings nearly share one direction, so this
            # shows the mechanism, not a caption-specific gain (that is sample_top1's).
            assert record["sample_cosine"] > record["text_cosine"] + 0.5, record
