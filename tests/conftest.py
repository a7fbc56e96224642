"""Test setup: 8 fake CPU devices, forced before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU optimisation passes dominate compile time for the tests' tiny models (a tiny GLIDE
# init compiles in ~5 s instead of ~20 s); the tests check numbers, not speed.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

# Fail loudly if jax was imported before this file could set the flag.
assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"
