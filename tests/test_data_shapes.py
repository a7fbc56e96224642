"""The shapes dataset: the specification of issue 5 checked on ground truth and pixels, held-out
combinations, byte-identical builds and reading back through tfds without TensorFlow."""

import hashlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from unclip_jax.data import shapes, shapes_builder

N = 300  # examples per split checked directly


def _examples(split, n=N):
    return [shapes.render_example(split, i) for i in range(n)]


@pytest.fixture(scope="module")
def examples():
    return {split: _examples(split) for split in shapes.SPLITS}


def test_pure_function_of_split_and_index():
    a, b = shapes.render_example("train", 7), shapes.render_example("train", 7)
    assert a.caption == b.caption and np.array_equal(a.image, b.image) and a.png() == b.png()
    assert not np.array_equal(a.image, shapes.render_example("validation", 7).image)
    # Pinned: the pixels of the first examples must never change (they define version 1.0.0).
    digest = hashlib.sha256(
        b"".join(shapes.render_example("train", i).image.tobytes() for i in range(20))
    ).hexdigest()
    assert digest == PINNED_DIGEST
    with pytest.raises(ValueError, match="unknown shapes split"):
        shapes.render_example("test", 0)
    with pytest.raises(ValueError, match="non-negative"):
        shapes.render_example("train", -1)


def test_held_out_combinations(examples):
    for split in ("train", "validation"):
        for ex in examples[split]:
            assert all((o.color, o.shape) not in shapes.HELD_OUT for o in ex.objects)
    for ex in examples["test_compositional"]:
        assert any((o.color, o.shape) in shapes.HELD_OUT for o in ex.objects)
    # Both sizes, both counts, every relation and every template actually occur.
    train = examples["train"]
    assert {len(e.objects) for e in train} == {1, 2}
    assert {e.relation for e in train} == set(shapes.RELATIONS)
    assert {e.template for e in train} == {
        (form, i) for form, ts in shapes.TEMPLATES.items() for i in range(len(ts))
    }


def test_geometry(examples):
    for ex in (e for split in examples.values() for e in split):
        for o in ex.objects:
            x0, y0, x1, y1 = o.box
            low, high = shapes.SIZE_RANGES[o.size_class]
            assert low <= o.size <= high and x1 - x0 == y1 - y0 == o.size
            assert x0 >= 2 and y0 >= 2 and x1 <= 62 and y1 <= 62  # 2 px margin
            assert o.color in shapes.COLORS and o.shape in shapes.SHAPES
        if len(ex.objects) == 2:
            a, b = ex.objects
            assert a.color != b.color
            assert shapes.relation_holds(a, b, ex.relation)
            # Symmetric: b stands in the inverse relation to a; and no other relation holds.
            assert shapes.relation_holds(b, a, shapes.INVERSE_RELATION[ex.relation])
            others = set(shapes.RELATIONS[1:]) - {ex.relation}
            assert not any(shapes.relation_holds(a, b, r) for r in others)
            # Boxes are disjoint (the relation gap already implies it; checked independently).
            ax0, ay0, ax1, ay1 = a.box
            bx0, by0, bx1, by1 = b.box
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_pixels_match_ground_truth(examples):
    for ex in examples["train"][:100] + examples["test_compositional"][:100]:
        image = ex.image
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        painted = np.zeros((64, 64), bool)
        for o in ex.objects:
            x0, y0, x1, y1 = o.box
            mine = np.all(image == shapes.COLORS[o.color], axis=-1)
            # Every pixel of the object's colour lies in its box; none in the margin.
            ys, xs = np.nonzero(mine)
            assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1
            assert np.array_equal(mine[y0:y1, x0:x1], shapes.shape_mask(o.shape, o.size))
            painted |= mine
        # Only background elsewhere: no anti-aliased in-between colours.
        assert np.all(image[~painted] == shapes.BACKGROUND)


def test_shape_geometry():
    square, circle, triangle = (shapes.shape_mask(s, 20) for s in ("square", "circle", "triangle"))
    assert square.all()
    # Circle: diameter = size along the middle row/column; area close to pi r^2.
    assert circle[10].sum() == 20 and circle[:, 10].sum() == 20
    assert abs(circle.sum() - np.pi * 100) < 20
    # Triangle pointing up: base = height = size, widening by one pixel per row on average.
    assert triangle[-1].sum() == 20 and triangle[0].sum() == 2 and triangle.any(axis=1).all()
    assert np.all(np.diff(triangle.sum(axis=1)) >= 0)
    assert np.array_equal(triangle, triangle[:, ::-1])  # isosceles
    for size in range(10, 27):  # every size: the shapes fill their box's extent exactly
        for name in shapes.SHAPES:
            mask = shapes.shape_mask(name, size)
            assert mask.any(axis=0).all() and mask.any(axis=1).all(), (name, size)


def test_captions_match_ground_truth(examples):
    color = "|".join(shapes.COLORS)
    shape = "|".join(shapes.SHAPES)
    rel = "|".join(shapes.RELATIONS[1:])
    for ex in (e for split in examples.values() for e in split):
        objs = ex.objects
        if len(objs) == 1:
            (o,) = objs
            m = re.fullmatch(
                rf"(?:a|a picture of a|one|a single|an image of a) (?:(small|large) )?"
                rf"({color}) ({shape})(?: on a gray background)?",
                ex.caption,
            )
            assert m, ex.caption
            assert m.group(2) == o.color and m.group(3) == o.shape
            assert m.group(1) in (None, o.size_class)
        else:
            m = re.fullmatch(
                rf"(?:there is )?a ({color}) ({shape}) ({rel}) a ({color}) ({shape})", ex.caption
            )
            assert m, ex.caption
            first, second = ((objs[0], objs[1]), (objs[1], objs[0]))[ex.template[1] == 2]
            assert (m.group(1), m.group(2)) == (first.color, first.shape)
            assert (m.group(4), m.group(5)) == (second.color, second.shape)
            assert shapes.relation_holds(first, second, m.group(3))


def _data_files(builder):
    files = sorted(p for p in builder.data_path.iterdir() if ".array_record-" in p.name)
    return {p.name: p.read_bytes() for p in files}


def test_builder_identical_bytes_and_reads_back(tmp_path):
    sizes = dict(train=40, validation=8, test_compositional=8)
    first = shapes_builder.build_shapes(str(tmp_path / "a"), **sizes)
    second = shapes_builder.build_shapes(str(tmp_path / "b"), **sizes)
    files = _data_files(first)
    assert len(files) == 3 and files == _data_files(second)

    source = tfds.data_source(f"shapes/{first.builder_config.name}", data_dir=str(tmp_path / "a"))
    assert {split: len(source[split]) for split in shapes.SPLITS} == sizes
    for split in shapes.SPLITS:
        indices = set()
        for i in range(len(source[split])):
            record = source[split][i]
            ex = shapes.render_example(split, int(record["index"]))
            indices.add(int(record["index"]))
            assert np.array_equal(record["image"], ex.image)
            assert record["caption"].decode() == ex.caption
            objects, relation = shapes_builder.decode_ground_truth(record)
            assert tuple(objects) == ex.objects and relation == ex.relation
        assert indices == set(range(sizes[split]))


def test_config_errors():
    with pytest.raises(ValueError, match="positive example count"):
        shapes_builder.ShapesConfig(name="x", train=0)
    with pytest.raises(ValueError, match="array_record"):
        shapes_builder.ShapesBuilder(data_dir="/tmp", config="tiny", file_format="tfrecord")


PINNED_DIGEST = "3eafd30eae66e7b3d31165bbcfaacfc96d675e094af059c24076db8a003a4fa2"
