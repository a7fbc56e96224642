"""Beta schedules and timestep respacing (SPEC 1.1 and 1.4).

Everything here runs on the host in float64 NumPy; `gaussian.create_table` turns the result into the
float32 device table. Timestep indices are 0-based: index t is the (t+1)-th noising step.
"""

from __future__ import annotations

import math

import numpy as np

# Section counts of GLIDE's "fast27" respacing before its 999 -> 997 swap (SPEC 1.4).
_FAST27_SECTIONS = "10,10,3,2,2"


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, rescaled so that any T matches 1e-4..0.02 at T = 1000."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1], clipped at `max_beta`."""
    betas = []
    for i in range(num_timesteps):
        t1, t2 = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float64)


def cosine_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule (diffusers' "squaredcos_cap_v2")."""
    return betas_for_alpha_bar(
        num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    )


_SCHEDULES = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "squaredcos_cap_v2": cosine_beta_schedule,
}


def get_named_beta_schedule(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """Betas [T] (float64) of a named schedule: "linear", "cosine" or "squaredcos_cap_v2"."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {sorted(_SCHEDULES)}")
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    return _SCHEDULES[name](num_timesteps)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """The set of original-chain timesteps kept by a respacing (guided-diffusion's rules).

    `section_counts` is either a list of step counts, one per equal section of [0, T), or a string:
    "N" or "a,b,c" (the same as a list), "ddimN" (a constant stride giving exactly N steps, as the
    DDIM paper does) or "fastN" (GLIDE: only "fast27" is defined).
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = _parse_int(spec[len("ddim") :], section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot take exactly {desired} steps of {num_timesteps} with a stride"
            )
        if spec.startswith("fast"):
            if spec != "fast27":
                raise ValueError(
                    f"only 'fast27' is defined among the fastN respacings, got {spec!r}"
                )
            # GLIDE moves the noisiest step from T-1 to T-3 "to reduce DDIM artifacts".
            steps = space_timesteps(num_timesteps, _FAST27_SECTIONS)
            steps.remove(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return steps
        counts = [_parse_int(c, section_counts) for c in spec.split(",")]
    else:
        counts = [int(c) for c in section_counts]

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Python's round() is banker's rounding, as in the reference code: the sets must match.
        kept.extend(start + round(stride * k) for k in range(count))
        start += size
    return set(kept)


def _parse_int(text: str, whole: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"bad timestep respacing {whole!r}: {text!r} is not an integer") from None


def respace_betas(betas: np.ndarray, use_timesteps: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the chain that keeps only `use_timesteps`, and the map back to original indices.

    The respaced chain has the same alpha_bar as the original at every kept step:
    new_beta_i = 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}], with alpha_bar = 1 before the first.
    Returns (new_betas [T'] float64, timestep_map [T'] int64, ascending original indices).
    """
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    timestep_map = np.array(sorted(use_timesteps), dtype=np.int64)
    if timestep_map.size == 0 or timestep_map[0] < 0 or timestep_map[-1] >= len(betas):
        raise ValueError(
            f"kept timesteps must lie in [0, {len(betas)}), got {sorted(use_timesteps)}"
        )
    kept = alphas_cumprod[timestep_map]
    previous = np.concatenate([[1.0], kept[:-1]])
    return 1.0 - kept / previous, timestep_map
