"""Schedules, tables and respacing against direct NumPy transcriptions and SPEC 1.1/1.4's lists."""

import numpy as np
import pytest

from unclip_jax import diffusion as d
from unclip_jax.diffusion import gaussian, schedules

FAST27 = [0, 22, 44, 66, 88, 111, 133, 155, 177, 199, 200, 222, 244, 266, 288, 311, 333, 355,
          377, 399, 400, 500, 599, 600, 799, 800, 997]  # fmt: skip


def numpy_cosine_betas(T):
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(T, dtype=np.float64)
    return np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)


def test_cosine_schedule_matches_formula_and_spec_numbers():
    betas = d.get_named_beta_schedule("cosine", 1000)
    np.testing.assert_allclose(betas, numpy_cosine_betas(1000), rtol=1e-12)
    np.testing.assert_array_equal(betas, d.get_named_beta_schedule("squaredcos_cap_v2", 1000))
    abar = np.cumprod(1 - betas)
    assert betas[0] == pytest.approx(4.13e-5, rel=1e-2)
    assert betas[-1] == 0.999
    assert abar[0] == pytest.approx(0.99996, abs=1e-5)
    assert abar[-1] == pytest.approx(2.4e-9, rel=0.05)


@pytest.mark.parametrize("T", [1000, 4000, 50])
def test_linear_schedule_scales_with_T(T):
    betas = d.get_named_beta_schedule("linear", T)
    s = 1000 / T
    np.testing.assert_allclose(betas, np.linspace(1e-4 * s, 0.02 * s, T), rtol=1e-12)
    if T == 1000:
        assert np.cumprod(1 - betas)[-1] == pytest.approx(4.0e-5, rel=0.02)


def test_table_matches_numpy_transcription():
    betas = d.get_named_beta_schedule("cosine", 1000)
    table = gaussian.create_table(betas)
    a = 1 - betas
    abar = np.cumprod(a)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    expected = {
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "alphas_cumprod_next": np.concatenate([abar[1:], [0.0]]),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / abar - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * np.sqrt(a) / (1 - abar),
    }
    for name, ref in expected.items():
        got = np.asarray(getattr(table, name))
        assert got.dtype == np.float32, name
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-30, err_msg=name)
    np.testing.assert_array_equal(table.timestep_map, np.arange(1000))


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("fast27", FAST27),
        ("10,10,3,2,2", sorted(set(FAST27) - {997} | {999})),
        ("7", [0, 166, 333, 500, 666, 832, 999]),
        # diffusers' UnCLIPScheduler.set_timesteps(n) = round(arange(n) * 999 / (n - 1)) (SPEC 1.4).
        ("25", sorted(np.round(np.arange(25) * 999 / 24).astype(int).tolist())),
        ("50", sorted(np.round(np.arange(50) * 999 / 49).astype(int).tolist())),
        ("ddim50", list(range(0, 1000, 20))),
        ("ddim25", list(range(0, 1000, 40))),
    ],
)
def test_respaced_sets(spec, expected):
    assert sorted(d.space_timesteps(1000, spec)) == expected


def test_respaced_sets_spec_excerpts():
    s25 = sorted(d.space_timesteps(1000, "25"))
    s50 = sorted(d.space_timesteps(1000, "50"))
    assert s25[:3] == [0, 42, 83] and s25[-2:] == [957, 999]
    assert s50[:3] == [0, 20, 41] and s50[-2:] == [979, 999]
    assert len(d.space_timesteps(1000, "fast27")) == 27


@pytest.mark.parametrize("spec", ["fast27", "7", "ddim50", "10,10,3,2,2", [10, 5]])
def test_respaced_table_keeps_alphas_cumprod(spec):
    full = d.create_diffusion("cosine", 1000)
    table = d.create_diffusion("cosine", 1000, timestep_respacing=spec)
    kept = np.array(sorted(d.space_timesteps(1000, spec)))
    np.testing.assert_array_equal(table.timestep_map, kept)
    np.testing.assert_allclose(
        table.alphas_cumprod, np.asarray(full.alphas_cumprod)[kept], rtol=1e-5
    )
    # The respaced betas are rebuilt from the kept alpha_bar, not copied.
    abar = np.cumprod(1 - d.get_named_beta_schedule("cosine", 1000))[kept]
    np.testing.assert_allclose(
        table.betas, 1 - abar / np.concatenate([[1.0], abar[:-1]]), rtol=1e-5
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: d.get_named_beta_schedule("sigmoid", 1000), "unknown beta schedule"),
        (lambda: d.get_named_beta_schedule("linear", 0), "positive integer"),
        (lambda: d.space_timesteps(1000, "fast30"), "fast27"),
        (lambda: d.space_timesteps(1000, "ddimx"), "not an integer"),
        (lambda: d.space_timesteps(1000, "ddim999"), "exactly 999"),
        (lambda: d.space_timesteps(10, "6,6"), "cannot divide"),
        (lambda: d.create_diffusion(mean_type="score"), "score"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_respace_betas_rejects_out_of_range_steps():
    with pytest.raises(ValueError, match="kept timesteps"):
        schedules.respace_betas(np.full(10, 0.1), {3, 12})
