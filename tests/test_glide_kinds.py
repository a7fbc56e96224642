"""GLIDE's other two kinds through the shared loop (the same `glide` train kind, issue 18): the
inpaint and upsampler configs each lower their loss in a 30-step CPU run on `shapes` tiny. Apart
from tests/test_train_kinds.py so that the two xdist workers can take them in parallel."""

import json

import pytest

from unclip_jax import config_utils
from unclip_jax.checkpoint import Checkpointer
from unclip_jax.train.loop import train

# 30 steps each of the tiny configs, at batch 8 with one UNet level (as tests/test_kind_runs.py's
# UNets) to keep the suite's time. The mse at step 30 (mean of steps 25 and 30) over step 5, at
# most RATIO (measured: inpaint 0.30, upsampler 0.18); a model that does not learn stays near 1.
RATIO = {"glide_inpaint64:tiny": 0.5, "glide_upsample256:tiny": 0.5}


@pytest.mark.parametrize("name", list(RATIO))
def test_glide_inpaint_and_upsampler_kinds_learn_in_30_steps(name, tmp_path_factory):
    data = tmp_path_factory.getbasetemp() / "glide_kinds_data"  # built once, shared
    run = tmp_path_factory.mktemp("run")
    settings = [
        f"data.dir={data}",
        "train.eval_every=0",
        "train.sample_every=0",
        "ckpt.save_every=30",
        "optim.batch_size=8",
        "model.unet.channel_mult=(1,)",
    ]
    config = config_utils.load_config(name, settings)
    assert train(config, run)["step"] == 30
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 10, 15, 20, 25, 30]
    first, last = lines[0]["mse"], sum(m["mse"] for m in lines[-2:]) / 2
    print(f"{name}: mse {first:.4f} -> {last:.4f} ({last / first:.2f})")
    assert last < RATIO[name] * first, (first, last)
    ckpt = Checkpointer(run / "checkpoints", enable_async=False)
    assert ckpt.latest_step() == 30
    ckpt.close()
