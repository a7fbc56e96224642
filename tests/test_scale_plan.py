"""benchmarks/scale_plan.py on tiny configs and the 8 fake devices: per-device state bytes from
the shardings (FSDP ~ total / 8, replicated = total), one AOT compilation's memory analysis and
FLOPs, the linear memory fit and the report."""

import importlib.util
import pathlib
import sys

import jax
import pytest

PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "scale_plan.py"


@pytest.fixture(scope="module")
def plan():
    spec = importlib.util.spec_from_file_location("scale_plan", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("spec", ["decoder64:tiny_glide", "prior_diffusion:tiny"])
def test_state_bytes_per_device_follow_the_shardings(plan, spec, tmp_path):
    devices = jax.device_count()
    sharded = plan.state_bytes(plan.build(spec, "fsdp", devices, None, False, tmp_path))
    replicated = plan.state_bytes(plan.build(spec, "data_parallel", devices, None, False, tmp_path))
    assert sharded["all"]["total"] == replicated["all"]["total"]
    for part in ("params", "ema_params", "opt_state", "all"):
        # Unsharded: every device holds everything.
        assert replicated[part]["per_device"] == replicated[part]["total"]
        # FSDP: about total / 8; tiny models' replicated norms and biases add up to ~35%.
        ratio = sharded[part]["per_device"] * devices / sharded[part]["total"]
        assert 1.0 <= ratio < 1.5, (part, ratio)
    # Params, EMA and AdamW's two moments: opt_state is twice the params (+ its step counter).
    params = sharded["params"]["total"]
    assert sharded["ema_params"]["total"] == params
    assert 2 * params <= sharded["opt_state"]["total"] < 2 * params + 64


def test_one_compilation_reports_memory_and_flops(plan):
    record = plan.compile_run("prior_diffusion", "fsdp", False, 1, devices=jax.device_count(),
                              tiny=True)  # fmt: skip
    assert record["status"] == "ok" and record["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    memory = record["memory"]
    assert set(memory) >= {"argument", "output", "alias", "temp", "generated_code", "peak"}
    assert memory["argument"] >= record["state_bytes"]["all"]["per_device"] > 0
    assert memory["peak"] > memory["temp"] > 0
    flops = record["flops"]
    assert flops["xla_per_device"] > 0 and flops["forward_jaxpr"] > 0
    # XLA counts one device's program (plus elementwise work); the jaxpr count is global.
    assert 0.8 < flops["xla_global"] / flops["train_model"] < 3.0
    assert flops["six_nd"] > 0  # a transformer: 6 N D applies


def test_cost_analysis_counts_one_device(plan):
    probe = plan.cost_analysis_is_per_device(plan.parallel.create_mesh((("data", -1),)))
    assert probe["per_device"] and probe["unsharded"] == probe["matmul_flops"]


def test_fit_summary_and_report(plan):
    def record(batch, peak):
        return {"model": "prior_diffusion", "layout": "fsdp", "remat": True, "status": "ok",
                "per_device_batch": batch, "global_batch": 8 * batch, "params": 10,
                "compute_dtype": "float32", "param_dtype": "float32", "mesh": {"fsdp": 8},
                "memory": {"peak": peak}, "state_bytes": {"all": {"per_device": 5}},
                "flops": {"train_model": 24.0 * batch, "xla_global": 30.0 * batch}}  # fmt: skip

    fit = plan.fit([record(2, 30 * plan.GB), record(1, 20 * plan.GB)])
    assert fit["fixed_bytes"] == pytest.approx(10 * plan.GB)
    assert fit["per_example_bytes"] == pytest.approx(10 * plan.GB)
    assert fit["max_batch_h100"] == 7 and fit["max_batch_v5p"] == 8
    runs = [record(1, 20 * plan.GB), record(2, 30 * plan.GB)]
    summary = plan.summarise(runs, 8, tiny=True)["prior_diffusion"]
    assert summary["train_flops_per_example"] == 3.0
    assert summary["layouts"]["fsdp+remat"]["xla_over_model_flops"] == pytest.approx(1.25)
    text = plan.markdown({"summary": {"prior_diffusion": summary}, "devices": 8, "runs": runs,
                          "jax": "jax", "date": "today"})  # fmt: skip
    assert text.startswith("# What it takes to train unCLIP at paper scale")
    assert "| prior_diffusion |" in text and "7 / 8" in text
    with pytest.raises(ValueError, match="unknown model 'decoder'"):
        plan.model_plan("decoder")


def test_logical_shardings_replicate_dimensions_the_mesh_does_not_divide():
    import flax.linen as nn

    from unclip_jax import parallel

    mesh = parallel.create_mesh((("data", 1), ("fsdp", 8), ("tensor", 1)))

    class Head(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.zeros, ("mlp", "conv_out"))
            wide = self.param("wide", init, (16, 64))
            narrow = self.param("narrow", init, (16, 6))  # 6 output channels, 8-way fsdp
            return x @ wide, x @ narrow

    boxed = jax.eval_shape(Head().init, jax.random.key(0), jax.ShapeDtypeStruct((2, 16), "float32"))
    shardings = parallel.logical_shardings(boxed, mesh, "fsdp")["params"]
    wide, narrow = shardings["wide"], shardings["narrow"]
    assert wide.shard_shape((16, 64)) == (16, 8)  # conv_out -> fsdp where 8 divides it
    assert narrow.shard_shape((16, 6)) == (16, 6)  # and whole on every device where not


def test_karlo_memory_plan_on_tiny_configs(plan, tmp_path):
    """benchmarks/karlo_memory.py (the README's Karlo memory table) on the tiny configs: every
    stage compiles from shapes alone; its arguments hold the weights; a larger batch needs more;
    report.py renders the table."""
    sys.path.insert(0, str(PATH.parent))
    spec = importlib.util.spec_from_file_location("karlo_memory", PATH.parent / "karlo_memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    from unclip_jax import config_utils
    from unclip_jax.models.prior import count_params, prior_from_config

    out = tmp_path / "karlo_memory.json"
    result = memory.main(["--tiny", "--batches", "1,4", "--dtypes", "float32", "--out", str(out)])
    runs = {(r["stage"], r["batch"]): r for r in result["runs"]}
    assert {s for s, _ in runs} == {"clip", "prior", "decoder", "super_res"}
    for r in runs.values():
        assert r["param_bytes"] == 4 * r["params"]
        assert r["argument_size_in_bytes"] >= r["param_bytes"]
        assert r["peak_bytes"] >= r["argument_size_in_bytes"]
    for stage in ("decoder", "super_res"):
        assert runs[(stage, 4)]["peak_bytes"] > runs[(stage, 1)]["peak_bytes"]
    prior = prior_from_config(config_utils.load_config("prior_diffusion:tiny_karlo").model)
    assert runs[("prior", 1)]["params"] == count_params(prior)
    spec = importlib.util.spec_from_file_location("report", PATH.parent / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    table = report.karlo_memory(result)
    assert "| decoder |" in table and "peak at batch 4" in table
