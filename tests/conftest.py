"""Test setup: 8 fake CPU devices, forced before anything imports jax."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU optimisation passes dominate compile time for the tests' tiny models (a tiny GLIDE
# init compiles in ~5 s instead of ~20 s); the tests check numbers, not speed.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# unclip-jax's own cache (~/.cache/unclip-jax) stays off: nothing is written outside the run's
# temporary folders; tests/test_compile_cache.py turns it on in its own processes.
os.environ["UNCLIP_JAX_COMPILATION_CACHE"] = "off"
# One JAX persistent compilation cache for the whole pytest run instead, in a temporary folder
# that the controlling process creates (xdist workers and the subprocesses tests start inherit
# it) and removes at the end: a program that a run compiles twice, e.g. the train step of a
# killed process and of its resume, or the same tiny model in two test files, compiles once.
if "UNCLIP_JAX_TEST_CACHE" not in os.environ:
    os.environ["UNCLIP_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="unclip-jax-tests-")
    _OWN_TEST_CACHE = True
else:
    _OWN_TEST_CACHE = False
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["UNCLIP_JAX_TEST_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

# Fail loudly if jax was imported before this file could set the flag.
assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"

# orbax writes a replicated array by slicing it per replica, one tiny compilation per slice:
# about 6 s per save of a tiny CLIP on 8 fake devices, 0.4 s without (the bytes are the same).
# Tests only; real runs keep orbax's default.
import orbax.checkpoint as ocp  # noqa: E402

ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)

# The longest files first: `make test` runs two xdist workers that take whole files in collection
# order (`--no-loadscope-reorder`: xdist would otherwise order files by their number of tests),
# so a long file collected last would run alone at the end (measured: the one-test mini demo,
# ~5 minutes, as the tail of a 13-minute run).
LONGEST_FIRST = (
    "test_demo.py",
    "test_train_kinds.py",
    "test_gcs.py",
    "test_kind_runs.py",
    "test_glide_kinds.py",
    "test_glide_training.py",
    "test_train_loop.py",
    "test_clip_training.py",
    "test_distributed.py",
    "test_unclip_stack.py",
    "test_ablate.py",
    "test_unclip_import.py",
    "test_cli_convert_inpaint.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def pytest_sessionfinish(session, exitstatus):
    if _OWN_TEST_CACHE:  # the controlling process (or a run without xdist) made the folder
        shutil.rmtree(os.environ["UNCLIP_JAX_TEST_CACHE"], ignore_errors=True)
