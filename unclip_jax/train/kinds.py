"""The registry of model kinds the shared training loop can train.

A kind supplies `init(rng) -> boxed params`, `loss_fn(params, batch, rng) -> (loss, metrics)` and
`data(host_batch_size, process_index) -> iterator` of host-local NumPy batches whose
`get_state()`/`set_state()` make the data order resumable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelKind:
    init: Callable
    loss_fn: Callable
    data: Callable


def get_kind(config) -> ModelKind:
    """The ModelKind named by config.kind."""
    kind = config.get("kind")
    if kind == "toy2d":
        from unclip_jax.demo import toy2d

        return toy2d.model_kind(config)
    raise ValueError(f"unknown model kind {kind!r}; this version trains: toy2d")
