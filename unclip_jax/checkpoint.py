"""Orbax checkpoints of the train state, the config and the data-iterator state (DESIGN 8).

Resume order (big_vision's): the run's own workdir, then `init_from` (params only: converted
weights or another run), then scratch. Saves are asynchronous; `wait()` before exiting.
Restoring onto another mesh works: the target is a tree of ShapeDtypeStructs with shardings.

Damage (a crashed copy, a full disk, a killed save) is found, named and never fatal to a run:
  - orbax writes each step under a temporary name and renames it when complete, so a save killed
    midway is never listed as a step;
  - once a step is complete, process 0 writes `unclip_manifest.json` into it (every file's size),
    and `problem()` compares the files with it (a stat per file, nothing read);
  - a restore that fails on unreadable data (tensorstore's OUT_OF_RANGE, NOT_FOUND, DATA_LOSS:
    OCDBT checksums its nodes; undecodable JSON; a missing item) raises `DamagedCheckpoint`, which
    names the step, what is wrong and the intact steps beside it. Mismatched shapes or trees are
    not damage: they are raised as they are.
Resuming training sets a damaged step aside (`set_aside`: renamed into <dir>.damaged/, never
deleted) and takes the newest intact one (`restore_newest_intact`).
A run path may name one step: RUN/checkpoints/<step> (`split_run_path`).
A run folder may be local or in a bucket (gs://...): orbax and tensorstore write objects there,
and the manifests, set-asides and listings go through `storage`.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import orbax.checkpoint as ocp

from unclip_jax import storage
from unclip_jax.run_paths import DamagedCheckpoint, run_folder, split_run_path

__all__ = ["Checkpointer", "DamagedCheckpoint", "abstract_like", "load_run", "run_folder",
           "save_params", "split_run_path", "step_problem", "write_manifest"]  # fmt: skip

log = logging.getLogger(__name__)

MANIFEST = "unclip_manifest.json"
ITEMS = ("state", "config", "data")
# tensorstore's status codes for unreadable bytes, and orbax's words for a missing item.
_DAMAGE_MARKS = ("OUT_OF_RANGE", "NOT_FOUND", "DATA_LOSS", "was not found in the checkpoint",
                 "Error reading", "Error decoding", "No such file")  # fmt: skip


def _is_damage(err: BaseException) -> bool:
    if isinstance(err, json.JSONDecodeError | FileNotFoundError | EOFError | UnicodeDecodeError):
        return True
    text = str(err)
    return any(mark in text for mark in _DAMAGE_MARKS)


def _one_line(err: BaseException, limit: int = 240) -> str:
    """An exception as one short line (tensorstore's messages carry a whole spec)."""
    text = " ".join(str(err).split())
    text = text.split(" [tensorstore_spec=")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints plus every `keep_period`-th step."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3,
                 keep_period: int | None = None, enable_async: bool = True):  # fmt: skip
        self.directory = storage.absolute(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=enable_async,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "config", "data"), options=options
        )
        self._unmanifested: list[int] = []  # saves started, their manifests not yet written

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # ------------------------------------------------------------------ damage
    def _write_manifests(self) -> None:
        """Once the pending saves are complete, record each one's files (process 0)."""
        if not self._unmanifested:
            return
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unmanifested:
                folder = self.directory / str(step)
                if folder.is_dir():
                    write_manifest(folder)
        self._unmanifested = []

    def problem(self, step: int) -> str | None:
        """What is wrong with a saved step, found without reading its arrays, or None."""
        return step_problem(self.directory / str(step))

    def intact_steps(self, exclude=()) -> list[int]:
        """Steps without a problem(), newest first."""
        return [s for s in reversed(self.all_steps()) if s not in exclude and not self.problem(s)]

    def damaged(self, step: int, problem: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(self.directory, step, problem, self.intact_steps(exclude={step}))

    def checked_step(self, step: int | None) -> int:
        """The step to read (latest if None), checked to exist and to match its manifest."""
        latest = self.latest_step()
        step = latest if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            have = ", ".join(map(str, reversed(self.all_steps())))
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                                    f"(it holds {have})")  # fmt: skip
        problem = self.problem(step)
        if problem:
            raise self.damaged(step, problem)
        return step

    def _reading(self, step: int, read):
        """read(), with unreadable bytes reported as DamagedCheckpoint."""
        try:
            return read()
        except Exception as err:
            if _is_damage(err):
                raise self.damaged(step, _one_line(err)) from None
            raise

    def set_aside(self, step: int) -> pathlib.Path:
        """Move a damaged step out of the run (renamed into <dir>.damaged/, never deleted)."""
        target = self.directory.with_name(self.directory.name + ".damaged")
        target = target / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            storage.mkdir(target.parent)
            storage.replace(self.directory / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return target

    def restore_newest_intact(self, abstract_state=None):
        """(step, (state, config, data_state), set_aside) from the newest readable step.

        Damaged steps above it are set aside, each listed as (step, problem, new path). None
        for the step (and the restored triple) when no step is left."""
        set_aside = []
        for step in reversed(self.all_steps()):
            problem = self.problem(step)
            if problem is None:
                try:
                    return step, self.restore(step, abstract_state), set_aside
                except DamagedCheckpoint as err:
                    problem = err.problem
            set_aside.append((step, problem, self.set_aside(step)))
        return None, None, set_aside

    def save(self, step: int, state, *, config: dict, data_state: dict | None = None,
             force: bool = False) -> bool:  # fmt: skip
        """Start an asynchronous save of step `step`; returns whether one was started."""
        self._write_manifests()  # the previous save is complete before this one starts
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
            self._unmanifested.append(step)
            log.info("checkpoint %d started in %s", step, self.directory)
        return saved

    def restore(self, step: int | None = None, abstract_state=None):
        """(state, config, data_state) of `step` (latest if None).

        abstract_state: the state as ShapeDtypeStructs carrying the target shardings (the mesh
        may differ from the one that saved). None restores plain arrays as saved: for
        inspection, sampling on one host, and tests.
        """
        step = self.checked_step(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            config=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore(),
        )
        restored = self._reading(step, lambda: self.manager.restore(step, args=args))
        return restored["state"], restored["config"], restored["data"]

    def state_keys(self, step: int | None = None) -> tuple[str, ...]:
        """The top-level entries of a saved state: a TrainState's fields, or ("params",) for a
        params-only checkpoint (`save_params`: converted weights)."""
        return tuple(self._state_metadata(step).keys())

    def _state_metadata(self, step: int | None) -> dict:
        """The saved state's tree of array metadata (shape, dtype), read without its arrays."""
        step = self.checked_step(step)
        handler = ocp.PyTreeCheckpointHandler()
        tree = self._reading(step, lambda: handler.metadata(self.directory / str(step) / "state"))
        return getattr(tree, "tree", tree)

    def restore_params(self, step: int | None = None, key: str = "params", target=None):
        """One entry of the saved state (`params` or `ema_params`) without reading the rest.

        A trained state is params + EMA + optimizer moments, about 4x the params: sampling and
        `init_from` read only the entry they use. target: that entry as ShapeDtypeStructs with
        the shardings to restore onto (None: as saved, on this host's first device).
        """
        step = self.checked_step(step)
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

        def read():
            with ocp.PyTreeCheckpointer() as reader:
                return reader.restore(self.directory / str(step) / "state", args=args)

        return self._reading(step, read)[key]

    def restore_config(self, step: int | None = None) -> dict:
        step = self.checked_step(step)
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        return self._reading(step, lambda: self.manager.restore(step, args=args))["config"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._write_manifests()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._write_manifests()
        self.manager.close()


def write_manifest(step_dir) -> None:
    """unclip_manifest.json in a complete step: {relative path: size} of every file in it."""
    step_dir = storage.path(step_dir)
    files = {name: size for name, size in sorted(storage.file_sizes(step_dir).items())
             if name != MANIFEST}  # fmt: skip
    storage.write_text(step_dir / MANIFEST, json.dumps({"files": files}, indent=0) + "\n")


def step_problem(step_dir) -> str | None:
    """What is wrong with a complete step's files (missing, cut short), or None.

    A step saved before manifests existed (or whose save was killed after orbax completed it
    and before the manifest) is checked for its items only; its restore checks the rest."""
    step_dir = storage.path(step_dir)
    if not step_dir.is_dir():
        return "its folder is missing"
    missing = [item for item in ITEMS if not (step_dir / item).is_dir()]
    if missing:
        return f"no {', '.join(missing)} in it"
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    absent, short = [], []
    present = storage.file_sizes(step_dir)
    for name, size in files.items():
        if name not in present:
            absent.append(name)
        elif present[name] != size:
            short.append(f"{name} is {present[name]} of {size} bytes")
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        return f"{len(absent)} of its {len(files)} files are missing: {absent[0]}{more}"
    if short:
        more = f" (and {len(short) - 1} more files)" if len(short) > 1 else ""
        return short[0] + more
    return None


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

    _, folder, named = split_run_path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no run at {path} (expected a workdir with checkpoints/)")
    step = named if step is None else step
    ckpt = Checkpointer(folder, enable_async=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {folder}")
        step = ckpt.checked_step(step)
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

    workdir = storage.path(workdir)
    as_dict = json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)
    ckpt = Checkpointer(workdir / "checkpoints", enable_async=False)
    try:
        ckpt.save(step, {"params": params}, config=as_dict, data_state={}, force=True)
    finally:
        ckpt.close()
    return workdir
