"""One train step per model kind: `train_step(state, batch, rng) -> (state, metrics)` (DESIGN 4).

The model kind supplies `loss_fn(params, batch, rng) -> (loss, metrics)`; this module wraps it
with gradient accumulation over micro-batches, global-norm clipping (inside the optimizer),
AdamW, the EMA update and the non-finite guard, then jits it with shardings and donation and
compiles it ahead of time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from unclip_jax.train.state import TrainState, ema_decay_at

log = logging.getLogger(__name__)

LossFn = Callable[..., tuple[jax.Array, dict]]


def _l2(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    ema_decay: float = 0.9999,
    ema_warmup: bool = True,
    accum_steps: int = 1,
):
    """The pure train step. The rng for step s is fold_in(rng, s), so runs are reproducible.

    With accum_steps > 1 the batch's leading axis is split into micro-batches whose gradients
    are averaged inside a lax.scan (one optimizer update per call). A non-finite loss or
    gradient leaves params, EMA and optimizer state unchanged and increments `state.skipped`.
    """

    def grads_of(params, batch, rng):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)

    def step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        if accum_steps == 1:
            (loss, metrics), grads = grads_of(state.params, batch, rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch
            )

            def body(carry, inputs):
                i, mb = inputs
                (loss, metrics), grads = grads_of(state.params, mb, jax.random.fold_in(rng, i))
                total = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
                return total, None

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(grads_of, state.params, jax.tree.map(lambda x: x[0], micro), rng),
            )
            zeros = (zeros[0][0], zeros[0][1], zeros[1])
            (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
            loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))

        grad_norm = _l2(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, ema_decay, ema_warmup)
        new_ema = jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), state.ema_params,
                               new_params)  # fmt: skip

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = TrainState(
            step=state.step + finite.astype(jnp.int32),
            params=keep(new_params, state.params),
            ema_params=keep(new_ema, state.ema_params),
            opt_state=keep(new_opt, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = dict(metrics)
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            param_norm=_l2(new_state.params),
            learning_rate=schedule(state.step),
            nonfinite_step=(~finite).astype(jnp.float32),
        )
        return new_state, metrics

    return step


def compile_train_step(step, state, batch, rng, *, state_shardings=None, batch_shardings=None,
                       replicated=None):  # fmt: skip
    """jit with shardings and donated state, lowered and compiled ahead of time.

    `state` and `batch` may be arrays or ShapeDtypeStructs. Logs compile time and the memory
    analysis. Returns the compiled executable: call it as compiled(state, batch, rng).
    """
    jitted = jax.jit(
        step,
        in_shardings=None
        if state_shardings is None
        else (state_shardings, batch_shardings, replicated),  # fmt: skip
        out_shardings=None if state_shardings is None else (state_shardings, replicated),
        donate_argnums=0,
    )
    start = time.perf_counter()
    compiled = jitted.lower(state, batch, rng).compile()
    log.info("train step compiled in %.1f s", time.perf_counter() - start)
    try:
        memory = compiled.memory_analysis()
        if memory is not None:
            log.info("train step memory: arguments %.1f MiB, temporaries %.1f MiB, output %.1f MiB",
                     memory.argument_size_in_bytes / 2**20, memory.temp_size_in_bytes / 2**20,
                     memory.output_size_in_bytes / 2**20)  # fmt: skip
    except (AttributeError, NotImplementedError):  # not every backend reports it
        pass
    return compiled
