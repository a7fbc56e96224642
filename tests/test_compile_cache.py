"""Compilations counted, not timed: a sampling pipeline compiles once per batch shape (guidance
sweeps, new prompts and new seeds reuse it), and a second process loads the first's programs from
the persistent compilation cache (unclip_jax/compile_cache.py)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import compile_cache
from unclip_jax.pipelines.unclip import pipeline_from_diffusers

KARLO = pathlib.Path(__file__).parent / "fixtures" / "karlo_tiny"

PROMPTS = ["a red circle", "a small blue square"]
# One unCLIP sample (prior, decoder, super-res) of karlo_tiny in a fresh process; saves the images
# and prints the process's compile statistics, where the cache was and how often the prior
# sampler traced its network here.
CHILD = f"""
import json, sys, jax, numpy as np
from unclip_jax import compile_cache
from unclip_jax.pipelines.unclip import pipeline_from_diffusers
pipe = pipeline_from_diffusers({str(KARLO)!r})
out = pipe({PROMPTS!r}, jax.random.key(0), prior_guidance=4.0, decoder_guidance=[1.0, 8.0],
           decoder_respacing="3")
np.save(sys.argv[1], np.asarray(out["images"]))
traces = pipe.priors["diffusion"].sampler._traces
print(json.dumps(compile_cache.stats() | {{"dir": jax.config.jax_compilation_cache_dir,
                                          "prior_traces": traces}}))
"""


@pytest.fixture(scope="module")
def pipe():
    return pipeline_from_diffusers(KARLO)


def sample(pipe, prompts, seed, prior_guidance, decoder_guidance):
    out = pipe(prompts, jax.random.key(seed), prior_guidance=prior_guidance,
               decoder_guidance=decoder_guidance, decoder_respacing="3")  # fmt: skip
    return jax.block_until_ready(out["images"])


def test_guidance_sweeps_new_prompts_and_seeds_never_compile(pipe):
    sample(pipe, PROMPTS, 0, 4.0, [1.0, 8.0])
    first = compile_cache.stats()["compilations"]
    assert first > 0  # the counter sees compilations at all
    sample(pipe, ["a green triangle", "two yellow circles on the left"], 0, 4.0, [1.0, 8.0])
    sample(pipe, PROMPTS, 7, 4.0, [1.0, 8.0])
    for prior_scale, decoder_scales in ((1.0, [3.0, 3.0]), (2.5, [5.0, 12.0]), (8.0, 1.0)):
        sample(pipe, PROMPTS, 1, prior_scale, decoder_scales)
    assert compile_cache.stats()["compilations"] == first
    # A new batch size is a new program: the counter would see it.
    sample(pipe, ["a red circle"], 0, 4.0, 8.0)
    assert compile_cache.stats()["compilations"] > first


def test_second_process_reads_the_first_ones_programs(pipe, tmp_path):
    cache = tmp_path / "cache"
    # JAX's own 1 s threshold is left alone: compile_cache.enable lowers it, so every program
    # (most of them well under a second) must still be a hit.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"}
    env[compile_cache.ENV] = str(cache)
    runs = []
    for i in range(2):
        images = tmp_path / f"images_{i}.npy"
        done = subprocess.run([sys.executable, "-c", CHILD, str(images)], env=env,
                              capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"images": np.load(images)})
    first, second = runs
    assert first["dir"] == str(cache) and any(cache.iterdir())
    assert first["cache_hits"] == 0 and first["compilations"] > 0
    # Every program of the second process comes from the cache: none is compiled again.
    assert second["cache_hits"] == second["compilations"] == first["compilations"]
    # The traced samplers and CLIP towers (compile_cache.Exported) too: the first process wrote
    # them, the second read every one and never traced the prior's network.
    assert first["exports_read"] == 0 and first["exports_written"] >= 4  # text, prior, 2 stages
    assert second["exports_read"] == first["exports_written"] and second["exports_written"] == 0
    assert first["prior_traces"] == 1 and second["prior_traces"] == 0
    assert len(list((cache / compile_cache.EXPORTS).iterdir())) == first["exports_written"]
    # The same images from the program read back, and from this process's own trace.
    np.testing.assert_array_equal(second["images"], first["images"])
    np.testing.assert_array_equal(np.asarray(sample(pipe, PROMPTS, 0, 4.0, [1.0, 8.0])),
                                  first["images"])  # fmt: skip


def test_an_exported_program_is_keyed_checked_and_rewritten_when_damaged(tmp_path, monkeypatch,
                                                                         caplog):  # fmt: skip
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    folder = tmp_path / compile_cache.EXPORTS
    try:

        def f(params, x, scale):
            return jnp.tanh(x @ params["w"]) * scale

        args = ({"w": jnp.eye(3)}, jnp.ones((2, 3)), 2.0)
        expected = np.asarray(jax.jit(f)(*args))
        first = compile_cache.Exported(f, "f")
        np.testing.assert_array_equal(first(*args), expected)
        [path] = folder.iterdir()
        # A new process (a new object) reads it; a new key or a new shape is another program.
        again = compile_cache.Exported(f, "f")
        np.testing.assert_array_equal(again(*args), expected)
        assert again.traced_from_disk == 1 and len(list(folder.iterdir())) == 1
        compile_cache.Exported(f, "g")(*args)
        compile_cache.Exported(f, "f")({"w": jnp.eye(3)}, jnp.ones((4, 3)), 2.0)
        assert len(list(folder.iterdir())) == 3
        # A damaged file is named in a warning, traced again and rewritten.
        path.write_bytes(b"not an export")
        damaged = compile_cache.Exported(f, "f")
        with caplog.at_level("WARNING"):
            np.testing.assert_array_equal(damaged(*args), expected)
        assert "unreadable" in caplog.text and damaged.traced_from_disk == 0
        assert compile_cache.Exported(f, "f")(*args) is not None and path.stat().st_size > 100
        # With the cache off it is jax.jit and writes nothing.
        jax.config.update("jax_compilation_cache_dir", None)
        np.testing.assert_array_equal(compile_cache.Exported(f, "h")(*args), expected)
        assert len(list(folder.iterdir())) == 3
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)


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
