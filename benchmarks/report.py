"""Rewrite the benchmark tables of the README and docs/results.md from benchmarks/results/*.json
(run by `make bench` and `make scale-plan`).

Each table lives between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in either file; a
missing JSON leaves its table as it is. Numbers are never typed into those tables by hand.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _s(x, unit="s") -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.0f} ms" if unit == "ms" or x < 1.0 else f"{x:.2f} s"


def _side(side: dict) -> str:
    return f"{_s(side['median_s'])} ({_s(side['min_s'])})"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _validity(record: dict) -> str:
    gate = record.get("gate", {})
    load = gate.get("load_1min_before")
    return ("yes" if record.get("valid") else "**no**") + (f", load {load}" if load is not None
                                                           else "")  # fmt: skip


def karlo_small(d: dict) -> str:
    rows = ["| measurement | unclip-jax median (min) | diffusers + torch median (min) | "
            "torch / jax | goal | JAX compile | valid, load before |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    goals = {k: v["goal"] for k, v in d.get("targets", {}).items()}
    sampling = d.get("sampling")
    if sampling:
        for s in sampling["stages"]:
            if s["stage"] == "text":
                continue
            name = ("sampling end to end, batch 4" if s["stage"] == "end_to_end"
                    else f"{s['stage']} stage, {s['steps']} steps")  # fmt: skip
            compile_s = f"{sampling['jax_compile_s']:.0f} s (all stages)" if s["stage"] == (
                "end_to_end") else ""  # fmt: skip
            rows.append(f"| {name} | {_side(s['jax'])} | {_side(s['torch'])} | "
                        f"{_ratio(s['torch_over_jax'])} | {goals.get(s['stage'], '-')} | "
                        f"{compile_s} | {_validity(sampling)} |")  # fmt: skip
    t = d.get("training")
    if t:
        rows.append(f"| decoder train step, batch 8 at 64 px | {_side(t['jax'])} | "
                    f"{_side(t['torch'])} | {_ratio(t['torch_over_jax'])} | "
                    f"{goals.get('train_step', '-')} | {t['jax_compile_s']:.0f} s | "
                    f"{_validity(t)} |")  # fmt: skip
    diag = d.get("diagnosis", {})
    f = diag.get("decoder_forward")
    if f:
        rows.append(f"| diagnosis: one decoder forward, batch 8 | {_side(f['jax'])} | "
                    f"{_side(f['torch'])} | {_ratio(f['torch_over_jax'])} | | "
                    f"{f['jax_compile_s']:.0f} s | {_validity(f)} |")  # fmt: skip
    loops = diag.get("decoder_loops")
    if loops:
        per = loops["per_step_s"]
        rows.append(f"| diagnosis: decoder, 25 steps as one `fori_loop` / as a Python loop of "
                    f"jitted steps | {_side(loops['fori_loop'])} / "
                    f"{_side(loops['python_loop'])}; per step {_s(per['fori_loop'])} / "
                    f"{_s(per['python_loop'])} | | | | "
                    f"{loops['jax_compile_s']['fori_loop']:.0f} s / "
                    f"{loops['jax_compile_s']['single_step']:.0f} s | "
                    f"{_validity(loops)} |")  # fmt: skip
    conv = diag.get("convolutions")
    if conv:
        for c in conv["shapes"]:
            b, h, w, ch = c["shape_nhwc"]
            rows.append(f"| diagnosis: 3x3 conv [{b}, {h}, {w}, {ch}], CPU use jax / torch "
                        f"{c['jax']['cpu_util']} / {c['torch']['cpu_util']} cores | "
                        f"{_s(c['jax']['median_s'], 'ms')} | {_s(c['torch']['median_s'], 'ms')}"
                        f" | {_ratio(c['torch_over_jax'])} | | | {_validity(conv)} |")  # fmt: skip
    kernels = diag.get("train_kernels")
    if kernels:
        for r in kernels["rows"]:
            shape = ", ".join(map(str, r["shape"]))
            what = "[B, H, W, C]" if r["kernel"].startswith("conv") else "[B, Lq, Lk, heads, D]"
            rows.append(f"| diagnosis: {r['kernel']} {what} = [{shape}], CPU use jax / torch "
                        f"{r['jax']['cpu_util']} / {r['torch']['cpu_util']} cores | "
                        f"{_s(r['jax']['median_s'], 'ms')} | "
                        f"{_s(r['torch']['median_s'], 'ms')} | {_ratio(r['torch_over_jax'])} | "
                        f"| | {_validity(kernels)} |")  # fmt: skip
    m = d.get("machine", {})
    head = (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores; jax {m.get('jax')}, torch "
            f"{m.get('torch')}, diffusers {m.get('diffusers')}; float32; repeats "
            f"{d.get('repeats')}; `benchmarks/results/karlo_small_cpu.json`")  # fmt: skip
    return head + "\n\n" + "\n".join(rows)


def samplers(d: dict) -> str:
    rows = ["| sampler | batch | unclip-jax median (min) | diffusers + torch median (min) | "
            "torch / jax | compile (jax) | max rel. diff | valid, load before |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    names = {"ddim50": "DDIM, 50 steps", "dpm20": "DPM-Solver++(2M), 20 steps"}
    for r in d["results"]:
        if "jax" not in r:  # an old-format record
            continue
        rows.append(f"| {names.get(r['sampler'], r['sampler'])} | {r['batch']} | "
                    f"{_side(r['jax'])} | {_side(r['torch'])} | {_ratio(r['torch_over_jax'])} | "
                    f"{r['jax_compile_s']:.1f} s | {r['max_rel_diff']:.0e} | "
                    f"{_validity(r)} |")  # fmt: skip
    return "\n".join(rows)


def scale_plan(d: dict) -> str:
    md = (RESULTS / "scale_plan.md").read_text()
    body = md.split("\n## Method and limits")[0].split("\n", 2)[2].strip()  # drop the title
    return body + "\n\nMethod and limits: `benchmarks/results/scale_plan.md`."


def compile_cache(d: dict) -> str:
    rows = ["| process | programs | cache hits | exported programs read / written | compile s "
            "(trace + lower + XLA or cache read) | trace s | XLA / cache read s | wall s | "
            "load before |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in d["processes"]:
        c = p["compile"]
        load = p.get("gate", {}).get("load_1min_before")
        rows.append(
            f"| {p['process']} | {c['compilations']} | {c['cache_hits']} | "
            f"{c.get('exports_read', 0)} / {c.get('exports_written', 0)} | "
            f"{p['compile_s']:.1f} | {c['trace_s']:.2f} | {c['backend_s']:.1f} | "
            f"{p['wall_s']:.0f} | {'' if load is None else load} |"
        )
    return (
        "\n".join(rows) + f"\n\nSecond process / first: "
        f"{d['second_over_first_compile']:.3f} of the compile time "
        f"({d['second_over_first_backend']:.3f} of XLA's part; goal < 0.10"
        f"{', met' if d.get('met') else ', not met'}); {d['decoder_steps']} decoder steps; "
        f"cache {d['cache_bytes'] / 1e6:.1f} MB; {d.get('date', '')}."
    )


def profile(d: dict) -> str:
    kinds = d["kinds"]
    rows = ["| kind | " + " | ".join(f"{part.replace('_', ' ')}: jax / torch s"
                                     for part in d["parts"]) + " |",
            "|---|" + "---|" * len(d["parts"])]  # fmt: skip
    for kind in kinds + ["total (op time)", "wall per call"]:
        cells = []
        for part in d["parts"].values():
            j, t = part["jax"], part["torch"]
            if kind == "total (op time)":
                a, b = j["op_s_per_call"], t["op_s_per_call"]
            elif kind == "wall per call":
                a, b = j["wall_s_per_call"], t["wall_s_per_call"]
            else:
                a, b = j["by_kind"].get(kind, 0.0), t["by_kind"].get(kind, 0.0)
            cells.append(f"{a:.2f} / {b:.2f}")
        if any(c != "0.00 / 0.00" for c in cells):
            rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    gates = ", ".join(f"{k}: {_validity(v)}" for k, v in d["parts"].items())
    return (
        "\n".join(rows) + f"\n\n{d['calls']} profiled calls per side; valid, load before: "
        f"{gates}; `benchmarks/results/profile_karlo_small_cpu.json` (also the 15 slowest XLA "
        "operations with the JAX operation each came from)."
    )


def karlo_memory(d: dict) -> str:
    runs = [r for r in d["runs"] if r["compute_dtype"] == "float32"]
    batches = sorted({r["batch"] for r in runs})
    stages = list(dict.fromkeys(r["stage"] for r in runs))
    at = {(r["stage"], r["batch"]): r for r in runs}
    head = " | ".join(f"peak at batch {b} (GB)" for b in batches)
    rows = [f"| stage | parameters | weights (GB) | {head} |",
            "|---|---|---|" + "---|" * len(batches)]  # fmt: skip
    for stage in stages:
        first = at[(stage, batches[0])]
        peaks = " | ".join(f"{at[(stage, b)]['peak_bytes'] / 1e9:.2f}" for b in batches)
        rows.append(f"| {stage.replace('_', '-')} | {first['params'] / 1e6:,.0f} M | "
                    f"{first['param_bytes'] / 1e9:.2f} | {peaks} |")  # fmt: skip
    weights = sum(at[(s, batches[0])]["param_bytes"] for s in stages)
    whole = []
    for b in batches:
        extra = max(at[(s, b)]["peak_bytes"] - at[(s, b)]["param_bytes"] for s in stages)
        whole.append(f"{(weights + extra) / 1e9:.1f} GB at batch {b}")
    return (
        "\n".join(rows) + f"\n\nThe whole pipeline holds every stage's weights "
        f"({weights / 1e9:.1f} GB) and runs one stage at a time: {', '.join(whole)}. "
        f"XLA's memory analysis of the compiled samplers (CPU compiler, float32, jax "
        f"{d['jax']}, {d['date']}); `benchmarks/results/karlo_memory.json`."
    )


TABLES = {"karlo_memory": ("karlo_memory.json", karlo_memory),
          "karlo_small": ("karlo_small_cpu.json", karlo_small),
          "profile": ("profile_karlo_small_cpu.json", profile),
          "samplers": ("samplers_cpu.json", samplers),
          "compile_cache": ("compile_cache_cpu.json", compile_cache),
          "scale_plan": ("scale_plan.json", scale_plan)}  # fmt: skip


def rewrite(readme: str) -> tuple[str, list[str]]:
    done = []
    for name, (file, render) in TABLES.items():
        path = RESULTS / file
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.S)
        if not path.exists() or not pattern.search(readme):
            continue
        table = render(json.loads(path.read_text()))
        readme = pattern.sub(lambda m, t=table: m.group(1) + t + m.group(2), readme)
        done.append(name)
    return readme, done


DOCUMENTS = ("README.md", "docs/results.md")


def main() -> int:
    for name in DOCUMENTS:
        path = ROOT / name
        text, done = rewrite(path.read_text())
        path.write_text(text)
        print(f"{name}: rewrote {', '.join(done) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
