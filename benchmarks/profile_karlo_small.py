"""Where the time goes: the bench-karlo-small decoder forward (batch 8) and train step (batch 8),
profiled on both sides and summed by kind of operation.

    .venv/bin/python benchmarks/profile_karlo_small.py [--calls 3]

The same networks, inputs and steps as benchmarks/bench_karlo_small.py (its `decoder_forward_calls`
and `training_calls`). Ours: a jax.profiler trace (perfetto JSON) of `--calls` calls of the
compiled program; every trace event named after an instruction of the optimised HLO module is an
XLA operation, its self time (its span minus the operations nested in it on the same thread, so
a while loop counts only its own overhead) goes to a kind from its opcode, and a fusion counts as
the heaviest operation it fuses (convolution > dot > reduction > transcendental > elementwise).
Theirs: torch.profiler's self CPU time per aten operation, mapped to the same kinds by name
(scaled_dot_product_attention's fused kernel is its own kind: XLA has no single attention op, its
attention is dots, a reduction and elementwise fusions). Times are per call, summed over threads
on our side (XLA may run independent operations concurrently), so they add up to CPU-busy time
rather than wall time; the wall time per call is recorded beside them. Profiling adds overhead:
the shares are the result, the absolute times are not a benchmark (bench_karlo_small.py is).

Writes benchmarks/results/profile_karlo_small_cpu.json (report.py renders it into docs/results.md).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import tempfile
import time

import harness
import jax

OUT = pathlib.Path(__file__).parent / "results" / "profile_karlo_small_cpu.json"

KINDS = ("convolution", "matmul", "attention (fused)", "reduction", "transcendental",
         "elementwise", "copy / layout", "optimizer", "other")  # fmt: skip
_PRIORITY = {"convolution": 0, "dot": 1, "reduce": 2, "reduce-window": 2, "transcendental": 3}
_TRANSCENDENTAL = {"exponential", "tanh", "log", "rsqrt", "sqrt", "logistic", "power", "erf",
                   "exponential-minus-one", "log-plus-one", "sine", "cosine"}  # fmt: skip
_LAYOUT = {"copy", "transpose", "reverse", "concatenate", "pad", "slice", "dynamic-slice",
           "bitcast", "dynamic-update-slice", "reshape", "broadcast", "gather",
           "scatter"}  # fmt: skip
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind for every instruction of an optimised HLO module's text."""
    computations: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    current = None
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            computations[current].append(m.groups())
            continue
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)

    def opcode_kind(opcode: str) -> str:
        if opcode in ("convolution", "dot", "reduce", "reduce-window"):
            return {"dot": "dot"}.get(opcode, "reduce" if opcode.startswith("reduce") else opcode)
        return "transcendental" if opcode in _TRANSCENDENTAL else "elementwise"

    def heaviest(computation: str, seen=()) -> str:
        best = "elementwise"
        for _, opcode, rest in computations.get(computation, []):
            kind = opcode_kind(opcode)
            called = _CALLS.search(rest)
            if opcode == "fusion" and called and called.group(1) not in seen:
                kind = heaviest(called.group(1), seen + (computation,))
            if _PRIORITY.get(kind, 9) < _PRIORITY.get(best, 9):
                best = kind
        return best

    names = {"convolution": "convolution", "dot": "matmul", "reduce": "reduction",
             "transcendental": "transcendental", "elementwise": "elementwise"}  # fmt: skip
    out = {}
    for instructions in computations.values():
        for name, opcode, rest in instructions:
            if opcode in ("parameter", "constant", "get-tuple-element", "tuple"):
                continue
            if opcode == "fusion":
                called = _CALLS.search(rest)
                kind = names[heaviest(called.group(1))] if called else "elementwise"
                # A fusion that only moves data is a layout change.
                if called and all(op in _LAYOUT | {"parameter", "constant", "tuple"}
                                  for _, op, _ in computations[called.group(1)]):  # fmt: skip
                    kind = "copy / layout"
            elif opcode in _LAYOUT:
                kind = "copy / layout"
            elif opcode in ("while", "conditional", "call", "custom-call", "all-reduce"):
                kind = "other"
            else:
                kind = names[opcode_kind(opcode)]
            out[name] = kind
    return out


def hlo_origins(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the JAX operation it came from (its metadata's op_name)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        origin = re.search(r'op_name="([^"]*)"', line)
        if m and origin:
            out[m.group(1)] = origin.group(1)[-160:]
    return out


def self_times(events: list[dict], known: dict[str, str], *, by: str = "kind") -> dict:
    """Seconds of self time per kind (by="kind") or per instruction (by="name") over the trace's
    complete events named in `known`."""
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in known:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    totals = collections.Counter()
    for spans in by_thread.values():
        spans.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[list] = []  # [end, name, self_us]

        def close(entry):
            totals[known[entry[1]] if by == "kind" else entry[1]] += entry[2] / 1e6

        for e in spans:
            start, dur = e["ts"], e.get("dur", 0)
            while stack and stack[-1][0] <= start:
                close(stack.pop())
            if stack:
                stack[-1][2] -= dur  # the parent's self time excludes this child
            stack.append([start + dur, e["name"], dur])
        while stack:
            close(stack.pop())
    return dict(totals)


def profile_jax(call, compiled, calls: int, top: int = 15) -> dict:
    known = hlo_kinds(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                call()
        wall = (time.perf_counter() - start) / calls
        trace = next(pathlib.Path(tmp).rglob("perfetto_trace.json.gz"))
        data = json.loads(gzip.decompress(trace.read_bytes()))
    events = data["traceEvents"] if isinstance(data, dict) else data
    kinds = {k: v / calls for k, v in self_times(events, known).items()}
    origins = hlo_origins(compiled.as_text())
    ops = sorted(self_times(events, known, by="name").items(), key=lambda kv: -kv[1])[:top]
    top_ops = [{"instruction": name, "kind": known[name], "s_per_call": sec / calls,
                "jax_op": origins.get(name, "")} for name, sec in ops]  # fmt: skip
    return {"wall_s_per_call": wall, "op_s_per_call": sum(kinds.values()), "by_kind": kinds,
            "top_ops": top_ops}  # fmt: skip


def torch_kind(name: str) -> str:
    n = name.lower()
    if "scaled_dot_product" in n or "flash_attention" in n or "efficient_attention" in n:
        return "attention (fused)"
    if "conv" in n:
        return "convolution"
    if re.search(r"\b(aten::)?(mm|addmm|bmm|baddbmm|matmul|linear|addmv|mv|dot)\b", n):
        return "matmul"
    if "_foreach" in n or "adamw" in n or "clip_grad" in n:
        return "optimizer"
    if any(k in n for k in ("norm", "sum", "mean", "max", "softmax", "var", "std")):
        return "reduction"
    if any(k in n for k in ("exp", "tanh", "log", "sqrt", "sigmoid", "silu", "erf", "pow")):
        return "transcendental"
    if any(k in n for k in ("copy", "contiguous", "clone", "permute", "transpose", "cat", "pad",
                            "index", "slice", "select", "expand", "view", "reshape", "empty",
                            "zero", "fill", "stack", "repeat", "narrow", "unsqueeze", "as_strided",
                            "upsample", "flip", "where", "to", "_to_copy")):  # fmt: skip
        return "copy / layout"
    if n.startswith("aten::") or n.startswith("autograd::") or "backward" in n:
        return "elementwise"
    return "other"


def profile_torch(call, calls: int) -> dict:
    from torch.profiler import ProfilerActivity, profile  # torch only where a profile runs

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    wall = (time.perf_counter() - start) / calls
    kinds = collections.Counter()
    for avg in prof.key_averages():
        kinds[torch_kind(avg.key)] += avg.self_cpu_time_total / 1e6 / calls
    return {"wall_s_per_call": wall, "op_s_per_call": sum(kinds.values()), "by_kind": dict(kinds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3, help="profiled calls per side and part")
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args()
    import bench_karlo_small as bench  # torch + diffusers: imported where they are needed
    import torch

    torch.set_grad_enabled(True)
    pipe, ours, _ = bench.build_both_sides()
    text, empty = ours.text(bench.PROMPTS)
    result = {"what": __doc__.split("\n\n")[0], "machine": bench.machine(), "calls": args.calls,
              "kinds": list(KINDS), "parts": {}}  # fmt: skip
    parts = {"decoder_forward": lambda: bench.decoder_forward_calls(ours, pipe, text, empty),
             "train_step": lambda: bench.training_calls(ours, pipe, text, empty)}  # fmt: skip
    for part, build in parts.items():
        calls = build()
        gate = harness.quiet_gate(f"profile {part}")
        entry = {"gate": gate, "valid": gate["quiet"],
                 "jax": profile_jax(calls["jax"], calls["compiled"], args.calls),
                 "torch": profile_torch(calls["torch"], args.calls)}  # fmt: skip
        if "done" in calls:
            calls["done"]()
        result["parts"][part] = entry
        for side in ("jax", "torch"):
            kinds = entry[side]["by_kind"]
            print(part, side, f"wall {entry[side]['wall_s_per_call']:.2f} s/call",
                  {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                  flush=True)  # fmt: skip
    result["load_1min_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
