"""Strict weight import: read safetensors, build our params leaf by leaf, name every mismatch.

A converter describes, for each of our parameters, the source keys it is made of and the
transform that makes it (`Rule`). `build_params` then checks all of them at once and raises one
`ConversionError` listing every missing key, unexpected key and shape mismatch.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message names every offending key."""


def load_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as NumPy arrays (float32 for floating types)."""
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ConversionError(
            f"cannot read {path} as safetensors (truncated or not a safetensors file): {err}"
        ) from None
    return {
        k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
        for k, v in tensors.items()
    }


def flatten(tree) -> dict[str, object]:
    """{'a/b/c': leaf} for a nested dict of params (boxes unboxed)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree)):
        out["/".join(str(getattr(p, "key", p)) for p in path)] = leaf
    return out


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


@dataclass(frozen=True)
class Rule:
    """Our parameter = transform(*source tensors)."""

    sources: tuple[str, ...]
    transform: Callable[..., np.ndarray]


# Transforms from torch layouts to ours.
def linear_kernel(w):  # [out, in] -> [in, out]
    return np.transpose(w)


def conv_kernel(w):  # [out, in, kh, kw] (or [out, in, 1] for conv1d) -> [kh, kw, in, out]
    return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else np.transpose(w[..., 0])


def identity(w):
    return w


def build_params(template, rules: dict[str, Rule], state: dict[str, np.ndarray], what: str):
    """Our params (nested dict of float32 jax arrays) from `state`, checked against `template`.

    template: our params' shapes (e.g. from jax.eval_shape of init); rules: one per template leaf.
    Raises ConversionError naming every missing, unexpected and mis-shaped key.
    """
    expected = flatten(template)
    problems, out, used = [], {}, set()
    for key, leaf in expected.items():
        rule = rules.get(key)
        if rule is None:
            problems.append(f"no conversion rule for our parameter {key!r}")
            continue
        missing = [s for s in rule.sources if s not in state]
        if missing:
            problems.append(f"missing from checkpoint: {', '.join(missing)} (for {key})")
            continue
        used.update(rule.sources)
        try:
            value = np.asarray(rule.transform(*(state[s] for s in rule.sources)), np.float32)
        except ValueError as err:
            problems.append(f"{', '.join(rule.sources)}: cannot convert for {key} ({err})")
            continue
        if value.shape != tuple(leaf.shape):
            shapes = ", ".join(f"{s} {tuple(state[s].shape)}" for s in rule.sources)
            problems.append(f"shape mismatch: {shapes} gives {value.shape}, {key} needs "
                            f"{tuple(leaf.shape)}")  # fmt: skip
            continue
        out[key] = value
    unexpected = sorted(set(state) - used - {s for r in rules.values() for s in r.sources})
    problems += [f"unexpected key in checkpoint: {k}" for k in unexpected]
    if problems:
        # One line (the command line prints errors as one): the first few, then a count.
        listing = "; ".join(problems[:5])
        more = f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ConversionError(f"{what}: {len(problems)} problem(s): {listing}{more}")
    # On the device, contiguous, once: numpy leaves (transposed views of the checkpoint) would
    # be copied to the device and re-laid out on every jitted call (459 transfers and 123 host
    # transposes per forward of the bench-karlo-small decoder).
    return jax.tree.map(jnp.asarray, unflatten(out))
