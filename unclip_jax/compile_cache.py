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

import hashlib
import logging
import os
import pathlib

import jax
import jaxlib

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
_stats = dict.fromkeys(["compilations", "cache_hits", "exports_read", "exports_written"], 0) | (
    dict.fromkeys(_DURATIONS.values(), 0.0)
)


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
    `slowest`: the five functions that cost the most of these seconds, [name, seconds];
    `exports_read` / `exports_written`: traced programs read from / written to `<cache>/exports`
    (`Exported`)."""
    slowest = sorted(_by_function.items(), key=lambda item: -item[1])[:5]
    return dict(_stats) | {"slowest": [[name, round(sec, 3)] for name, sec in slowest]}


# ------------------------------------------------------------------------- exported programs
# The persistent cache skips XLA's compile, not JAX's tracing: a later process still traces the
# Flax networks of every sampler (seconds for a UNet loop; results/compile_cache_cpu.json in
# benchmarks/) before it can look the executable up. `Exported` keeps the traced program itself
# (jax.export's serialized StableHLO) in `<cache>/exports`, so that a later process reads it and
# goes straight to the (cached) compile.
EXPORTS = "exports"
_source_digest: str | None = None
_warned: set[str] = set()


def _package_digest() -> str:
    """A digest of unclip_jax's own source files: an exported program is a pure function of them
    (and of the key and the arguments), so any edit to the package retires every export."""
    global _source_digest
    if _source_digest is None:
        h = hashlib.sha256()
        root = pathlib.Path(__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        _source_digest = h.hexdigest()
    return _source_digest


def _leaf_signature(leaf) -> str:
    aval = jax.typeof(leaf)
    sharding = getattr(leaf, "sharding", None)
    return f"{aval.str_short()}:{aval.weak_type}:{sharding!r}" if sharding else (
        f"{aval.str_short()}:{aval.weak_type}")  # fmt: skip


def _warn_once(what: str, err: BaseException) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("%s: %s: %s", what, type(err).__name__, err)


class Exported:
    """`jax.jit(fn)`, whose traced program is also kept on disk beside the persistent compilation
    cache and read back by later processes instead of tracing `fn` again.

    fn(*args) takes pytrees of arrays (None and Python scalars allowed) positionally; everything
    else it depends on is closed over and must be named by `key`. A program is identified by
    `key`, the arguments' tree structure, shapes, dtypes and shardings, the jax/jaxlib versions,
    the backend and its device count and kind, and the source of unclip_jax itself, so an export
    is never served to a different program. Without a cache folder (compile_cache off) this is
    plain `jax.jit(fn)` (also for a remote cache, e.g. gs://, which JAX allows: exports are read
    from local disk only); an export that cannot be made or read is logged once and falls back
    to it.
    `traced_from_disk` counts the calls served by a program read from disk.
    """

    def __init__(self, fn, key: str):
        self.key = key
        self._jitted = jax.jit(fn)
        self._calls: dict[str, object] = {}
        self.traced_from_disk = 0

    def lower(self, *args):
        """`jax.jit(fn).lower(*args)`: ahead-of-time lowering (e.g. on ShapeDtypeStructs, for
        memory analysis), never through an export."""
        return self._jitted.lower(*args)

    def __call__(self, *args):
        folder = jax.config.jax_compilation_cache_dir
        if not folder or "://" in folder:  # off, or a remote cache: exports stay local only
            return self._jitted(*args)
        leaves, treedef = jax.tree.flatten(args)
        device = jax.devices()[0]
        parts = [self.key, str(treedef), *map(_leaf_signature, leaves), jax.__version__,
                 jaxlib.__version__, device.platform, str(jax.device_count()),
                 device.device_kind, _package_digest()]  # fmt: skip
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
        call = self._calls.get(digest)
        if call is None:
            call = self._calls[digest] = self._load_or_export(
                pathlib.Path(folder) / EXPORTS / f"{digest}.jaxexport", args
            )
        return call(*args)

    def _load_or_export(self, path: pathlib.Path, args):
        from jax import export

        if path.is_file():
            try:
                exported = export.deserialize(bytearray(path.read_bytes()))
                _stats["exports_read"] += 1
                self.traced_from_disk += 1
                return jax.jit(exported.call)
            except Exception as err:  # noqa: BLE001 (a damaged or foreign file: export again)
                _warn_once(f"exported program {path} unreadable, tracing again", err)
        try:
            exported = export.export(self._jitted)(*args)
            data = exported.serialize()
        except Exception as err:  # noqa: BLE001 (e.g. flatbuffers missing, an unexportable op)
            _warn_once(f"not exporting {self.key.split('/')[0]} programs", err)
            return self._jitted
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # whole or absent for a concurrent reader
            _stats["exports_written"] += 1
        except OSError as err:
            _warn_once(f"cannot write exported programs to {path.parent}", err)
        return jax.jit(exported.call)
