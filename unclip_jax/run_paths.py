"""Run paths and checkpoint damage, without jax: what the command line needs to read a user's
run path and to report a damaged step (checkpoint.py does the checking)."""

from __future__ import annotations

import pathlib

from unclip_jax import storage


def split_run_path(path) -> tuple[pathlib.Path, pathlib.Path, int | None]:
    """(run folder, checkpoints folder, step or None) of a user's run path.

    Accepted: a run's workdir (holding checkpoints/), its checkpoints/ folder, or one step of it
    (RUN/checkpoints/150): the last selects that step instead of the latest. Local paths are
    pathlib.Paths, gs:// ones epath.Paths (`storage.path`)."""
    path = storage.path(path)
    if path.name.isdigit() and path.is_dir() and not (path / "checkpoints").is_dir():
        folder = path.parent
        step = int(path.name)
    else:
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        step = None
    run = folder.parent if folder.name == "checkpoints" else folder
    return run, folder, step


def run_folder(path) -> pathlib.Path:
    """The run folder (tokenizer/, codec.npz, metrics) of a run path, which may name a step."""
    return split_run_path(path)[0]


class DamagedCheckpoint(ValueError):
    """A checkpoint step that cannot be read: names the run, the step, the problem and the intact
    steps that can be used instead."""

    def __init__(self, directory, step: int, problem: str, intact: list[int]):
        self.directory, self.step, self.problem, self.intact = directory, step, problem, intact
        self.run = run_folder(directory)
        super().__init__(self.describe(f"--step {intact[0]}" if intact else ""))

    def describe(self, step_flag: str) -> str:
        """The one-line report; step_flag: how the user selects another step on their command
        line ("" for none: the path form is given either way)."""
        head = f"run {self.run}: checkpoint step {self.step} is damaged ({self.problem})"
        if not self.intact:
            return f"{head}; no intact step beside it"
        path = storage.path(self.directory) / str(self.intact[0])
        choose = f"{step_flag} or the path {path}" if step_flag else f"the path {path}"
        return f"{head}; intact steps: {', '.join(map(str, self.intact))} (select one: {choose})"


class DamagedCheckpointsOnly(RuntimeError):
    """A run to resume has checkpoints and none of them reads back (all set aside, none
    deleted)."""
