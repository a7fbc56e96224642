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

    def state_keys(self, step: int | None = None) -> tuple[str, ...]:
        """The top-level entries of a saved state: a TrainState's fields, or ("params",) for a
        params-only checkpoint (`save_params`: converted weights)."""
        return tuple(self._state_metadata(step).keys())

    def _state_metadata(self, step: int | None) -> dict:
        """The saved state's tree of array metadata (shape, dtype), read without its arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        tree = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / "state")
        return getattr(tree, "tree", tree)

    def restore_params(self, step: int | None = None, key: str = "params", target=None):
        """One entry of the saved state (`params` or `ema_params`) without reading the rest.

        A trained state is params + EMA + optimizer moments, about 4x the params: sampling and
        `init_from` read only the entry they use. target: that entry as ShapeDtypeStructs with
        the shardings to restore onto (None: as saved, on this host's first device).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        keys = self.state_keys(step)
        if key not in keys:
            raise ValueError(f"checkpoint {self.directory / str(step)} has no {key!r} "
                             f"(it holds {', '.join(keys)})")  # fmt: skip
        if target is None:
            saved = self._state_metadata(step)[key]
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved
            )
        item = {key: target}
        args = ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )  # fmt: skip
        with ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(self.directory / str(step) / "state", args=args)
        return restored[key]

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]

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
    """(config ConfigDict, params) of a run, for sampling on this host.

    `path` is a run's workdir (holding checkpoints/) or a checkpoint folder itself. The EMA params
    are returned unless ema=False; a params-only checkpoint (converted weights, `save_params`)
    has no EMA and gives its params either way. Only that entry is read from disk. Errors name the
    path when nothing is there.
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
        key = "ema_params" if ema and "ema_params" in ckpt.state_keys(step) else "params"
        params = ckpt.restore_params(step, key)
        config = ckpt.restore_config(step)
    finally:
        ckpt.close()
    return ml_collections.ConfigDict(config), params


def save_params(workdir: str | pathlib.Path, config, params, *, step: int = 0) -> pathlib.Path:
    """A params-only run: workdir/checkpoints/<step> holding {"params"} and the config JSON.

    What `unclip-jax convert` writes for public weights: `load_run` samples from it and a
    training config's `ckpt.init_from` starts from it, without optimizer state or EMA on disk
    (a converted 3.5B decoder is 14 GB, not 56). config: a ConfigDict or a dict.
    """
    import json

    workdir = pathlib.Path(workdir)
    as_dict = json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)
    ckpt = Checkpointer(workdir / "checkpoints", enable_async=False)
    try:
        ckpt.save(step, {"params": params}, config=as_dict, data_state={}, force=True)
    finally:
        ckpt.close()
    return workdir
