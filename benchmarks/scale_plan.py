"""What it takes to train unCLIP at paper scale, on paper: AOT compilation, no weights.

    .venv/bin/python benchmarks/scale_plan.py                      # every paper model, 64 devices
    .venv/bin/python benchmarks/scale_plan.py --models prior_diffusion,prior_ar
    .venv/bin/python benchmarks/scale_plan.py --tiny               # tiny configs, 8 devices

Each paper-scale train step is built as `unclip-jax train` builds it (the model kind of
train/kinds.py, make_optimizer and TrainState.create, parallel.create_mesh, rules_for and
logical_shardings, make_train_step and compile_train_step), from a `jax.eval_shape` train state,
so no weight is ever allocated, then lowered and compiled for a mesh of fake CPU devices. It is
compiled per layout (FSDP over every device; FSDP + tensor parallelism for the models with
attention heads to split), with and without remat, at two per-device batches. Reported per model:
parameter count; bytes of params, EMA and AdamW state, in total and per device (from the
shardings); XLA's memory analysis and FLOP count of the compiled step; an independent FLOP count
(the matmuls and convolutions of the forward pass's jaxpr, x3 for a train step) and 6 N D for the
transformers; the largest per-device batch that fits 80 GB (H100) and 95 GB (TPU v5p), by a
linear fit of the measured peak over the two batches; the step time at 40% MFU for the config's
global batch. Results: benchmarks/results/scale_plan.json and scale_plan.md.

Every compilation runs in its own process (a timeout, and a crash or an out-of-memory kill is
recorded as that run's failure); `--in-process` runs them here instead.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated, default: all of MODELS")
    parser.add_argument("--devices", type=int, default=None, help="fake CPU devices (64; 8 tiny)")
    parser.add_argument("--out", default=None, help="JSON path (the .md is written beside it)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on 8 devices")
    parser.add_argument("--batches", default="1,2", help="two or more per-device batches")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per compilation")
    parser.add_argument("--in-process", action="store_true", help="compile in this process")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the successful runs already in --out and compile the rest",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one run, JSON out
    return parser.parse_args(argv)


if __name__ == "__main__":  # the fake devices must be requested before jax is imported
    _ARGS = parse_args()
    _COUNT = _ARGS.devices or (8 if _ARGS.tiny else 64)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_COUNT}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from unclip_jax import config_utils, parallel  # noqa: E402
from unclip_jax.checkpoint import abstract_like  # noqa: E402
from unclip_jax.data import loader, transforms  # noqa: E402
from unclip_jax.train.kinds import get_kind  # noqa: E402
from unclip_jax.train.state import TrainState, make_optimizer  # noqa: E402
from unclip_jax.train.step import compile_train_step, make_train_step  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
GB = 1e9  # decimal: accelerator memory is quoted as 80 GB / 95 GB
MFU = 0.4
# Dense bf16 peaks (FLOP/s) and memory per chip (bytes).
HARDWARE = {
    "h100": {"name": "H100 SXM 80GB", "peak_flops": 989e12, "memory": 80 * GB},
    "v5p": {"name": "TPU v5p", "peak_flops": 459e12, "memory": 95 * GB},
}


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    paper: str  # config spec of the paper-scale variant
    tiny: str  # its tiny stand-in (same model kind and text pathway)
    tensor: int | None  # tensor-parallel degree of the FSDP+TP layout; None: FSDP only
    transformer: bool  # 6 N D applies (tokens = sequence positions)


# The tensor degree divides the heads (32; the AR prior's 26 only by 2). The upsamplers have no
# attention: fsdp_tp would split only their time-embedding MLP, so they get FSDP alone.
MODELS = {
    "decoder64": ModelPlan("decoder64:paper", "decoder64:tiny_glide", 8, False),
    "prior_diffusion": ModelPlan("prior_diffusion:paper", "prior_diffusion:tiny", 8, True),
    "prior_ar": ModelPlan("prior_ar:paper", "prior_ar:tiny", 2, True),
    "upsample256": ModelPlan("upsample256:paper", "upsample256:tiny", None, False),
    "upsample1024": ModelPlan("upsample1024:paper", "upsample1024:tiny", None, False),
    "glide_base64": ModelPlan("glide_base64:paper", "glide_base64:tiny", 8, False),
}


def model_plan(name: str) -> ModelPlan:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name]


# ------------------------------------------------------------------------------ building a step
def mesh_shape(layout: str, devices: int, tensor: int | None) -> tuple[tuple[str, int], ...]:
    """(data, fsdp, tensor) sizes of a layout: fsdp over all devices, or fsdp x tensor."""
    if layout == "fsdp":
        return (("data", 1), ("fsdp", devices), ("tensor", 1))
    if layout == "data_parallel":  # params replicated: the unsharded reference
        return (("data", devices), ("fsdp", 1), ("tensor", 1))
    if layout == "fsdp_tp":
        if not tensor or devices % tensor:
            raise ValueError(f"fsdp_tp needs a tensor degree dividing {devices}, got {tensor}")
        return (("data", 1), ("fsdp", devices // tensor), ("tensor", tensor))
    raise ValueError(f"unknown layout {layout!r}: fsdp, fsdp_tp or data_parallel")


def _codec_file(config, workdir: pathlib.Path) -> None:
    """A codec.npz of the AR prior's shapes (values are irrelevant to memory and FLOPs), so its
    kind loads it instead of fitting one on a side dataset."""
    m = config.model
    k, n, d, bins = m.n_components, m.n_buckets, m.clip_dim, m.n_dot_bins
    arrays = {
        "mean": np.zeros(d), "components": np.eye(k, d), "eigenvalues": np.ones(k),
        "edges": np.tile(np.linspace(-1, 1, n - 1), (k, 1)), "centres": np.zeros((k, n)),
        "dot_edges": np.linspace(-1, 1, bins - 1), "dot_percentiles": np.linspace(-1, 1, 101),
    }  # fmt: skip
    np.savez(workdir / "codec.npz", **{key: v.astype(np.float32) for key, v in arrays.items()})


def load_plan_config(spec: str, remat: bool):
    """The config with remat set and the data-only settings that `get_kind` reads neutralised:
    no side dataset is opened (its path is only checked to be set) and the "glide" text pathway
    uses the byte tokenizer (the step sees token ids of the same context length either way)."""
    config = config_utils.load_config(spec)
    overrides = [f"model.remat={remat}", "data.embeddings=unused (scale plan)"]
    if config.kind == "glide" or config.model.get("text_pathway") == "glide":
        overrides.append("data.tokenizer=bytes")
    if config.kind == "decoder" and config.model.text_pathway != "glide":
        raise ValueError(f"{spec}: the scale plan builds decoders with the 'glide' text "
                         "pathway only (the 'clip' pathway reads its null text from a side "
                         "dataset)")  # fmt: skip
    return config_utils.load_config(spec, overrides)


def batch_specs(config, global_batch: int, sharding) -> dict:
    """ShapeDtypeStructs of one global batch as the kind's data pipeline yields it."""
    m, b = config.model, global_batch

    def spec(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct((b, *shape), dtype, sharding=sharding)

    if config.kind == "glide":
        if m.get("low_res_size") is not None or m.mode != "base":
            raise ValueError("the scale plan builds GLIDE base models only")
        size, ctx = m.unet.image_size, m.text.text_ctx
        return {"image": spec((size, size, 3)), "tokens": spec((ctx,), jnp.int32),
                "mask": spec((ctx,), jnp.bool_)}  # fmt: skip
    if config.kind == "decoder":
        size, ctx = m.unet.image_size, m.text.text_ctx
        return {"image": spec((size, size, 3)), "image_emb": spec((m.clip_dim,)),
                "tokens": spec((ctx,), jnp.int32), "mask": spec((ctx,), jnp.bool_)}  # fmt: skip
    if config.kind == "prior":
        return {"image_emb": spec((m.clip_dim,)), "text_emb": spec((m.clip_dim,)),
                "text_tokens": spec((m.text_ctx, m.text_dim)),
                "text_mask": spec((m.text_ctx,), jnp.bool_)}  # fmt: skip
    if config.kind == "ar_prior":
        return {"image_emb": spec((m.clip_dim,)), "text_emb": spec((m.clip_dim,)),
                "tokens": spec((m.text_ctx,), jnp.int32),
                "mask": spec((m.text_ctx,), jnp.bool_)}  # fmt: skip
    if config.kind == "upsampler":
        size = m.unet.image_size
        if config.train.degradation != "given":  # the loss crops and degrades on device
            return {"image": spec((size, size, 3))}
        crop = transforms.crop_size(size, config.train.crop_fraction)
        low = crop * m.low_res_size // size
        return {"image": spec((crop, crop, 3)), "low_res": spec((low, low, 3))}
    raise ValueError(f"the scale plan does not know the batches of kind {config.kind!r}")


@contextlib.contextmanager
def accelerator_attention():
    """Trace attention in its accelerator form: models/layers.py picks a blocked loop on the CPU
    backend for large logits (a CPU speed-up), which GPUs and TPUs do not run."""
    from unclip_jax.models import layers

    if not hasattr(layers, "_CPU_BLOCK_LOGITS"):
        yield
        return
    saved = layers._CPU_BLOCK_LOGITS
    layers._CPU_BLOCK_LOGITS = math.inf
    try:
        yield
    finally:
        layers._CPU_BLOCK_LOGITS = saved


@dataclasses.dataclass
class Built:
    config: object
    kind: object
    tx: object
    schedule: object
    mesh: object
    rules: tuple
    abstract: object  # the unboxed TrainState of ShapeDtypeStructs with shardings
    shardings: object


def build(spec: str, layout: str, devices: int, tensor: int | None, remat: bool,
          workdir: pathlib.Path) -> Built:  # fmt: skip
    """The abstract train state of `spec` and its shardings on a `layout` mesh (no allocation)."""
    config = load_plan_config(spec, remat)
    if config.kind == "ar_prior":
        _codec_file(config, workdir)
    kind = get_kind(config, workdir)
    mesh = parallel.create_mesh(mesh_shape(layout, devices, tensor),
                                devices=jax.devices()[:devices])  # fmt: skip
    rules = parallel.rules_for(layout)  # the layouts are named after the rule presets
    tx, schedule = make_optimizer(config.optim)

    def create(rng):
        return TrainState.create(kind.init(rng), tx)

    boxed = jax.eval_shape(create, jax.random.key(config.seed))
    shardings = parallel.logical_shardings(boxed, mesh, rules)
    abstract = abstract_like(nn.meta.unbox(boxed), shardings)
    return Built(config, kind, tx, schedule, mesh, rules, abstract, shardings)


def state_bytes(built: Built) -> dict:
    """Bytes of params, EMA and optimizer state: in total and on one device (its shard)."""
    out = {}
    for part in ("params", "ema_params", "opt_state"):
        leaves = jax.tree.leaves(getattr(built.abstract, part))
        total = sum(x.size * x.dtype.itemsize for x in leaves)
        local = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
        out[part] = {"total": int(total), "per_device": int(local)}
    out["all"] = {k: sum(out[p][k] for p in ("params", "ema_params", "opt_state"))
                  for k in ("total", "per_device")}  # fmt: skip
    return out


def param_count(built: Built) -> int:
    return int(sum(x.size for x in jax.tree.leaves(built.abstract.params)))


# ------------------------------------------------------------------------------ FLOPs
def jaxpr_flops(jaxpr) -> float:
    """FLOPs (2 per multiply-add) of the matmuls and convolutions of a (closed) jaxpr, nested
    jaxprs included and scans multiplied by their length; elementwise work is not counted."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * out * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # [O, I / groups, *window] in rhs_spec order
            out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * out * math.prod(rhs) / rhs[out_dim]
        elif name == "cond":
            total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
        else:
            times = eqn.params.get("length", 1) if name == "scan" else 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        total += times * jaxpr_flops(sub)
    return total


def forward_flops(built: Built, batch) -> float:
    """Matmul + conv FLOPs of one forward pass of the loss on `batch` (global, unpartitioned)."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), built.abstract.params)
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    closed = jax.make_jaxpr(built.kind.loss_fn)(params, plain, jax.random.key(0))
    return jaxpr_flops(closed)


def sequence_length(config) -> int | None:
    """Positions a transformer prior runs over (for 6 N D)."""
    m = config.model
    if config.kind == "prior":
        return m.text_ctx + 4  # text tokens, text embedding, timestep, x_t, prediction
    if config.kind == "ar_prior":
        return m.text_ctx + m.n_components + 1  # caption, z_t, similarity, codes but the last
    return None


def cost_analysis_is_per_device(mesh) -> dict:
    """Establish what XLA's CPU cost analysis counts under SPMD: one matmul, compiled unsharded
    and with its rows split over every device of `mesh`."""
    rows = 64 * mesh.size
    a = jax.ShapeDtypeStruct((rows, 256), jnp.float32)
    b = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    split = NamedSharding(mesh, P(mesh.axis_names))
    whole = jax.jit(jnp.matmul).lower(a, b).compile().cost_analysis()["flops"]
    parts = jax.jit(jnp.matmul, in_shardings=(split, NamedSharding(mesh, P())),
                    out_shardings=split).lower(a, b).compile().cost_analysis()["flops"]  # fmt: skip
    return {"matmul_flops": 2.0 * rows * 256 * 256, "unsharded": whole, "sharded": parts,
            "per_device": bool(np.isclose(whole / parts, mesh.size))}  # fmt: skip


# ------------------------------------------------------------------------------ one compilation
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")  # fmt: skip


def compile_run(name: str, layout: str, remat: bool, per_device_batch: int, *, devices: int,
                tiny: bool = False) -> dict:  # fmt: skip
    """Build and compile one train step; returns its record (memory, FLOPs, state bytes)."""
    plan = model_plan(name)
    spec = plan.tiny if tiny else plan.paper
    tensor = (min(plan.tensor, 2) if tiny else plan.tensor) if plan.tensor else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir, accelerator_attention():
        built = build(spec, layout, devices, tensor, remat, pathlib.Path(workdir))
        global_batch = per_device_batch * devices
        batch_sharding = loader.batch_sharding(built.mesh)
        batch = batch_specs(built.config, global_batch, batch_sharding)
        optim = built.config.optim
        step = make_train_step(built.kind.loss_fn, built.tx, built.schedule,
                               ema_decay=optim.ema_decay,
                               accum_steps=optim.get("accum_steps", 1))  # fmt: skip
        replicated = NamedSharding(built.mesh, P())
        with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
            forward = forward_flops(built, batch)
            traced = time.perf_counter()
            compiled = compile_train_step(
                step, built.abstract, batch, jax.random.key(0), state_shardings=built.shardings,
                batch_shardings=jax.tree.map(lambda _: batch_sharding, batch),
                replicated=replicated,
            )  # fmt: skip
    compile_s = time.perf_counter() - traced
    analysis = compiled.memory_analysis()
    memory = {field.removesuffix("_size_in_bytes"): int(getattr(analysis, field))
              for field in MEMORY_FIELDS}  # fmt: skip
    memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    xla_flops = float(compiled.cost_analysis()["flops"])
    tokens = sequence_length(built.config)
    return {
        "model": name, "spec": spec, "layout": layout, "rules": layout,
        "mesh": dict(mesh_shape(layout, devices, tensor)), "remat": remat,
        "per_device_batch": per_device_batch, "global_batch": global_batch,
        "compute_dtype": str(built.config.model.get("dtype", "float32")),
        "param_dtype": str(jax.tree.leaves(built.abstract.params)[0].dtype),
        "params": param_count(built), "state_bytes": state_bytes(built),
        "memory": memory, "compile_s": round(compile_s, 1),
        "build_s": round(traced - start, 1),
        "flops": {
            "xla_per_device": xla_flops, "xla_global": xla_flops * devices,
            "forward_jaxpr": forward, "train_model": 3.0 * forward,
            "six_nd": 6.0 * param_count(built) * tokens * global_batch if tokens else None,
        },
        "status": "ok",
    }  # fmt: skip


# ------------------------------------------------------------------------------ the plan
def runs_of(names, batches, devices) -> list[tuple[str, str, bool, int]]:
    """(model, layout, remat, batch) in priority order: FSDP with remat for every model first,
    then FSDP without remat, then FSDP + TP with remat."""
    out = []
    for layout, remat in (("fsdp", True), ("fsdp", False), ("fsdp_tp", True)):
        for name in names:
            if layout == "fsdp_tp" and not model_plan(name).tensor:
                continue
            out += [(name, layout, remat, b) for b in batches]
    return out


def run_isolated(run, *, devices: int, tiny: bool, timeout: float) -> dict:
    """compile_run in a child process: a timeout or a crash becomes this run's failure."""
    name, layout, remat, batch = run
    command = [sys.executable, __file__, "--worker", f"{name},{layout},{int(remat)},{batch}",
               "--devices", str(devices)] + (["--tiny"] if tiny else [])  # fmt: skip
    failure = {"model": name, "layout": layout, "remat": remat, "per_device_batch": batch,
               "status": "failed"}  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return failure | {"error": f"not compiled within {timeout:.0f} s (killed)"}
    if done.returncode != 0:
        why = "killed by SIGKILL (out of memory?)" if done.returncode == -9 else (
            done.stderr.strip().splitlines() or ["no output"])[-1]  # fmt: skip
        return failure | {"error": f"exit {done.returncode} after "
                                   f"{time.perf_counter() - start:.0f} s: {why}"}  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(records: list[dict]) -> dict | None:
    """Peak = fixed + per_example x batch through the two smallest batches (linear; CPU XLA)."""
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: r["per_device_batch"])
    if len(ok) < 2:
        return None
    (b1, m1), (b2, m2) = [(r["per_device_batch"], r["memory"]["peak"]) for r in ok[:2]]
    per_example = (m2 - m1) / (b2 - b1)
    fixed = m1 - per_example * b1
    out = {"fixed_bytes": fixed, "per_example_bytes": per_example, "batches": [b1, b2]}
    for key, hw in HARDWARE.items():
        out[f"max_batch_{key}"] = (int((hw["memory"] - fixed) // per_example)
                                   if per_example > 0 else None)  # fmt: skip
    return out


def summarise(records: list[dict], devices: int, tiny: bool) -> dict:
    """Per model and layout: fits, FLOPs per example and step times at 40% MFU."""
    out = {}
    for name in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        config = load_plan_config(model_plan(name).tiny if tiny else model_plan(name).paper,
                                  False)  # fmt: skip
        entry = {"paper_global_batch": int(config.optim.batch_size), "layouts": {}}
        if ok:
            first = min(ok, key=lambda r: (r["layout"] != "fsdp", r["per_device_batch"]))
            per_example = first["flops"]["train_model"] / first["global_batch"]
            entry.update(params=first["params"], compute_dtype=first["compute_dtype"],
                         param_dtype=first["param_dtype"],
                         train_flops_per_example=per_example)  # fmt: skip
            step_flops = per_example * entry["paper_global_batch"]
            entry["train_flops_per_step"] = step_flops
            entry["step_s_at_40pct_mfu"] = {
                key: step_flops / (devices * hw["peak_flops"] * MFU) for key, hw in HARDWARE.items()
            }
        for layout, remat in dict.fromkeys((r["layout"], r["remat"]) for r in mine):
            group = [r for r in mine if (r["layout"], r["remat"]) == (layout, remat)]
            good = [r for r in group if r["status"] == "ok"]
            item = {"fit": fit(group), "failures": [r for r in group if r["status"] != "ok"]}
            if good:
                r = min(good, key=lambda r: r["per_device_batch"])
                item["state_bytes_per_device"] = r["state_bytes"]["all"]["per_device"]
                item["xla_over_model_flops"] = r["flops"]["xla_global"] / r["flops"]["train_model"]
                need = entry["paper_global_batch"] / devices
                best = (item["fit"] or {}).get("max_batch_h100")
                item["accum_steps_h100"] = math.ceil(need / best) if best and best > 0 else None
            entry["layouts"][f"{layout}{'+remat' if remat else ''}"] = item
        out[name] = entry
    return out


# ------------------------------------------------------------------------------ the report
def _gb(x):
    return "-" if x is None else f"{x / GB:.2f}"


def markdown(result: dict) -> str:
    """The README table and the method's notes."""
    s, devices = result["summary"], result["devices"]
    lines = [
        "# What it takes to train unCLIP at paper scale",
        "",
        f"AOT-compiled train steps on a mesh of {devices} fake CPU devices, FSDP over all of them "
        f"({result['jax']}, {result['date']}). Params float32, compute "
        f"{result.get('compute_dtype', 'bfloat16')}, AdamW + EMA. Peak = XLA memory analysis "
        "(arguments + outputs - aliased + temporaries) per device at per-device batch 1. Max batch "
        "per device: linear fit of the peak at two batches, against 80 GB (H100) / 95 GB (v5p). "
        f"Step time: the paper's global batch on {devices} chips at 40% MFU "
        "(model FLOPs, 3x the forward pass).",
        "",
        "| model | params | state / device (GB) | peak b=1, remat (GB) | max batch H100 / v5p, "
        "remat | peak b=1, no remat (GB) | max batch H100 / v5p, no remat | FLOPs / example "
        "(model; XLA) | global batch | step s H100 / v5p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in s.items():
        lay = e["layouts"]

        def peak(key, name=name, lay=lay):
            rs = [r for r in result["runs"] if r["model"] == name and r["status"] == "ok"
                  and f"{r['layout']}{'+remat' if r['remat'] else ''}" == key]  # fmt: skip
            if not rs:
                return "failed" if key in lay else "-"
            return _gb(min(rs, key=lambda r: r["per_device_batch"])["memory"]["peak"])

        def batch(key, lay=lay):
            f = (lay.get(key) or {}).get("fit")
            return f"{f['max_batch_h100']} / {f['max_batch_v5p']}" if f else "-"

        remat = lay.get("fsdp+remat", {})
        flops = "-"
        if "train_flops_per_example" in e:
            ratio = remat.get("xla_over_model_flops")
            xla = "" if ratio is None else f"; x{ratio:.2f}"
            flops = f"{e['train_flops_per_example'] / 1e12:.2f} T{xla}"
        steps = e.get("step_s_at_40pct_mfu")
        step = f"{steps['h100']:.2f} / {steps['v5p']:.2f}" if steps else "-"
        params = f"{e['params'] / 1e9:.3f} B" if "params" in e else "-"
        lines.append(f"| {name} | {params} | {_gb(remat.get('state_bytes_per_device'))} | "
                     f"{peak('fsdp+remat')} | {batch('fsdp+remat')} | {peak('fsdp')} | "
                     f"{batch('fsdp')} | {flops} | {e['paper_global_batch']} | "
                     f"{step} |")  # fmt: skip
    tp = [(n, e["layouts"]["fsdp_tp+remat"]) for n, e in s.items()
          if "fsdp_tp+remat" in e["layouts"]]  # fmt: skip
    if tp:
        lines += ["", "FSDP + tensor parallelism (remat):", "",
                  "| model | mesh (data, fsdp, tensor) | state / device (GB) | max batch H100 / "
                  "v5p |", "|---|---|---|---|"]  # fmt: skip
        for name, item in tp:
            run = next((r for r in result["runs"] if r["model"] == name
                        and r["layout"] == "fsdp_tp" and r["status"] == "ok"), None)  # fmt: skip
            mesh = "-" if run is None else ", ".join(str(v) for v in run["mesh"].values())
            f = item["fit"]
            fits = f"{f['max_batch_h100']} / {f['max_batch_v5p']}" if f else "failed"
            lines.append(f"| {name} | {mesh} | {_gb(item.get('state_bytes_per_device'))} | "
                         f"{fits} |")  # fmt: skip
    failures = [r for r in result["runs"] if r["status"] != "ok"]
    if failures:
        lines += ["", "Failed compilations:", ""]
        lines += [f"- {r['model']} {r['layout']} remat={r['remat']} batch {r['per_device_batch']}: "
                  f"{r['error']}" for r in failures]  # fmt: skip
    done = {(r["model"], r["layout"], r["remat"], r["per_device_batch"]) for r in result["runs"]}
    pending = [run for run in result.get("planned", []) if tuple(run) not in done]
    if pending:
        lines += ["", f"Not compiled yet ({len(pending)} of {len(result['planned'])} planned "
                  "runs; the plan was cut short, `scale_plan.py --resume` compiles the rest):",
                  ""]  # fmt: skip
        lines += [f"- {m} {layout} remat={remat} batch {b}" for m, layout, remat, b in pending]
    lines += ["", "## Method and limits", "", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "- Nothing is allocated: the train state comes from `jax.eval_shape`, the batch is "
    "`ShapeDtypeStruct`s, and the step is the one `unclip-jax train` compiles (same kinds, "
    "optimizer, shardings and `compile_train_step`). Data-only settings are neutralised (no side "
    "dataset is read; the GLIDE text pathway uses the byte tokenizer; the AR prior gets a codec "
    "of the right shapes).",
    "- Memory is XLA's CPU `memory_analysis()` of the per-device SPMD program: an estimate of "
    "CPU buffers, not a GPU or TPU allocator. It ignores allocator fragmentation, framework "
    "reserves (e.g. XLA's GPU preallocation), NCCL/ICI buffers and layout padding (TPU tiles), and "
    "the CPU compiler's fusion and bf16 handling differ from the GPU/TPU compilers'. Treat the "
    "max batch as an order of magnitude, and leave headroom.",
    "- The max batch is a linear extrapolation from two compiled batches (fixed part + "
    "per-example part); XLA's rematerialisation and scheduling choices can make the real curve "
    "non-linear.",
    "- FLOPs: XLA's CPU `cost_analysis()` under SPMD counts one device's program (established "
    "by compiling a matmul unsharded and sharded: `cost_analysis_probe`), so the global count is "
    "x devices; it includes remat's recomputation and the optimizer. The model FLOPs are "
    "independent: the matmuls and convolutions of the forward pass's jaxpr, x3 for a train step "
    "(backward = 2x forward), no recomputation; 6 N D (tokens = sequence positions) is given "
    "for the transformer priors and counts the embedding tables as matmuls.",
    "- Step time = model FLOPs of the paper's global batch / (devices x peak x 0.4), peaks "
    "989 TFLOP/s (H100 bf16 dense) and 459 TFLOP/s (v5p bf16); it says nothing about whether "
    "40% MFU is reachable (the UNets' small convolutions and attention at 64x64 rarely reach it). "
    "When the per-device share of the global batch exceeds the max batch, gradient accumulation "
    "(`optim.accum_steps`) keeps the step time and is counted in the JSON (`accum_steps_h100`).",
    "- Attention is traced in its accelerator form (models/layers.py uses a blocked loop on "
    "the CPU backend for large logits).",
]


# ------------------------------------------------------------------------------ entry point
def main(args: argparse.Namespace) -> dict:
    devices = args.devices or (8 if args.tiny else 64)
    if jax.device_count() < devices:
        raise SystemExit(f"{devices} devices requested, jax sees {jax.device_count()}: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")  # fmt: skip
    if args.worker:  # one run, its record as the last line of stdout
        name, layout, remat, batch = args.worker.split(",")
        record = compile_run(name, layout, bool(int(remat)), int(batch), devices=devices,
                             tiny=args.tiny)  # fmt: skip
        print(json.dumps(record))
        return record
    names = [n.strip() for n in args.models.split(",") if n.strip()] or list(MODELS)
    for name in names:
        model_plan(name)  # unknown names fail before anything compiles
    batches = sorted({int(b) for b in args.batches.split(",")})
    if len(batches) < 2:
        raise SystemExit("--batches needs two or more per-device batches for the memory fit")
    out = pathlib.Path(args.out or RESULTS / ("scale_plan_tiny.json" if args.tiny
                                              else "scale_plan.json"))  # fmt: skip
    mesh = parallel.create_mesh((("data", devices),), devices=jax.devices()[:devices])
    result = {
        "title": "What it takes to train unCLIP at paper scale",
        "date": datetime.date.today().isoformat(), "jax": f"jax {jax.__version__}",
        "flax": flax.__version__, "devices": devices, "platform": "cpu (fake devices)",
        "tiny": args.tiny, "per_device_batches": batches, "hardware": HARDWARE, "mfu": MFU,
        "cost_analysis_probe": cost_analysis_is_per_device(mesh), "runs": [],
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    planned = runs_of(names, batches, devices)
    result["planned"] = [list(run) for run in planned]
    if args.resume and out.exists():
        result["runs"] = [r for r in json.loads(out.read_text())["runs"] if r["status"] == "ok"]
    kept = {(r["model"], r["layout"], r["remat"], r["per_device_batch"]) for r in result["runs"]}
    for run in planned:
        if run in kept:
            continue
        print(f"compiling {run} ...", flush=True)
        if args.in_process:
            try:
                record = compile_run(*run, devices=devices, tiny=args.tiny)
            except Exception as error:  # recorded, the plan goes on
                record = {"model": run[0], "layout": run[1], "remat": run[2],
                          "per_device_batch": run[3], "status": "failed",
                          "error": f"{type(error).__name__}: {error}"}  # fmt: skip
        else:
            record = run_isolated(run, devices=devices, tiny=args.tiny, timeout=args.timeout)
        print(json.dumps({k: record.get(k) for k in ("status", "compile_s", "error")}) + " "
              + json.dumps(record.get("memory")), flush=True)  # fmt: skip
        result["runs"].append(record)
        result["summary"] = summarise(result["runs"], devices, args.tiny)
        dtypes = {r["compute_dtype"] for r in result["runs"] if r["status"] == "ok"}
        result["compute_dtype"] = ", ".join(sorted(dtypes)) or None
        out.write_text(json.dumps(result, indent=1) + "\n")  # partial results survive
        out.with_suffix(".md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main(_ARGS)
