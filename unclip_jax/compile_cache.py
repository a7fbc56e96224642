"""JAX's persistent compilation cache, on by default for the CLI and the pipelines.

A 25-step sampling loop of a 64 px decoder takes minutes to compile on a CPU and tens of seconds
on an accelerator; with the cache, only the first process on a machine pays it and every later
`unclip-jax sample` (or pipeline in a notebook) loads the executable from disk.

Where the cache lives, first match wins:

1. `enable(path)` with an explicit folder (the CLI's `--compilation-cache DIR`), or `enable(False)`
   / `--compilation-cache off` to leave it off;
2. the environment variable `UNCLIP_JAX_COMPILATION_CACHE`: a folder, or `off` (also `0`,
   `false`, `none`, empty);
3. a cache the user configured in JAX already (`jax.config.update("jax_compilation_cache_dir",
   ...)` or `JAX_COMPILATION_CACHE_DIR`): kept as it is;
4. `$XDG_CACHE_HOME/unclip-jax/jax`, else `~/.cache/unclip-jax/jax`.

Executables are keyed by JAX on the program, the compile options, the backend and the jax/jaxlib
versions, so a cache shared across versions or machines never serves a stale program. `enable`
also lowers JAX's `jax_persistent_cache_min_compile_time_secs` from its default 1 s to 0 (unless
the user set it, in JAX's config or `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`): a sampling
run is dozens of programs under a second each (stage setup, guidance, decoding), which together
cost more than the one big loop (benchmarks/results/compile_cache_cpu.json), and a cache read of
a small program takes milliseconds. As JAX warns, the cache is trusted code: do not point it
at a folder others can write. A cache that cannot be written (read-only disk) costs a warning
from JAX and nothing else; sampling goes on.
"""

from __future__ import annotations

import logging
import os
import pathlib

import jax

log = logging.getLogger(__name__)

ENV = "UNCLIP_JAX_COMPILATION_CACHE"
_OFF = {"", "0", "off", "false", "no", "none"}
_MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_JAX_MIN_COMPILE_DEFAULT = 1.0
_ours: str | None = None  # the folder this module set, so that enable(False) can undo it


def default_dir() -> pathlib.Path:
    """`$XDG_CACHE_HOME/unclip-jax/jax`, or `~/.cache/unclip-jax/jax`."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "unclip-jax" / "jax"


def resolve(path: str | os.PathLike | bool | None = None) -> pathlib.Path | None:
    """The folder the cache would use (None: off), by the order in this module's docstring."""
    if path is False:
        return None
    if path is not None and path is not True:
        return None if str(path).strip().lower() in _OFF else pathlib.Path(path).expanduser()
    if ENV in os.environ:
        value = os.environ[ENV].strip()
        return None if value.lower() in _OFF else pathlib.Path(value).expanduser()
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return pathlib.Path(configured)
    return default_dir()


def enable(path: str | os.PathLike | bool | None = None) -> pathlib.Path | None:
    """Point JAX's persistent compilation cache at `resolve(path)`; returns the folder (None:
    left off). Idempotent; call it before the first compilation that should be cached."""
    global _ours
    folder = resolve(path)
    if folder is None:
        if _ours is not None and jax.config.jax_compilation_cache_dir == _ours:
            jax.config.update("jax_compilation_cache_dir", None)  # undo our own earlier enable
        _ours = None
        return None
    if str(folder) == jax.config.jax_compilation_cache_dir:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only home: compile every time, say so once
        log.warning("compilation cache off: cannot create %s (%s)", folder, err)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if (jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_MIN_COMPILE_DEFAULT
            and _MIN_COMPILE_ENV not in os.environ):  # fmt: skip
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _ours = str(folder)
    log.info("persistent compilation cache: %s", folder)
    return folder


# ---------------------------------------------------------------------- counting compilations
_DURATIONS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    # XLA compilation, or the persistent cache's read of it on a hit.
    "/jax/core/compile/backend_compile_duration": "backend_s",
}
_COUNTS = {
    "/jax/core/compile/backend_compile_duration": "compilations",
    "/jax/compilation_cache/cache_hits": "cache_hits",
}
_stats = dict.fromkeys(["compilations", "cache_hits"], 0) | dict.fromkeys(_DURATIONS.values(), 0.0)


_by_function: dict[str, float] = {}  # trace + lowering + backend seconds per jitted function


def _on_duration(event: str, seconds: float, fun_name: str | None = None, **_) -> None:
    if event in _DURATIONS:
        _stats[_DURATIONS[event]] += seconds
        name = fun_name or "?"
        _by_function[name] = _by_function.get(name, 0.0) + seconds
    if event in _COUNTS:
        _stats[_COUNTS[event]] += 1


def _on_event(event: str, **_) -> None:
    if event in _COUNTS:
        _stats[_COUNTS[event]] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def stats() -> dict:
    """Since this process started: `compilations` (programs handed to XLA's backend, persistent
    cache hits included), `cache_hits`, and seconds spent tracing (`trace_s`), lowering to MLIR
    (`lower_s`) and in the backend (`backend_s`: XLA's compile, or the cache's read on a hit);
    `slowest`: the five functions that cost the most of these seconds, [name, seconds]."""
    slowest = sorted(_by_function.items(), key=lambda item: -item[1])[:5]
    return dict(_stats) | {"slowest": [[name, round(sec, 3)] for name, sec in slowest]}
