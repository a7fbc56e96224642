"""The `image_text` tfds builder: the user's own captioned images, written as `array_record`.

Sources (detected from the path, or named with `source_format=`):
- `folder`: a directory tree of images (.jpg .jpeg .png .webp .bmp .gif), each with a same-named
  `.txt` caption next to it (`cats/001.jpg` + `cats/001.txt`);
- `csv` / `parquet`: a table with a path column and a caption column (`path`, `caption` by default);
  relative paths are resolved against the table's folder;
- `webdataset`: tar shards as img2dataset writes them (`00000.tar` holding `key.jpg` + `key.txt`,
  other members such as `key.json` are ignored): one `.tar` file, or a directory of them.

Every image is fully decoded once while building: unreadable, truncated or corrupt images, images
without a caption and missing files are skipped and counted in the build report (never fatal), which
is saved as `build_report.json` next to the data. Captions are decoded as UTF-8 with replacement and
stripped. Images that are already RGB JPEG or PNG and within `max_size` are stored byte for byte;
the rest are converted to RGB (and shrunk so the longer side is `max_size`, if set) and stored as
PNG. The optional `validation` split takes a stable, hash-chosen fraction of the keys.

    builder, report = build_image_text("/data/my_pairs", data_dir, name="my_pairs")
    source = builder.as_data_source("train")   # {"image": [H, W, 3] uint8, "caption", "key"}
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax import storage
from unclip_jax.data.tfds_utils import ArrayRecordBuilder, prepare_at

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SOURCE_FORMATS = ("folder", "csv", "parquet", "webdataset")
REPORT_FILENAME = "build_report.json"


@dataclasses.dataclass(kw_only=True)
class ImageTextConfig(tfds.core.BuilderConfig):
    """Where the pairs come from and how they are stored. `name` names the dataset on disk."""

    source: str = ""
    source_format: str | None = None  # None: detect from `source`
    path_column: str = "path"
    caption_column: str = "caption"
    validation_fraction: float = 0.0
    max_size: int | None = None  # longer side in pixels; None keeps the original size

    def __post_init__(self):
        if not self.source:
            raise ValueError("ImageTextConfig needs `source`, the path of the user's data")
        if self.source_format is not None and self.source_format not in SOURCE_FORMATS:
            raise ValueError(
                f"unknown source_format {self.source_format!r}; expected one of {SOURCE_FORMATS}"
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"max_size must be positive or None, got {self.max_size}")


@dataclasses.dataclass
class BuildReport:
    """What a build read, wrote and skipped (with the reason for every skipped item)."""

    source: str
    source_format: str
    written: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (key, reason)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def to_json(self) -> str:
        return json.dumps(
            {**dataclasses.asdict(self), "num_skipped": self.num_skipped}, indent=2, sort_keys=True
        )

    @classmethod
    def from_json(cls, text: str) -> BuildReport:
        data = json.loads(text)
        data.pop("num_skipped")
        data["skipped"] = [tuple(s) for s in data["skipped"]]
        return cls(**data)


def detect_format(source: str | os.PathLike) -> str:
    """The source format of a path: a directory of .tar files is webdataset, else by extension."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"image_text source {str(path)!r} does not exist")
    if path.is_dir():
        return "webdataset" if any(path.glob("*.tar")) else "folder"
    suffix = path.suffix.lower()
    formats = {".csv": "csv", ".parquet": "parquet", ".tar": "webdataset"}
    if suffix not in formats:
        raise ValueError(
            f"cannot tell the format of {str(path)!r}: expected a directory, .csv, .parquet or .tar"
        )
    return formats[suffix]


def decode_caption(data: bytes) -> str:
    """UTF-8 with replacement (a stray byte never stops a build), surrounding whitespace removed."""
    return data.decode("utf-8", errors="replace").strip()


def prepare_image(data: bytes, max_size: int | None = None) -> bytes:
    """Encoded image bytes ready for tfds, or ValueError naming what is wrong with them.

    Decodes fully (PIL's lazy `open` alone misses truncated files), keeps RGB JPEG/PNG bytes as they
    are, and re-encodes anything else (other modes or formats, or larger than `max_size`) as PNG.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.load()
            if image.width < 1 or image.height < 1:
                raise ValueError("empty image")
            keep = image_format in ("JPEG", "PNG") and image.mode == "RGB"
            too_big = max_size is not None and max(image.size) > max_size
            if keep and not too_big:
                return data
            image = image.convert("RGB")
            if too_big:
                scale = max_size / max(image.size)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(size, Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"unreadable image: {type(error).__name__}: {error}") from error


# Readers yield (key, image bytes or None, caption bytes or None, reason if unusable).
Pair = tuple[str, bytes | None, bytes | None, str | None]


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _iter_folder(root: Path) -> Iterator[Pair]:
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        key = path.relative_to(root).as_posix()
        caption = _read_file(path.with_suffix(".txt"))
        yield key, _read_file(path), caption, None if caption is not None else "no caption file"


def _iter_table(
    rows: Iterator[dict], base: Path, path_col: str, caption_col: str
) -> Iterator[Pair]:
    for i, row in enumerate(rows):
        if path_col not in row or caption_col not in row:
            raise ValueError(
                f"table needs columns {path_col!r} and {caption_col!r}, has {sorted(row)}"
            )
        rel, caption = row[path_col], row[caption_col]
        key = f"{i:09d}:{rel}"  # row number first: the same file may appear in several rows
        if rel is None or caption is None:
            yield key, None, None, "empty path or caption"
            continue
        data = _read_file(base / str(rel))
        caption = caption if isinstance(caption, bytes) else str(caption).encode("utf-8")
        yield key, data, caption, None if data is not None else f"cannot read {rel}"


def _iter_csv(path: Path, path_col: str, caption_col: str) -> Iterator[Pair]:
    # utf-8-sig: spreadsheets often write a byte-order mark that would rename the first column.
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
        yield from _iter_table(csv.DictReader(f), path.parent, path_col, caption_col)


def _iter_parquet(path: Path, path_col: str, caption_col: str) -> Iterator[Pair]:
    import pyarrow.parquet as pq  # only parquet sources need pyarrow

    table = pq.read_table(path)
    missing = {path_col, caption_col} - set(table.column_names)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}; has {table.column_names}")
    rows = table.select([path_col, caption_col]).to_pylist()
    yield from _iter_table(iter(rows), path.parent, path_col, caption_col)


def _iter_tar(path: Path) -> Iterator[Pair]:
    """img2dataset shards: members `key.ext`, grouped by key within each shard."""
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    for shard in shards:
        groups: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    stem, ext = os.path.splitext(member.name)
                    ext = ext.lower()
                    if ext in IMAGE_EXTENSIONS or ext == ".txt":
                        groups.setdefault(stem, {})[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as error:
            # A broken shard loses what could not be read, not the whole build.
            yield f"{shard.name}", None, None, f"unreadable shard: {error}"
        for stem in sorted(groups):
            members = groups[stem]
            key = f"{shard.stem}/{stem}"
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            caption = members.get(".txt")
            reason = None if image is not None else "no image member"
            reason = reason or (None if caption is not None else "no .txt member")
            yield key, image, caption, reason


def iter_pairs(config: ImageTextConfig) -> tuple[str, Iterator[Pair]]:
    """(format, pairs) of a config's source, in a stable order."""
    source = Path(config.source)
    fmt = config.source_format or detect_format(source)
    if fmt == "folder":
        return fmt, _iter_folder(source)
    if fmt == "csv":
        return fmt, _iter_csv(source, config.path_column, config.caption_column)
    if fmt == "parquet":
        return fmt, _iter_parquet(source, config.path_column, config.caption_column)
    return fmt, _iter_tar(source)


def split_of(key: str, validation_fraction: float) -> str:
    """`validation` for a stable hash-chosen fraction of keys, else `train`."""
    if validation_fraction <= 0:
        return "train"
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2.0**64
    return "validation" if u < validation_fraction else "train"


class ImageTextBuilder(ArrayRecordBuilder):
    """tfds builder registered as `image_text`; one config (named by the user) per dataset."""

    name = "image_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Folders, CSV/parquet tables and webdataset tar shards."}

    def __init__(self, *, config: ImageTextConfig, **kwargs):
        super().__init__(config=config, **kwargs)
        self.report: BuildReport | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Variable size; JPEG or PNG bytes as stored (decoded to uint8 on reading).
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "caption": tfds.features.Text(),
                    "key": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        config: ImageTextConfig = self.builder_config
        fmt = config.source_format or detect_format(config.source)
        self.report = BuildReport(source=str(config.source), source_format=fmt)
        splits = ["train"] + (["validation"] if config.validation_fraction > 0 else [])
        return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split: str):
        """Streams the source once per split; an item is decoded (and reported) in its own split."""
        config: ImageTextConfig = self.builder_config
        _, pairs = iter_pairs(config)
        written = 0
        for key, image, caption, reason in pairs:
            if split_of(key, config.validation_fraction) != split:
                continue
            if reason is None:
                try:
                    image = prepare_image(image, config.max_size)
                except ValueError as error:
                    reason = str(error)
            if reason is not None:
                self.report.skipped.append((key, reason))
                continue
            written += 1
            yield key, {"image": image, "caption": decode_caption(caption), "key": key}
        self.report.written[split] = written
        if written == 0:
            skipped = [s for s in self.report.skipped if split_of(s[0], config.validation_fraction)
                       == split]  # fmt: skip
            first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
            raise ValueError(
                f"no usable image-caption pairs for split {split!r} in {config.source}: "
                f"{len(skipped)} items skipped{first}"
            )
        if self.report.skipped:
            log.warning(
                "image_text %s: skipped %d items so far (see %s)",
                split,
                self.report.num_skipped,
                REPORT_FILENAME,
            )


def build_image_text(
    source: str | os.PathLike, data_dir: str | os.PathLike, name: str = "default", **options
) -> tuple[ImageTextBuilder, BuildReport]:
    """Build (or reuse) the `image_text/<name>` dataset of `source` under `data_dir`.

    `options` are further `ImageTextConfig` fields (source_format, path_column, caption_column,
    validation_fraction, max_size). Returns the builder and the build report (read back from disk
    when the dataset was already built).
    """
    if storage.is_remote(source):  # read from a local copy (refreshed when the bucket's changes)
        source = storage.local_copy(source)
    config = ImageTextConfig(name=name, source=str(source), **options)
    fmt = config.source_format or detect_format(source)  # names a missing source
    if fmt == "folder" and not any(
        p.suffix.lower() in IMAGE_EXTENSIONS for p in Path(source).rglob("*")
    ):
        raise ValueError(f"image_text source {source} holds no image files "
                         f"({', '.join(sorted(IMAGE_EXTENSIONS))})")  # fmt: skip
    # A build that fails (nothing usable in the source) leaves no folders of its own behind.
    local = storage.local_mirror(data_dir) if storage.is_remote(data_dir) else Path(data_dir)
    ours = [d for d in (local / "downloads", local / "image_text" / name,
                        local / "image_text", local) if not d.exists()]  # fmt: skip

    def write_report(built: ImageTextBuilder) -> None:  # before a bucket's copy is uploaded
        if built.report is not None:
            (Path(built.data_dir) / REPORT_FILENAME).write_text(built.report.to_json())

    try:
        builder = prepare_at(lambda folder: ImageTextBuilder(data_dir=folder, config=config),
                             data_dir, after_build=write_report)  # fmt: skip
    except BaseException:
        for folder in ours:  # deepest first; only folders this call created
            shutil.rmtree(folder, ignore_errors=True)
        raise
    report_path = Path(builder.data_dir) / REPORT_FILENAME
    if builder.report is not None:  # built just now
        return builder, builder.report
    if report_path.exists():
        return builder, BuildReport.from_json(report_path.read_text())
    raise FileNotFoundError(f"{report_path} is missing: was this dataset built by this module?")
