"""Sampler loops side by side: unclip-jax's jitted whole-loop samplers vs diffusers' schedulers.

    make bench      # or: .venv/bin/python benchmarks/bench_samplers.py

The same network on both sides (the toy demo's residual MLP, hidden 256, depth 3, random weights
copied from Flax into an equivalent torch module), the same classifier-free guidance batching
(one 2B forward pass per step), float32 on the CPU. Per configuration it reports the JAX compile
time, the steady-state time per sampling call on each side (min and median of interleaved
repeats under benchmarks/harness.py's load rules), their ratio, and the largest difference
between the two outputs (both run the same math, so it is a parity check too).
Results: benchmarks/results/samplers_cpu.json.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from unclip_jax import compile_cache, diffusion
from unclip_jax.demo.toy2d import ToyDenoiser

OUT = pathlib.Path(__file__).parent / "results" / "samplers_cpu.json"
HIDDEN, DEPTH, CLASSES, REPEATS = 256, 3, 8, 5


class TorchToyDenoiser(torch.nn.Module):
    """The same network as ToyDenoiser, in torch (weights loaded from the Flax params)."""

    def __init__(self, params):
        super().__init__()
        t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
        self.p = {k: {n: t(v) for n, v in layer.items()} for k, layer in params.items()}

    def _dense(self, name, x):
        return x @ self.p[name]["kernel"] + self.p[name]["bias"]

    def _norm(self, name, x):
        return torch.nn.functional.layer_norm(
            x, x.shape[-1:], self.p[name]["scale"], self.p[name]["bias"], eps=1e-6
        )

    def forward(self, x, t, label):
        half = HIDDEN // 2
        freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        emb = self._dense("Dense_1", torch.nn.functional.silu(self._dense("Dense_0", emb)))
        emb = emb + self.p["Embed_0"]["embedding"][label]
        h = self._dense("Dense_2", x)
        for i in range(DEPTH):
            r = torch.nn.functional.silu(self._norm(f"LayerNorm_{i}", h) + emb)
            r = self._dense(f"Dense_{3 + 2 * i}", r)
            h = h + self._dense(f"Dense_{4 + 2 * i}", torch.nn.functional.silu(r))
        h = torch.nn.functional.silu(self._norm(f"LayerNorm_{DEPTH}", h))
        return self._dense(f"Dense_{3 + 2 * DEPTH}", h)


MODULE = ToyDenoiser(CLASSES, HIDDEN, DEPTH)


def jax_model_fn(params, x, t, cond):
    return MODULE.apply({"params": params}, x, t, cond["label"])


def torch_guided_eps(net, x, t, labels, null, scale):
    out = net(torch.cat([x, x]), torch.full((2 * len(x),), int(t)), torch.cat([labels, null]))
    eps_c, eps_u = out[: len(x), :2], out[len(x) :, :2]
    return eps_u + scale[:, None] * (eps_c - eps_u)


def bench(kind: str, batch: int, params, net) -> dict:
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((batch, 2)).astype(np.float32)
    labels = rng.integers(0, CLASSES, batch)
    scale = np.full(batch, 3.0, np.float32)
    if kind == "ddim50":
        sched = DDIMScheduler(
            beta_schedule="squaredcos_cap_v2",
            clip_sample=True,
            set_alpha_to_one=True,
            steps_offset=0,
            timestep_spacing="leading",
        )
        sched.set_timesteps(50)
        step_kw = {"use_clipped_model_output": True}  # eps from the clamped x0, as GLIDE does
        table = diffusion.create_diffusion("cosine", timestep_respacing="ddim50",
                                           var_type="learned_range")  # fmt: skip
        run_jax = lambda: diffusion.ddim_sample_loop(  # noqa: E731
            jax_model_fn, table, params, jnp.asarray(x_T), jax.random.key(0),
            {"label": jnp.asarray(labels)}, null_cond={"label": jnp.full(batch, CLASSES)},
            guidance_scale=jnp.asarray(scale), clip_denoised=True,
        ).block_until_ready()  # fmt: skip
    else:
        sched = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2",
                                            algorithm_type="dpmsolver++", solver_order=2,
                                            final_sigmas_type="zero")  # fmt: skip
        sched.set_timesteps(20)
        step_kw = {}
        table = diffusion.create_diffusion("cosine", use_timesteps=sched.timesteps.numpy(),
                                           var_type="learned_range")  # fmt: skip
        run_jax = lambda: diffusion.dpm_solver_pp_2m_loop(  # noqa: E731
            jax_model_fn, table, params, jnp.asarray(x_T), {"label": jnp.asarray(labels)},
            null_cond={"label": jnp.full(batch, CLASSES)}, guidance_scale=jnp.asarray(scale),
            clip_denoised=False, lower_order_final=False,
        ).block_until_ready()  # fmt: skip

    def run_torch():
        sched.set_timesteps(len(sched.timesteps))
        x = torch.tensor(x_T)
        lab, null = torch.tensor(labels), torch.full((batch,), CLASSES)
        with torch.no_grad():
            for t in sched.timesteps:
                eps = torch_guided_eps(net, x, t, lab, null, torch.tensor(scale))
                x = sched.step(eps, t, x, **step_kw).prev_sample
        return x

    before = compile_cache.stats()
    start = time.perf_counter()
    ours = np.asarray(run_jax())
    first = time.perf_counter() - start
    compile_s = sum(compile_cache.stats()[k] - before[k] for k in ("trace_s", "lower_s",
                                                                    "backend_s"))  # fmt: skip
    theirs = run_torch().numpy()  # warm-up
    gate = harness.quiet_gate(f"{kind} batch {batch}")
    timed = harness.interleave({"jax": run_jax, "torch": run_torch}, REPEATS)
    return {
        "sampler": kind,
        "batch": batch,
        "steps": int(table.num_timesteps),
        "gate": gate,
        "valid": harness.section_valid(gate, *timed.values()),
        "jax_first_call_s": first,
        "jax_compile_s": compile_s,
        **timed,
        "torch_over_jax": harness.ratio(timed["torch"], timed["jax"]),
        "max_abs_diff": float(np.abs(ours - theirs).max()),
        "max_abs_output": float(np.abs(theirs).max()),
        # Unclamped DPM samples of a random network reach ~1e5; compare relative to that.
        "max_rel_diff": float(np.abs(ours - theirs).max() / np.abs(theirs).max()),
    }


def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    import diffusers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    module = ToyDenoiser(CLASSES, HIDDEN, DEPTH)
    params = nn.meta.unbox(
        module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), int))
    )["params"]
    # Random (non-zero) weights everywhere, the zero-initialised output layer included.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [
        leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)
    ]
    params = jax.tree.unflatten(treedef, [np.asarray(a) for a in noisy])
    net = TorchToyDenoiser(params)
    # The torch port must be the same function before its timings mean anything.
    x = np.random.default_rng(1).standard_normal((8, 2)).astype(np.float32)
    t, lab = np.arange(8) * 100, np.arange(8) % CLASSES
    ref = jax_model_fn(params, jnp.asarray(x), jnp.asarray(t), {"label": jnp.asarray(lab)})
    got = net(torch.tensor(x), torch.tensor(t), torch.tensor(lab)).detach().numpy()
    assert np.abs(np.asarray(ref) - got).max() < 1e-4, "torch port differs from the Flax module"

    results = [bench(kind, b, params, net) for kind in ("ddim50", "dpm20") for b in (256, 4096)]
    report = {"benchmark": "sampler loops, toy MLP, CFG, float32", "machine": machine(),
              "results": results}  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1))
    for r in results:
        ratio = r["torch_over_jax"]
        print(f"{r['sampler']:>7} B={r['batch']:<5} jax {r['jax']['median_s']} s  torch "
              f"{r['torch']['median_s']} s  torch/jax {ratio}  compile {r['jax_compile_s']:.2f} s"
              f"  max rel diff {r['max_rel_diff']:.1e}  valid {r['valid']}")  # fmt: skip


if __name__ == "__main__":
    main()
