"""What every builder of ours shares: `array_record` output and no TensorFlow anywhere.

tfds writes `tfrecord` by default and reads it back through TensorFlow; `array_record` is written
and read (`tfds.data_source`, `builder.as_data_source`) with NumPy only. Images must reach tfds as
PIL images or encoded bytes: encoding NumPy images would need TensorFlow.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

ARRAY_RECORD = "array_record"


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A `GeneratorBasedBuilder` that only writes `array_record` and needs no package layout."""

    # tfds locates a builder's source file to look for a checksums.tsv next to it, through the
    # optional `importlib_resources` package. Ours download nothing: there are no checksums.
    code_path = None

    def __init__(self, *, file_format: str = ARRAY_RECORD, **kwargs):
        if str(file_format) != ARRAY_RECORD:
            raise ValueError(
                f"{type(self).__name__} writes {ARRAY_RECORD!r} only (anything else needs "
                f"TensorFlow to read back), got {file_format!r}"
            )
        super().__init__(file_format=file_format, **kwargs)

    def prepare(self) -> None:
        """Write the dataset if it is not there yet (tfds skips complete builds). tfds' progress
        bars are shown on a terminal only (in a log or a pipe they are lines of noise)."""
        import sys

        if not sys.stderr.isatty():
            tfds.disable_progress_bar()
        self.download_and_prepare(file_format=ARRAY_RECORD)


def prepare_at(make, data_dir, *, after_build=None):
    """`make(data_dir)`'s builder, prepared under `data_dir`, a local folder or a gs:// one.

    array_record files are read and written as local files only (array_record's C++ I/O), so a
    dataset in a bucket is built on local disk and uploaded (dataset_info.json last: tfds treats
    a version folder without it as absent), and read from a local copy under the cache
    (`storage.local_copy`, refreshed when the bucket's copy changes). make: data_dir (str) ->
    an unprepared builder; after_build(builder): files to add beside the data once prepared
    (uploaded with it)."""
    from unclip_jax import storage

    if not storage.is_remote(data_dir):
        builder = make(str(data_dir))
        builder.prepare()
        if after_build is not None:
            after_build(builder)
        return builder
    storage.check_bucket(data_dir)
    local_root = storage.local_mirror(data_dir)
    builder = make(str(local_root))
    version = pathlib.Path(builder.data_dir).relative_to(local_root).as_posix()
    remote = storage.path(data_dir) / version
    if (remote / "dataset_info.json").exists():
        storage.local_copy(remote)
        return make(str(local_root))  # a new builder sees the copied version folder
    builder.prepare()
    if after_build is not None:
        after_build(builder)
    storage.publish(pathlib.Path(builder.data_dir), remote, last=("dataset_info.json",))
    return builder
