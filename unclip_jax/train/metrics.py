"""Where the training loop's numbers and pictures go: JSONL, TensorBoard, a progress bar, PNGs.

Only process 0 writes; on the other processes every writer is a no-op, so the loop calls them
unconditionally. Files in the workdir:

    metrics.jsonl         one JSON object per log step: {"step", "loss", ...}
    eval_metrics.jsonl    one per evaluation: {"step", "eval_loss", "eval_ema_loss", ...}
    sample_metrics.jsonl  numbers some sample grids come with: {"step", "sample_top1", ...}
    compile.json          the train step's compile time and memory analysis
    tensorboard/          event files (tensorboardX, no TensorFlow): train/*, eval/*, compile/*,
                          samples
    samples/step_XXXXXX.png   sample grids from the EMA params

In a gs:// workdir the JSONL files are rewritten whole on each record (`storage.append_line`), and
TensorBoard writes its event files to the folder's local mirror, uploaded at most every
TB_UPLOAD_S seconds and at close (tensorboardX's own GCS writer re-uploads from its destructor,
at interpreter exit, and retries for two minutes when the bucket is gone).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time

from unclip_jax import imaging, storage

log = logging.getLogger(__name__)

TB_UPLOAD_S = 60.0


class MetricWriter:
    """JSONL (always) and TensorBoard (if `tensorboard` and tensorboardX imports) on process 0."""

    def __init__(self, workdir: pathlib.Path, *, enabled: bool, tensorboard: bool = True):
        self.workdir, self.enabled = storage.path(workdir), enabled
        self._tb = None
        tb_dir = self.workdir / "tensorboard"
        self._tb_remote = tb_dir if storage.is_remote(tb_dir) else None
        self._tb_uploaded = time.monotonic()
        self._tb_local = None  # where the event files are written (a local mirror for gs://)
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: metrics go to JSONL only")
            else:
                local = storage.local_mirror(tb_dir) if self._tb_remote else tb_dir
                self._tb = SummaryWriter(logdir=str(local))
                self._tb_local = pathlib.Path(local)

    def scalars(self, step: int, values: dict, *, split: str = "train") -> None:
        """One record: metrics.jsonl (split "train") or <split>_metrics.jsonl, tags split/key."""
        if not self.enabled:
            return
        name = "metrics.jsonl" if split == "train" else f"{split}_metrics.jsonl"
        storage.append_line(self.workdir / name, json.dumps({"step": int(step), **values}))
        if self._tb is not None:
            for key, value in values.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{key}", value, int(step))
            if self._tb_remote and time.monotonic() - self._tb_uploaded > TB_UPLOAD_S:
                self.flush()

    def event(self, step: int, event: str, **details) -> None:
        """A record that is not a measurement (a damaged checkpoint set aside, ...) in
        metrics.jsonl: {"step", "event", ...details}; readers of losses skip it by its key."""
        if self.enabled:
            storage.append_line(
                self.workdir / "metrics.jsonl",
                json.dumps({"step": int(step), "event": event, **details}),
            )

    def compile_stats(self, step: int, seconds: float, compiled) -> dict:
        """Compile time and memory analysis of the compiled step -> compile.json (+ TensorBoard)."""
        stats = {"step": int(step), "compile_s": round(seconds, 3), **memory_stats(compiled)}
        sizes = ", ".join(f"{k} {v:.1f}" for k, v in stats.items() if k.endswith("_mib"))
        log.info("train step: lowered and compiled in %.1f s; %s", seconds, sizes)
        if self.enabled:
            storage.write_text(self.workdir / "compile.json", json.dumps(stats, indent=1) + "\n")
            if self._tb is not None:
                for key, value in stats.items():
                    if key != "step":
                        self._tb.add_scalar(f"compile/{key}", value, int(step))
        return stats

    def image_grid(self, step: int, images, ncol: int | None = None) -> pathlib.Path | None:
        """images [N, H, W, 3] in [-1, 1] -> samples/step_XXXXXX.png, `ncol` columns (default
        about square), and TensorBoard."""
        if not self.enabled:
            return None
        grid = imaging.make_grid(images, ncol)
        path = self.workdir / "samples" / f"step_{int(step):06d}.png"
        imaging.save_png(grid, path)
        if self._tb is not None:
            self._tb.add_image("samples", grid, int(step), dataformats="HWC")
        log.info("wrote %s", path)
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._upload_tensorboard()

    def _upload_tensorboard(self) -> None:
        if self._tb_remote is not None:
            storage.publish(self._tb_local, self._tb_remote)
            self._tb_uploaded = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._upload_tensorboard()
            self._tb = None


def memory_stats(compiled) -> dict:
    """MiB of arguments, outputs, temporaries and generated code of a compiled executable."""
    try:
        memory = compiled.memory_analysis()
    except (AttributeError, NotImplementedError):  # not every backend reports it
        return {}
    if memory is None:
        return {}
    fields = {"argument_mib": "argument_size_in_bytes", "output_mib": "output_size_in_bytes",
              "temp_mib": "temp_size_in_bytes", "alias_mib": "alias_size_in_bytes",
              "code_mib": "generated_code_size_in_bytes"}  # fmt: skip
    return {k: getattr(memory, f) / 2**20 for k, f in fields.items() if hasattr(memory, f)}


class Progress:
    """A tqdm bar over the steps on process 0 (on a terminal); nothing elsewhere."""

    def __init__(self, start: int, total: int, *, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            # disable=None: shown on a terminal, silent in batch logs.
            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                             disable=None)  # fmt: skip

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
