"""The training loop shared by every model kind: `train(config, workdir)`.

Reads top to bottom: mesh and rules, the sharded state, resume (workdir > init_from > scratch),
the AOT-compiled step, then the loop with metrics, held-out loss, sample grids, checkpoints and
preemption handling. Multi-host runs call `parallel.distributed.initialize()` before this; every
process runs the same loop, and only process 0 writes metrics, logs and samples (metrics.py).
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

from unclip_jax import compile_cache, parallel, storage
from unclip_jax.checkpoint import Checkpointer, abstract_like, split_run_path
from unclip_jax.data import loader
from unclip_jax.run_paths import DamagedCheckpoint, DamagedCheckpointsOnly
from unclip_jax.train import hooks
from unclip_jax.train.kinds import get_kind
from unclip_jax.train.metrics import MetricWriter, Progress
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


def _check_same_kind(ckpt, config, workdir) -> None:
    """A workdir resumes only the kind of run it holds (its newest readable saved config)."""
    for step in reversed(ckpt.all_steps()):
        try:
            saved = ckpt.restore_config(step)
        except DamagedCheckpoint:
            continue
        if saved.get("kind") != config.get("kind"):
            raise ValueError(f"--workdir {workdir} holds a {saved.get('kind')!r} run (step "
                             f"{step}); this config trains {config.get('kind')!r}: choose "
                             "another --workdir")  # fmt: skip
        return


def train(config, workdir: str | pathlib.Path, *, kind=None) -> dict:
    """Train `config.kind` (or the given ModelKind) in `workdir` (a local folder or gs://...);
    returns a summary (steps, last metrics, paths)."""
    storage.check_bucket(workdir)
    workdir = storage.path(workdir)
    storage.mkdir(workdir)
    compile_cache.enable()
    is_main = jax.process_index() == 0
    log.info("process %d of %d, %d local devices of %d", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())  # fmt: skip

    # ---------------------------------------------------------------- mesh, state, resume
    kind = kind or get_kind(config, workdir)
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
    start, set_aside = 0, []
    if ckpt.latest_step() is not None:
        # The newest step that reads back; damaged ones above it are renamed out of the way.
        _check_same_kind(ckpt, config, workdir)
        try:
            found, restored, set_aside = ckpt.restore_newest_intact(abstract_like(state, shardings))
        except DamagedCheckpoint:
            raise
        except ValueError as err:  # a tree or shape that does not fit: not damage
            first = str(err).strip().splitlines()[0]
            message = (f"the checkpoints in {ckpt.directory} do not fit this config's model "
                       f"(were model settings changed?): {first}")  # fmt: skip
            raise ValueError(message) from None
        for step, problem, moved in set_aside:
            log.warning("checkpoint step %d is damaged (%s): set aside as %s", step, problem,
                        moved)  # fmt: skip
        if found is None:
            raise DamagedCheckpointsOnly(
                f"every checkpoint in {ckpt.directory} is damaged; they are set aside in "
                f"{ckpt.directory}.damaged. Remove the run's checkpoints/ folder to train from "
                "the start, or copy intact steps back"
            )
        start = found
        state, _, data_state = restored
        data.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, start)
    elif ckpt_cfg.get("init_from"):
        # Params only (a run's or converted weights'), read onto this mesh's shardings. A path
        # to one step (RUN/checkpoints/<step>) takes that step.
        _, source_dir, source_step = split_run_path(ckpt_cfg.init_from)
        source = Checkpointer(source_dir, enable_async=False)
        try:
            params = source.restore_params(
                source_step, "params", abstract_like(state.params, shardings.params)
            )
        finally:
            source.close()
        # Separate buffers: the step donates the state, and one buffer donated twice is fatal.
        state = state.replace(params=params, ema_params=jax.tree.map(lambda x: x.copy(), params))
        log.info("initialised params from %s", ckpt_cfg.init_from)

    # ---------------------------------------------------------------- the compiled step
    batch_sharding = loader.batch_sharding(mesh)
    first = loader.to_global(next(data), batch_sharding)
    step_fn = make_train_step(kind.loss_fn, tx, schedule, ema_decay=config.optim.ema_decay,
                              accum_steps=config.optim.get("accum_steps", 1))  # fmt: skip
    replicated = NamedSharding(mesh, P())
    compile_start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = compile_train_step(
            step_fn, state, first, rng, state_shardings=shardings,
            batch_shardings=jax.tree.map(lambda _: batch_sharding, first), replicated=replicated,
        )  # fmt: skip
    writer = MetricWriter(workdir, enabled=is_main,
                          tensorboard=config.train.get("tensorboard", True))  # fmt: skip
    writer.compile_stats(start, time.perf_counter() - compile_start, compiled)
    for step, problem, moved in set_aside:
        writer.event(start, "damaged_checkpoint", damaged_step=step, problem=problem,
                     set_aside=str(moved), resumed_from=start)  # fmt: skip

    # ---------------------------------------------------------------- held-out loss, samples
    eval_every = config.train.get("eval_every", 0) if getattr(kind, "eval_data", None) else 0
    sample_every = config.train.get("sample_every", 0) if getattr(kind, "sample", None) else 0
    evaluate = None
    if eval_every:
        evaluate = hooks.Evaluator(kind, mesh=mesh, rules=rules, param_shardings=shardings.params,
                                   global_batch=global_batch, rng=jax.random.fold_in(rng, 1),
                                   num_batches=config.train.get("eval_batches", 1))  # fmt: skip
    sample_rng = jax.random.fold_in(rng, 2)

    # ---------------------------------------------------------------- the loop
    total = config.optim.steps
    progress = Progress(start, total, enabled=is_main)
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
                writer.scalars(done, host)
                progress.show(loss=host["loss"])
                if is_main:
                    log.info("step %d loss %.4f", done, host["loss"])
                if nonfinite_run >= config.train.max_nonfinite_in_row:
                    raise TrainingDiverged(
                        f"{nonfinite_run} non-finite steps in a row up to step {done}; stopping. "
                        f"Skipped steps leave the params unchanged; the last checkpoint is step "
                        f"{ckpt.latest_step()} in {ckpt.directory}"
                    )
            if evaluate is not None and (done % eval_every == 0 or done == total):
                held_out = evaluate(state)
                writer.scalars(done, held_out, split="eval")
                if is_main:
                    log.info("step %d held-out loss %.4f (EMA %.4f)", done,
                             held_out["eval_loss"], held_out["eval_ema_loss"])  # fmt: skip
            if sample_every and (done % sample_every == 0 or done == total):
                hooks.write_samples(kind, state, sample_rng, done, mesh=mesh, rules=rules,
                                    writer=writer)  # fmt: skip
            progress.update()
            preempted = preemption.requested or ckpt.reached_preemption(done)
            if done % ckpt_cfg.save_every == 0 or done == total or preempted:
                ckpt.save(done, state, config=json.loads(config.to_json()),
                          data_state=data.get_state(), force=True)  # fmt: skip
            if preempted:
                log.warning("stopped at step %d after preemption", done)
                break
    finally:
        preemption.restore()
        progress.close()
        writer.close()
        ckpt.close()
    return {"step": done, "metrics": jax.device_get(metrics), "workdir": str(workdir)}
