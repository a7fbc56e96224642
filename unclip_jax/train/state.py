"""The train state (params, EMA params, optimizer state, step) and the optimizer (SPEC 5)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes; a pytree, donated to the step."""

    step: jax.Array  # int32 scalar: optimizer updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    skipped: jax.Array  # int32 scalar: steps skipped because the loss or gradients were non-finite

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            skipped=jnp.zeros((), jnp.int32),
        )


def ema_decay_at(step, decay: float, warmup: bool = True):
    """EMA decay at `step`: min(decay, (1 + step) / (10 + step)) with warm-up, else `decay`.

    The warm-up keeps the EMA from being dominated by the random init early on.
    """
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_schedule(optim) -> optax.Schedule:
    """Linear warm-up to optim.lr over optim.warmup_steps, then constant or cosine decay."""
    warmup = int(optim.get("warmup_steps", 0))
    lr = float(optim.lr)
    kind = optim.get("schedule", "constant")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        decay_steps = max(int(optim.total_steps) - warmup, 1)
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim.get("final_lr_frac", 0.0))
    else:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; expected constant or cosine")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _frozen_labels(names):
    """A labels function for optax.multi_transform: "frozen" for params with a key in `names`."""
    names = frozenset(names)

    def labels(params):
        def label(path, _):
            keys = {getattr(p, "key", None) for p in path}
            return "frozen" if keys & names else "train"

        return jax.tree_util.tree_map_with_path(label, params)

    return labels


def make_optimizer(optim) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with decoupled weight decay and global-norm clipping, from a config's `optim`.

    optim: lr, b1, b2, eps, weight_decay, grad_clip (0 = off), warmup_steps, schedule, and
    decay_matrices_only (default False): decay only tensors of 2+ dimensions, sparing gains,
    biases, class tokens and the logit scale (CLIP's recipe).
    frozen_params (default none): parameter names (any key on the path, e.g. "clip_mean") that
    never change: their updates are zero (no Adam step, no weight decay), as for the diffusion
    prior's stored dataset statistics.
    """
    schedule = make_schedule(optim)
    parts = []
    if optim.get("grad_clip", 0.0):
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim.get("b1", 0.9)),
            b2=float(optim.get("b2", 0.999)),
            eps=float(optim.get("eps", 1e-8)),
            weight_decay=float(optim.get("weight_decay", 0.0)),
            mask=_matrices if optim.get("decay_matrices_only", False) else None,
        )
    )
    tx = optax.chain(*parts)
    frozen = tuple(optim.get("frozen_params", ()) or ())
    if frozen:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   _frozen_labels(frozen))  # fmt: skip
    return tx, schedule
