"""What sampling commands write: a grid PNG, one PNG per image and a JSON record of every setting.

The record is enough to reproduce the images: pipeline, runs, prompts, seeds, samplers, step
counts and guidance scales per stage, and the package versions.
"""

from __future__ import annotations

import json
import platform

import jax
import numpy as np

from unclip_jax import storage
from unclip_jax.imaging import make_grid, save_png


def environment() -> dict:
    import flax

    return {"jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
            "backend": jax.default_backend(), "devices": jax.device_count()}  # fmt: skip


def save_samples(out_dir, images, record: dict, *, ncol: int | None = None,
                 stem: str = "sample") -> dict:  # fmt: skip
    """Write out_dir/grid.png, out_dir/images/{stem}_NNN.png and out_dir/record.json.

    images: [B, H, W, 3] in [-1, 1]; out_dir local or gs://... Returns the paths written.
    """
    out = storage.path(out_dir)
    images = np.asarray(images, np.float32)
    if not np.all(np.isfinite(images)):
        bad = int(np.sum(~np.isfinite(images).all(axis=(1, 2, 3))))
        raise ValueError(f"{bad} of {len(images)} samples are not finite; nothing written")
    paths = []
    for i, image in enumerate(images):
        path = out / "images" / f"{stem}_{i:03d}.png"
        save_png(image, path)
        paths.append(str(path))
    grid = out / "grid.png"
    save_png(make_grid(images, ncol), grid)
    record = dict(record, images=paths, grid=str(grid), environment=environment())
    storage.write_text(out / "record.json", json.dumps(record, indent=2, default=_jsonable) + "\n")
    return {"grid": str(grid), "images": paths, "record": str(out / "record.json")}


def _jsonable(value):
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    return str(value)
