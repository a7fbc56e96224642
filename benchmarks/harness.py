"""Timing that can be believed on a shared 2-core machine (issue 20, section 1).

- `quiet_gate()` before every timed section: waits (up to a limit) for the 1-minute load
  average to fall to `LOAD_LIMIT` and records it; a section that starts above it is invalid.
- `interleave()` runs the sides' repeats in turn (ours, theirs, ours, theirs, ...) and, for every
  repeat, measures how much CPU other processes took meanwhile (the machine's busy time from
  /proc/stat minus this process's CPU time). A repeat during which others used more than
  `FOREIGN_LIMIT` of a core is thrown away, never averaged in.
- Each side reports min and median of its valid repeats and its CPU utilisation (this process's
  CPU seconds per wall second: ~1 means one core busy, ~2 both).
"""

from __future__ import annotations

import os
import statistics
import time

LOAD_LIMIT = 0.5  # 1-minute load average allowed at the start of a timed section (2 cores)
FOREIGN_LIMIT = 0.1  # cores other processes may use during a repeat
_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; not idle, not iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICK


def quiet_gate(name: str, *, limit: float = LOAD_LIMIT, wait_s: float = 420.0) -> dict:
    """Wait until the 1-minute load average is <= limit (at most wait_s); returns the record."""
    start = time.perf_counter()
    load = os.getloadavg()[0]
    while load > limit and time.perf_counter() - start < wait_s:
        time.sleep(5.0)
        load = os.getloadavg()[0]
    waited = round(time.perf_counter() - start, 1)
    record = {"section": name, "load_1min_before": round(load, 2), "waited_s": waited,
              "quiet": load <= limit}  # fmt: skip
    print(f"[{name}] load {load:.2f} after {record['waited_s']:.0f} s wait"
          + ("" if record["quiet"] else f": ABOVE {limit}, section marked invalid"),
          flush=True)  # fmt: skip
    return record


def timed(fn):
    """(fn's result, {"s", "cpu_util", "foreign_cores"}) for one call."""
    busy0, own0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - wall0
    own, busy = time.process_time() - own0, machine_busy_s() - busy0
    return out, {"s": wall, "cpu_util": own / wall, "foreign_cores": max(busy - own, 0.0) / wall}


def summarise(runs: list[dict]) -> dict:
    valid = [r["s"] for r in runs if r["foreign_cores"] <= FOREIGN_LIMIT]
    return {
        "runs_s": [round(r["s"], 4) for r in runs],
        "foreign_cores": [round(r["foreign_cores"], 3) for r in runs],
        "valid_runs": len(valid),
        "min_s": min(valid) if valid else None,
        "median_s": statistics.median(valid) if valid else None,
        "cpu_util": round(statistics.median(r["cpu_util"] for r in runs), 2),
    }


def interleave(sides: dict, repeats: int) -> dict:
    """{side: summary} from `repeats` rounds, each calling every side once, in order."""
    runs = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            runs[name].append(timed(fn)[1])
    return {name: summarise(r) for name, r in runs.items()}


def ratio(theirs: dict, ours: dict) -> float | None:
    """Median seconds of theirs over ours (> 1: ours is faster)."""
    if not theirs.get("median_s") or not ours.get("median_s"):
        return None
    return theirs["median_s"] / ours["median_s"]


def section_valid(gate: dict, *summaries: dict, min_runs: int = 2) -> bool:
    return gate["quiet"] and all(s["valid_runs"] >= min_runs for s in summaries)
