"""What every builder of ours shares: `array_record` output and no TensorFlow anywhere.

tfds writes `tfrecord` by default and reads it back through TensorFlow; `array_record` is written
and read (`tfds.data_source`, `builder.as_data_source`) with NumPy only. Images must reach tfds as
PIL images or encoded bytes: encoding NumPy images would need TensorFlow.
"""

from __future__ import annotations

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
