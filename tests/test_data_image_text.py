"""The image_text builder: folders, CSV, parquet, tar shards; corrupt images skipped, reported."""

import csv
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import image_text


def _jpeg(seed: int, size=(20, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _corrupt_jpeg() -> bytes:
    return _jpeg(99)[:60]  # a JPEG header with the data cut off


CAPTIONS = ["a red cat", "caf\u00e9 au lait", "two dogs"]


def _records(source):
    return sorted(
        (r["key"].decode(), r["caption"].decode(), r["image"].shape)
        for r in (source[i] for i in range(len(source)))
    )


def test_folder_with_corrupt_jpeg(tmp_path):
    root = tmp_path / "pairs"
    (root / "sub").mkdir(parents=True)
    for i, caption in enumerate(CAPTIONS):
        (root / "sub" / f"{i}.jpg").write_bytes(_jpeg(i))
        (root / "sub" / f"{i}.txt").write_text(caption + "\n", encoding="utf-8")
    (root / "bad.jpg").write_bytes(_corrupt_jpeg())
    (root / "bad.txt").write_text("never seen")
    (root / "nocaption.png").write_bytes(_jpeg(5))
    # Invalid UTF-8 is replaced, not fatal.
    (root / "latin.jpg").write_bytes(_jpeg(6))
    (root / "latin.txt").write_bytes(b"na\xefve")

    builder, report = image_text.build_image_text(root, tmp_path / "tfds", name="folder")
    assert report.source_format == "folder"
    assert report.written == {"train": 4}
    assert dict(report.skipped).keys() == {"bad.jpg", "nocaption.png"}
    assert "unreadable image" in dict(report.skipped)["bad.jpg"]
    records = _records(builder.as_data_source("train"))
    assert records == [
        ("latin.jpg", "na\ufffdve", (16, 20, 3)),
        ("sub/0.jpg", "a red cat", (16, 20, 3)),
        ("sub/1.jpg", "caf\u00e9 au lait", (16, 20, 3)),
        ("sub/2.jpg", "two dogs", (16, 20, 3)),
    ]
    # The report is saved next to the data and read back when the dataset is reused.
    _, again = image_text.build_image_text(root, tmp_path / "tfds", name="folder")
    assert again == report


def test_csv_and_parquet(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i, caption in enumerate(CAPTIONS):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(i, size=(40, 30)))
        rows.append({"path": f"img/{i}.jpg", "caption": caption})
    rows.append({"path": "img/missing.jpg", "caption": "gone"})
    with (tmp_path / "pairs.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["path", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    builder, report = image_text.build_image_text(
        tmp_path / "pairs.csv", tmp_path / "tfds", name="csv", max_size=20
    )
    assert report.written == {"train": 3} and report.num_skipped == 1
    records = _records(builder.as_data_source("train"))
    assert [r[1] for r in records] == CAPTIONS
    assert all(r[2] == (15, 20, 3) for r in records)  # shrunk to a longer side of 20

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    builder, report = image_text.build_image_text(
        tmp_path / "pairs.parquet", tmp_path / "tfds", name="parquet"
    )
    assert report.source_format == "parquet" and report.written == {"train": 3}
    assert [r[1] for r in _records(builder.as_data_source("train"))] == CAPTIONS


def test_tar_shard_with_corrupt_jpeg_and_validation_split(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    members = {}
    for i in range(12):
        members[f"{i:09d}.jpg"] = _jpeg(i) if i != 3 else _corrupt_jpeg()
        members[f"{i:09d}.txt"] = f"caption {i}".encode()
        members[f"{i:09d}.json"] = b"{}"  # img2dataset metadata: ignored
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    builder, report = image_text.build_image_text(
        shards, tmp_path / "tfds", name="wds", validation_fraction=0.3
    )
    assert report.source_format == "webdataset"
    assert report.skipped == [("00000/000000003", report.skipped[0][1])]
    assert sum(report.written.values()) == 11 and set(report.written) == {"train", "validation"}
    keys = {
        split: {r[0] for r in _records(builder.as_data_source(split))}
        for split in ("train", "validation")
    }
    assert not keys["train"] & keys["validation"]
    assert len(keys["train"] | keys["validation"]) == 11


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_text.build_image_text(tmp_path / "nope", tmp_path / "tfds")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot tell the format"):
        image_text.build_image_text(tmp_path / "x.json", tmp_path / "tfds")
    with pytest.raises(ValueError, match="validation_fraction"):
        image_text.ImageTextConfig(name="x", source="y", validation_fraction=1.5)
