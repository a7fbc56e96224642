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
