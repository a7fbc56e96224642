"""The training input: a grain loader over a tfds data source, sharded per JAX process.

    source = shapes_builder.build_shapes(data_dir, "tiny").as_data_source("train")
    loader = make_loader(source, global_batch=64, seed=0, image_size=64)
    it = iter(loader)
    batch = next(it)   # {"image": [64 / P, 64, 64, 3] float32, "caption": [64 / P] str}
    state = it.get_state()   # bytes, saved with the checkpoint; it.set_state(state) resumes
    arrays = to_global(batch, batch_sharding(mesh))   # global jax.Arrays over data x fsdp

Each of the P processes reads its own contiguous 1/P of the records (grain `ShardOptions`,
`drop_remainder=True`, so every process yields the same number of batches and none waits in a
collective for another that ran out), shuffled with `seed` anew every epoch, batched to
`global_batch // P`. Per-example randomness (random crops) comes from grain's per-record rng,
seeded by (seed, position in the stream), so a resumed iterator reproduces it too.

Examples become {"image": [S, S, 3] float32 in [-1, 1], "caption": str} plus the integer features
of the source listed in `extra_keys` (e.g. `index` of shapes). Captions stay strings: tokenising is
the next step's business.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from unclip_jax.data import transforms


def host_batch_size(global_batch: int, process_count: int) -> int:
    """global_batch // process_count, which must divide exactly."""
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"global batch {global_batch} must be a positive multiple of the process count "
            f"{process_count}"
        )
    return global_batch // process_count


@dataclasses.dataclass(frozen=True)
class DecodeExample(grain.transforms.Map):
    """A tfds record -> {"image": [S, S, 3] float32 in [-1, 1], "caption": str, *extra_keys}.

    The image may arrive decoded ([H, W, 3] uint8, as `tfds` data sources return it) or as encoded
    bytes; it is resized (shorter side) and centre-cropped to `image_size` unless None.
    """

    image_size: int | None = None
    extra_keys: tuple[str, ...] = ()

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        image = transforms.decode_image(record["image"])
        if self.image_size is not None:
            image = transforms.resize_center_crop(image, self.image_size)
        caption = record["caption"]
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8", errors="replace")
        out = {"image": transforms.to_float(image), "caption": str(caption)}
        for key in self.extra_keys:
            out[key] = np.asarray(record[key])
        return out


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
    """A random `size` x `size` crop of the decoded image, from grain's per-record rng."""

    size: int

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return {**example, "image": transforms.random_crop_np(rng, example["image"], self.size)}


def make_loader(
    source: Sequence,
    *,
    global_batch: int,
    seed: int,
    image_size: int | None = None,
    crop_size: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    extra_keys: Sequence[str] = (),
    operations: Sequence[grain.transforms.Map | grain.transforms.RandomMap] = (),
) -> grain.DataLoader:
    """A grain DataLoader yielding this process's host batches of `source`.

    Args:
      source: a random-access source (`tfds.data_source(...)[split]`, `builder.as_data_source`).
      global_batch: examples per step over all processes; each process yields
        global_batch // process_count of them (the last partial batch of an epoch is dropped).
      seed: shuffling and per-example randomness (a positive 32-bit integer).
      image_size: resize + centre-crop target (None: the source's images must already agree).
      crop_size: then a random crop of this size (the upsamplers' crops, `transforms.crop_size`).
      num_epochs: None repeats forever.
      process_index, process_count: this process's shard; None takes `jax.process_index()` and
        `jax.process_count()` (grain's `ShardByJaxProcess`). Tests pass them to simulate hosts.
      worker_count: grain worker processes (0: in this process; >0 needs a `__main__` guard).
      extra_keys: further (numeric) features of the source to keep, e.g. ("index",).
      operations: further grain transforms, applied per example before batching.
    """
    ops: list = [DecodeExample(image_size=image_size, extra_keys=tuple(extra_keys))]
    if crop_size is not None:
        ops.append(RandomCrop(crop_size))
    return sharded_loader(source, [*ops, *operations], global_batch=global_batch, seed=seed,
                          shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                          process_count=process_count, worker_count=worker_count)  # fmt: skip


def sharded_loader(source: Sequence, operations: Sequence, *, global_batch: int, seed: int,
                   shuffle: bool = True, num_epochs: int | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   worker_count: int = 0, read_options=None) -> grain.DataLoader:  # fmt: skip
    """The grain DataLoader every loader shares: this process's contiguous 1/P of the records
    (`drop_remainder`, so all hosts yield the same number of steps), reshuffled every epoch from
    `seed`, `operations` per example, then batches of global_batch // P."""
    if (process_index is None) != (process_count is None):
        raise ValueError("pass both process_index and process_count, or neither")
    if process_index is None:
        shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    else:
        shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
    batch = host_batch_size(global_batch, shard.shard_count)
    num_records = len(source)
    if num_records // shard.shard_count < batch:
        raise ValueError(
            f"{num_records} records over {shard.shard_count} processes cannot fill one host batch "
            f"of {batch}"
        )
    sampler = grain.samplers.IndexSampler(
        num_records=num_records,
        shard_options=shard,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    ops = [*operations, grain.transforms.Batch(batch_size=batch, drop_remainder=True)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                            worker_count=worker_count, read_options=read_options)  # fmt: skip


def batch_sharding(mesh: jax.sharding.Mesh, batch_axes: Sequence[str] = ("data", "fsdp")):
    """Batch dimension split over `batch_axes` of `mesh` (those it has), the rest replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def to_global(batch: dict[str, Any], sharding: NamedSharding) -> dict[str, Any]:
    """Host batch -> global jax.Arrays (`make_array_from_process_local_data`), for numeric leaves.

    Every process passes its own host batch; the global batch dimension is process_count times
    the host one. String leaves (captions) stay host NumPy arrays: they are tokenised first.
    """

    def put(x):
        x = np.asarray(x)
        if x.dtype.kind in "USO":
            return x
        return jax.make_array_from_process_local_data(sharding, x)

    return {k: put(v) for k, v in batch.items()}


class GrainBatches:
    """An iterator over a grain DataLoader whose position is a JSON-able dict (the grain
    iterator's state bytes, base64): what the training checkpoint stores to resume the data."""

    def __init__(self, loader: grain.DataLoader):
        self._iterator = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in next(self._iterator).items()}

    def get_state(self) -> dict:
        import base64

        state = self._iterator.get_state()
        if isinstance(state, str):
            state = state.encode()
        return {"grain": base64.b64encode(state).decode("ascii")}

    def set_state(self, state: dict) -> None:
        import base64

        self._iterator.set_state(base64.b64decode(state["grain"]))


class TokenizedBatches(GrainBatches):
    """Host batches of a loader with captions tokenised GLIDE-style, and a JSON-able state.

    Yields {"image": [b, S, S, 3] float32, "tokens": [b, L] int32, "mask": [b, L] bool}.
    `get_state()`/`set_state()` wrap the grain iterator's state (bytes, base64 in JSON) so the
    training checkpoint resumes the data order.
    """

    def __init__(self, loader: grain.DataLoader, tokenizer, text_ctx: int, pad_id: int):
        super().__init__(loader)
        self.tokenizer, self.text_ctx, self.pad_id = tokenizer, text_ctx, pad_id
        self._warned = False

    def __next__(self) -> dict[str, np.ndarray]:
        from unclip_jax.tokenizers import glide_tokenize

        batch = next(self._iterator)
        captions = [str(c) for c in batch["caption"]]
        tokens, mask = glide_tokenize(self.tokenizer, captions, self.text_ctx, self.pad_id,
                                      warn=False)  # fmt: skip
        if not self._warned and mask[:, -1].any():
            logging.getLogger(__name__).warning(
                "captions longer than the model's %d-token context are truncated", self.text_ctx
            )
            self._warned = True
        return {"image": np.asarray(batch["image"], np.float32), "tokens": tokens, "mask": mask}


class MappedBatches:
    """Host batches of a loader (a grain DataLoader or any iterator with get_state/set_state,
    such as EmbeddingBatches) through `fn`, resumable.

    `fn(batch) -> batch` runs on the host (tokenising, selecting keys, degradations with a NumPy
    rng seeded from the batch); get_state()/set_state() are those of the wrapped iterator, so
    `fn` must be a pure function of the batch for resumes to be exact.
    """

    def __init__(self, batches, fn):
        self._inner = GrainBatches(batches) if isinstance(batches, grain.DataLoader) else batches
        self.fn = fn

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.fn(next(self._inner))

    def get_state(self) -> dict:
        return self._inner.get_state()

    def set_state(self, state: dict) -> None:
        self._inner.set_state(state)
