"""The benchmark plumbing (no timing asserted): harness.py drops repeats taken under foreign load
and gates sections on the load average; report.py rewrites only the README's marked tables."""

import importlib.util
import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    return _load("harness")


@pytest.fixture(scope="module")
def report():
    return _load("report")


def test_repeats_under_foreign_load_are_dropped(harness):
    runs = [{"s": 1.0, "cpu_util": 1.9, "foreign_cores": 0.0},
            {"s": 9.0, "cpu_util": 1.0, "foreign_cores": 0.8},  # someone else ran meanwhile
            {"s": 3.0, "cpu_util": 1.9, "foreign_cores": 0.05}]  # fmt: skip
    s = harness.summarise(runs)
    assert s["valid_runs"] == 2 and s["min_s"] == 1.0 and s["median_s"] == 2.0
    assert s["runs_s"] == [1.0, 9.0, 3.0]  # every run is kept in the record, flagged
    ours, theirs = {"median_s": 2.0}, {"median_s": 3.0}
    assert harness.ratio(theirs, ours) == 1.5 and harness.ratio({"median_s": None}, ours) is None
    gate = {"quiet": True}
    assert harness.section_valid(gate, s) and not harness.section_valid({"quiet": False}, s)
    assert not harness.section_valid(gate, harness.summarise(runs[1:2]))


def test_gate_and_probe(harness):
    gate = harness.quiet_gate("test", limit=1e9, wait_s=0)
    assert gate["quiet"] and gate["waited_s"] < 5
    assert not harness.quiet_gate("test", limit=-1.0, wait_s=0)["quiet"]
    out, probe = harness.timed(lambda: sum(range(100000)))
    assert out == sum(range(100000)) and probe["s"] > 0 and probe["foreign_cores"] >= 0
    assert harness.machine_busy_s() > 0


def test_report_rewrites_only_marked_tables(report, tmp_path, monkeypatch):
    side = {"median_s": 2.0, "min_s": 1.5, "cpu_util": 1.9, "valid_runs": 3}
    record = {"sampler": "ddim50", "batch": 256, "gate": {"load_1min_before": 0.3}, "valid": True,
              "jax": side, "torch": side | {"median_s": 3.0}, "torch_over_jax": 1.5,
              "jax_compile_s": 1.2, "max_rel_diff": 2e-5}  # fmt: skip
    (tmp_path / "samplers_cpu.json").write_text(json.dumps({"results": [record]}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    readme = "intro\n<!-- bench:samplers -->\nold table\n<!-- /bench:samplers -->\nend\n"
    text, done = report.rewrite(readme)
    assert done == ["samplers"]
    assert text.startswith("intro\n<!-- bench:samplers -->\n| sampler |") and "old" not in text
    assert "| DDIM, 50 steps | 256 | 2.00 s (1.50 s) | 3.00 s (1.50 s) | 1.50 |" in text
    assert "yes, load 0.3" in text and text.endswith("<!-- /bench:samplers -->\nend\n")
    # Tables without JSON, and JSON without markers, are left alone.
    assert report.rewrite("no markers\n") == ("no markers\n", [])


def test_profile_attributes_self_time_and_fusions_by_kind():
    _load("harness")  # imported by the profiler as a sibling module
    profile = _load("profile_karlo_small")
    # Nesting on one thread: a loop (other) holding a convolution and a fusion; a second thread.
    known = {"while.1": "other", "conv.2": "convolution", "fusion.3": "elementwise"}
    events = [{"ph": "X", "name": "while.1", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
              {"ph": "X", "name": "conv.2", "ts": 10, "dur": 50, "pid": 1, "tid": 1},
              {"ph": "X", "name": "fusion.3", "ts": 70, "dur": 20, "pid": 1, "tid": 1},
              {"ph": "X", "name": "conv.2", "ts": 0, "dur": 30, "pid": 1, "tid": 2},
              {"ph": "X", "name": "$python frame", "ts": 0, "dur": 999, "pid": 1, "tid": 1},
              {"ph": "i", "name": "conv.2", "ts": 5, "pid": 1, "tid": 1}]  # fmt: skip
    totals = profile.self_times(events, known)
    assert totals == pytest.approx({"other": 30e-6, "convolution": 80e-6, "elementwise": 20e-6})

    import jax
    import jax.numpy as jnp

    def f(x, w, m):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        return jnp.sum(jnp.tanh(y.reshape(2, -1) @ m))

    args = (jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), jnp.ones((256, 3)))
    kinds = profile.hlo_kinds(jax.jit(f).lower(*args).compile().as_text())
    assert {"convolution", "matmul", "transcendental"} <= set(kinds.values())
    assert set(kinds.values()) <= set(profile.KINDS)
