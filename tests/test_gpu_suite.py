"""benchmarks/gpu_suite.sh --dry-run: the GPU suite's code at tiny sizes on the CPU, so that it is
known to run before a GPU is lent. Checks the JSON's shape and that every part ran or said why
it did not; no timing is asserted."""

import json
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_dry_run_writes_every_part(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["dry_run"] and result["device"]["platform"] == "cpu"
    parts = result["parts"]
    assert set(parts) == {"train_step", "karlo_sampling", "attention"}
    step = parts["train_step"]
    assert step["status"] == "ok", step
    assert step["spec"] == "decoder64:tiny_glide" and step["per_device_batch"] == 2
    assert step["xla_flops_per_step"] > 0 and step["median_s"] > 0 and step["params"] > 0
    assert step["peak_flops"] is None and step["mfu"] is None  # no peak known for a CPU
    sampling = parts["karlo_sampling"]
    assert sampling["status"] in ("ok", "skipped"), sampling
    if sampling["status"] == "ok":  # torch and diffusers installed
        assert sampling["torch_over_jax"] > 0
        assert sampling["float32"]["jax_dtype"] == "float32"
        half = sampling["half"]  # on the CPU: ours in bfloat16 alone
        assert half["jax_dtype"] == "bfloat16" and half["jax_images_finite"], half
        assert half["jax_median_s"] > 0 and half["torch_over_jax"] is None
    else:
        assert "torch" in sampling["why"]
    (row,) = parts["attention"]["shapes"]
    assert set(row) >= {"plain", "xla_fused"} and "cudnn" not in row
    assert row["xla_fused"]["max_abs_diff_vs_plain"] < 0.05  # bf16
    assert row["plain"]["forward_backward"]["median_s"] > 0
