"""The grain loader: per-process shards, seeded shuffling, resumable state, global arrays; and the
transforms (shapes and statistics)."""

import jax
import numpy as np
import pytest

from unclip_jax.data import loader, shapes_builder, transforms
from unclip_jax.parallel import create_mesh


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    builder = shapes_builder.build_shapes(
        str(tmp_path_factory.mktemp("tfds")), train=64, validation=4, test_compositional=4
    )
    return builder.as_data_source("train")


def _take(it, n):
    return [next(it) for _ in range(n)]


def _loader(source, **kw):
    kw = {"global_batch": 8, "seed": 3, "extra_keys": ("index",), **kw}
    return loader.make_loader(source, **kw)


def test_batches(source):
    batch = next(iter(_loader(source, process_index=0, process_count=1)))
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["caption"].shape == (8,) and isinstance(batch["caption"][0], str)
    # The loader's image is the rendered one, scaled to [-1, 1].
    ex = shapes_builder.shapes.render_example("train", int(batch["index"][0]))
    np.testing.assert_array_equal(batch["image"][0], transforms.to_float(ex.image))
    assert batch["caption"][0] == ex.caption
    cropped = next(
        iter(_loader(source, image_size=32, crop_size=8, process_index=0, process_count=1))
    )
    assert cropped["image"].shape == (8, 8, 8, 3)


def test_process_shards_disjoint_and_cover_global_batch(source):
    steps = 16  # two epochs: 64 records, 2 processes x 4 per step -> 8 steps per epoch
    hosts = [
        _take(iter(_loader(source, process_index=p, process_count=2)), steps) for p in range(2)
    ]
    for step in range(steps):
        a, b = (hosts[p][step]["index"] for p in range(2))
        assert len(a) == len(b) == 4
        assert len(set(np.concatenate([a, b]))) == 8  # disjoint: 8 distinct examples per step
    for epoch in range(2):
        # The process shards are fixed halves of the records, and each epoch both together
        # cover every record exactly once.
        seen = [
            np.concatenate([hosts[p][s]["index"] for s in range(8 * epoch, 8 * epoch + 8)])
            for p in range(2)
        ]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(np.concatenate(seen)) == list(range(64))
    with pytest.raises(ValueError, match="multiple of the process count"):
        _loader(source, global_batch=6, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="both process_index and process_count"):
        _loader(source, process_index=0)


def test_shuffling_is_seed_deterministic(source):
    def order(seed):
        it = iter(_loader(source, seed=seed, process_index=0, process_count=1))
        return np.concatenate([b["index"] for b in _take(it, 8)])

    first = order(3)
    np.testing.assert_array_equal(first, order(3))
    assert not np.array_equal(first, order(4))
    assert sorted(first) == list(range(64))  # one epoch, every record once
    assert not np.array_equal(first, np.arange(64))


def test_iterator_state_round_trip(source):
    kw = {"process_index": 1, "process_count": 2, "image_size": 32, "crop_size": 16}
    it = iter(_loader(source, **kw))
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 6)  # crosses the epoch boundary (8 steps per epoch per process)
    resumed = iter(_loader(source, **kw))
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 6), strict=True):
        np.testing.assert_array_equal(want["index"], got["index"])
        np.testing.assert_array_equal(want["image"], got["image"])  # random crops included
        np.testing.assert_array_equal(want["caption"], got["caption"])


def test_to_global(source):
    mesh = create_mesh((("data", -1), ("fsdp", 2)))
    sharding = loader.batch_sharding(mesh)
    batch = next(iter(_loader(source, process_index=0, process_count=1)))
    arrays = loader.to_global(batch, sharding)
    assert isinstance(arrays["image"], jax.Array) and arrays["image"].shape == (8, 64, 64, 3)
    assert arrays["image"].sharding == sharding and len(arrays["image"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(arrays["image"]), batch["image"])
    assert isinstance(arrays["caption"], np.ndarray)  # strings stay on the host
