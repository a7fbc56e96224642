"""The training loop shared by every model kind: `train(config, workdir)`.

Reads top to bottom: mesh and rules, the sharded state, resume (workdir > init_from > scratch),
the AOT-compiled step, then the loop with metrics, checkpoints and preemption handling.
"""

from __future__ import annotations

import json
import logging
import pathlib
import signal
import time

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax import parallel
from unclip_jax.checkpoint import Checkpointer, abstract_like
from unclip_jax.data import loader
from unclip_jax.train.kinds import get_kind
from unclip_jax.train.state import TrainState, make_optimizer
from unclip_jax.train.step import compile_train_step, make_train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir: str | pathlib.Path) -> dict:
    """Train `config.kind` in `workdir`; returns a summary (steps, last metrics, paths)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    log.info("process %d of %d, %d local devices of %d", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())  # fmt: skip

    # ---------------------------------------------------------------- mesh, state, resume
    kind = get_kind(config)
    mesh = parallel.create_mesh(tuple(tuple(axis) for axis in config.mesh))
    rules = parallel.rules_for(config.sharding_rules)
    tx, schedule = make_optimizer(config.optim)
    rng = jax.random.key(config.seed)

    def create(init_rng):
        return TrainState.create(kind.init(init_rng), tx)

    state, shardings = parallel.sharded_init(create, mesh, rules, jax.random.fold_in(rng, 0))
    ckpt_cfg = config.ckpt
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=ckpt_cfg.keep,
                        keep_period=ckpt_cfg.get("keep_every") or None)  # fmt: skip
    global_batch = config.optim.batch_size
    if global_batch % jax.process_count():
        raise ValueError(f"batch size {global_batch} does not split over "
                         f"{jax.process_count()} processes")  # fmt: skip
    data = kind.data(global_batch, jax.process_index(), jax.process_count())
    start = 0
    if ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        state, _, data_state = ckpt.restore(start, abstract_like(state, shardings))
        data.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, start)
    elif ckpt_cfg.get("init_from"):
        source = Checkpointer(ckpt_cfg.init_from, enable_async=False)
        loaded, _, _ = source.restore(None, abstract_like(state, shardings))
        # Separate buffers: the step donates the state, and one buffer donated twice is fatal.
        state = state.replace(
            params=loaded.params, ema_params=jax.tree.map(lambda x: x.copy(), loaded.params)
        )
        log.info("initialised params from %s", ckpt_cfg.init_from)

    # ---------------------------------------------------------------- the compiled step
    batch_sharding = loader.batch_sharding(mesh)
    first = loader.to_global(next(data), batch_sharding)
    step_fn = make_train_step(kind.loss_fn, tx, schedule, ema_decay=config.optim.ema_decay,
                              accum_steps=config.optim.get("accum_steps", 1))  # fmt: skip
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = compile_train_step(
            step_fn, state, first, rng, state_shardings=shardings,
            batch_shardings=jax.tree.map(lambda _: batch_sharding, first), replicated=replicated,
        )  # fmt: skip

    # ---------------------------------------------------------------- the loop
    total = config.optim.steps
    metrics_path = workdir / "metrics.jsonl"
    preemption = _Preemption()
    last_log, last_logged, metrics = time.perf_counter(), start, {}
    # Per-step non-finite flags stay on device until the next log step (one transfer), where the
    # host extends the current run of consecutive skipped steps.
    pending_flags, nonfinite_run = [], 0
    done = start
    try:
        for step in range(start, total):
            batch = first if step == start else loader.to_global(next(data), batch_sharding)
            state, metrics = compiled(state, batch, rng)
            pending_flags.append(metrics["nonfinite_step"])
            done = step + 1
            if done % config.train.log_every == 0 or done == total:
                for flag in jax.device_get(pending_flags):
                    nonfinite_run = nonfinite_run + 1 if flag else 0
                pending_flags = []
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                host.update(step=done, steps_per_s=(done - last_logged) / (now - last_log),
                            skipped_total=int(state.skipped))  # fmt: skip
                host["examples_per_s"] = host["steps_per_s"] * global_batch
                last_log, last_logged = now, done
                if is_main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(host) + "\n")
                    log.info("step %d loss %.4f", done, host["loss"])
                if nonfinite_run >= config.train.max_nonfinite_in_row:
                    raise TrainingDiverged(
                        f"{nonfinite_run} non-finite steps in a row up to step {done}; stopping. "
                        f"Skipped steps leave the params unchanged; the last checkpoint is step "
                        f"{ckpt.latest_step()} in {ckpt.directory}"
                    )
            preempted = preemption.requested or ckpt.reached_preemption(done)
            if done % ckpt_cfg.save_every == 0 or done == total or preempted:
                ckpt.save(done, state, config=json.loads(config.to_json()),
                          data_state=data.get_state(), force=True)  # fmt: skip
            if preempted:
                log.warning("stopped at step %d after preemption", done)
                break
    finally:
        preemption.restore()
        ckpt.close()
    return {"step": done, "metrics": jax.device_get(metrics), "workdir": str(workdir)}
