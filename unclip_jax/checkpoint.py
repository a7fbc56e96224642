"""Orbax checkpoints of the train state, the config and the data-iterator state (DESIGN 8).

Resume order (big_vision's): the run's own workdir, then `init_from` (params only: converted
weights or another run), then scratch. Saves are asynchronous; `wait()` before exiting.
Restoring onto another mesh works: the target is a tree of ShapeDtypeStructs with shardings.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints plus every `keep_period`-th step."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3,
                 keep_period: int | None = None, enable_async: bool = True):  # fmt: skip
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=enable_async,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "config", "data"), options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, config: dict, data_state: dict | None = None,
             force: bool = False) -> bool:  # fmt: skip
        """Start an asynchronous save of step `step`; returns whether one was started."""
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config),
                data=ocp.args.JsonSave(data_state or {}),
            ),
            force=force,
        )
        if saved:
            log.info("checkpoint %d started in %s", step, self.directory)
        return saved

    def restore(self, step: int | None = None, abstract_state=None):
        """(state, config, data_state) of `step` (latest if None).

        abstract_state: the state as ShapeDtypeStructs carrying the target shardings (the mesh
        may differ from the one that saved). None restores plain arrays as saved: for
        inspection, sampling on one host, and tests.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                config=ocp.args.JsonRestore(),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["config"], restored["data"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` with `shardings` (the restore target on a given mesh)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def load_run(path: str | pathlib.Path, *, ema: bool = True, step: int | None = None):
    """(config ConfigDict, params) of a training run, for sampling on this host.

    `path` is a run's workdir (holding checkpoints/) or a checkpoint folder itself; the EMA params
    are returned unless ema=False. Errors name the path when nothing is there.
    """
    import ml_collections

    path = pathlib.Path(path)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not folder.is_dir():
        raise FileNotFoundError(f"no run at {path} (expected a workdir with checkpoints/)")
    ckpt = Checkpointer(folder, enable_async=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {folder}")
        state, config, _ = ckpt.restore(step)
    finally:
        ckpt.close()
    params = state["ema_params" if ema else "params"]
    return ml_collections.ConfigDict(config), params
