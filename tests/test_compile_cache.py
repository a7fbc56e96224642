"""Compilations counted, not timed: a sampling pipeline compiles once per batch shape (guidance
sweeps, new prompts and new seeds reuse it), and a second process loads the first's programs from
the persistent compilation cache (unclip_jax/compile_cache.py)."""

import json
import os
import pathlib
import subprocess
import sys

import jax

from unclip_jax import compile_cache
from unclip_jax.pipelines.unclip import pipeline_from_diffusers

KARLO = pathlib.Path(__file__).parent / "fixtures" / "karlo_tiny"

# One unCLIP sample (prior, decoder, super-res) of karlo_tiny in a fresh process; prints the
# process's compile statistics and where the cache was.
CHILD = f"""
import json, jax
from unclip_jax import compile_cache
from unclip_jax.pipelines.unclip import pipeline_from_diffusers
pipe = pipeline_from_diffusers({str(KARLO)!r})
out = pipe(["a red circle", "a blue square"], jax.random.key(0), prior_guidance=4.0,
           decoder_guidance=[1.0, 8.0], decoder_respacing="3")
jax.block_until_ready(out["images"])
print(json.dumps(compile_cache.stats() | {{"dir": jax.config.jax_compilation_cache_dir}}))
"""


def test_guidance_sweeps_new_prompts_and_seeds_never_compile():
    pipe = pipeline_from_diffusers(KARLO)

    def sample(prompts, seed, prior_guidance, decoder_guidance):
        out = pipe(prompts, jax.random.key(seed), prior_guidance=prior_guidance,
                   decoder_guidance=decoder_guidance, decoder_respacing="3")  # fmt: skip
        return jax.block_until_ready(out["images"])

    sample(["a red circle", "a small blue square"], 0, 4.0, [1.0, 8.0])
    first = compile_cache.stats()["compilations"]
    assert first > 0  # the counter sees compilations at all
    sample(["a green triangle", "two yellow circles on the left"], 0, 4.0, [1.0, 8.0])
    sample(["a red circle", "a small blue square"], 7, 4.0, [1.0, 8.0])
    for prior_scale, decoder_scales in ((1.0, [3.0, 3.0]), (2.5, [5.0, 12.0]), (8.0, 1.0)):
        sample(["a red circle", "a small blue square"], 1, prior_scale, decoder_scales)
    assert compile_cache.stats()["compilations"] == first
    # A new batch size is a new program: the counter would see it.
    sample(["a red circle"], 0, 4.0, 8.0)
    assert compile_cache.stats()["compilations"] > first


def test_second_process_reads_the_first_ones_programs(tmp_path):
    cache = tmp_path / "cache"
    # JAX's own 1 s threshold is left alone: compile_cache.enable lowers it, so every program
    # (most of them well under a second) must still be a hit.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"}
    env[compile_cache.ENV] = str(cache)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                              text=True, timeout=600, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["dir"] == str(cache) and any(cache.iterdir())
    assert first["cache_hits"] == 0 and first["compilations"] > 0
    # Every program of the second process comes from the cache: none is compiled again.
    assert second["cache_hits"] == second["compilations"] == first["compilations"]


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert compile_cache.resolve() == tmp_path / "xdg" / "unclip-jax" / "jax"
        assert compile_cache.resolve(tmp_path / "mine") == tmp_path / "mine"
        assert compile_cache.resolve(False) is None and compile_cache.resolve("off") is None
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))  # the user's own
        assert compile_cache.resolve() == tmp_path / "jax"
        monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
        assert compile_cache.resolve() == tmp_path / "env"
        assert compile_cache.resolve(tmp_path / "mine") == tmp_path / "mine"  # explicit wins
        for off in ("off", "0", "false", ""):
            monkeypatch.setenv(compile_cache.ENV, off)
            assert compile_cache.resolve() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)


def test_enable_sets_and_unsets_jax_config(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.enable() is None
    saved = jax.config.jax_compilation_cache_dir
    try:
        for off in (False, "off"):
            assert compile_cache.enable(tmp_path / "c") == tmp_path / "c"
            assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
            assert (tmp_path / "c").is_dir()
            assert compile_cache.enable(off) is None  # off undoes what enable set
            assert not jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)
