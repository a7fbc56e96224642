"""End-to-end demonstrations run by `unclip-jax demo` / `make demo`."""
