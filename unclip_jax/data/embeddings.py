"""CLIP embeddings as data (issue 6): embed a dataset once, train the prior and decoder on it.

    report = embed_dataset(builder, "train", model, params, tokenizer, out_dir, batch_size=256)
    source = embedding_source(out_dir, "train")   # tfds data source, record i = source index i
    batches = make_embedding_loader(JoinedSource(source, builder.as_data_source("train")),
                                    global_batch=64, seed=0, image_size=64)
    stats = load_stats(out_dir, "train")  # Karlo's clip_mean / clip_std, the AR prior's z_i.z_t

`out_dir` is one tfds dataset folder (`tfds.builder_from_directory(out_dir)` reads it), named
`clip_embeddings`, written as `array_record`. Features of a record:

    index        int64          the record's position in the source split's data source
                                (tfds shuffles when it builds: not shapes' own `index`)
    caption      text
    image_emb    float32 [D]    projected image embedding (CLIP's image_embeds), NOT normalised
    text_emb     float32 [D]    projected end-of-text feature (text_embeds), NOT normalised, as
                                transformers' *WithProjection models and Karlo use it
    text_tokens  [L, Dt]        per-token text states after the final LayerNorm; float32, or
                                float16 with token_dtype="float16" (half the disk)
    tokens       int32 [L]      CLIP token ids (sot, ..., eot, padding)
    mask         bool [L]       sot..eot (the text tower runs without it, causal only, as
                                Karlo and diffusers' UnCLIPPipeline do; consumers mask with it)

Images are resized on the host to the image tower's size (per example, PIL bicubic as OpenAI's
preprocessing), then `preprocess_images` normalises them on the devices.

Images are not copied: the side dataset keeps `index`, and `JoinedSource` joins the source's
image back when the decoder needs it (one copy of the pixels, the decoder keeps its own
resizing and crops; checked per record by caption).

Layout and multi-host: a split of n examples is cut into K = ceil(n / examples_per_shard)
contiguous shards, K independent of the number of processes; process p of P writes shards
[p K / P, (p + 1) K / P) (contiguous ranges of the split), each as
`clip_embeddings-{split}.array_record-{k:05d}-of-{K:05d}` plus a marker `_done-...json` once it
is complete. The concatenation of the shards is the source order, whoever wrote them, so one
process and two produce identical files. Whoever sees every marker of a split writes
`dataset_info.json` (and the statistics); in a real multi-host run all processes meet at a
barrier first and process 0 does it. A rerun skips finished shards (preempted runs resume, even
on another number of hosts) and a complete split is a no-op. Every process computes on its own
devices only (a process-local mesh), so hosts never wait for each other in a collective.
`out_dir` must be a filesystem all hosts share (paths, not gs:// URLs).

Statistics (`stats-{split}.npz` and `.json` next to the data, see `compute_stats`): per-dimension
mean / std (and covariance) of the image embeddings, mean / std of the text embeddings, and the
distribution of the cosine similarity z_i.z_t (mean, std, histogram, percentiles).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unclip_jax import storage
from unclip_jax.data import transforms
from unclip_jax.data.loader import GrainBatches
from unclip_jax.models.clip import CLIP, preprocess_images

log = logging.getLogger(__name__)

NAME = "clip_embeddings"
VERSION = "1.0.0"
TOKEN_DTYPES = ("float32", "float16")
STATS_BINS = 20_000  # histogram of cosine similarities over [-1, 1]: quantiles to 1e-4


@dataclasses.dataclass(frozen=True)
class EmbeddingSpec:
    """Shapes of the side dataset: embed_dim D, text_width Dt, context_length L."""

    embed_dim: int
    text_width: int
    context_length: int
    token_dtype: str = "float32"

    def __post_init__(self):
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {TOKEN_DTYPES}, got {self.token_dtype!r}")

    def features(self) -> tfds.features.FeaturesDict:
        d, dt, length = self.embed_dim, self.text_width, self.context_length
        raw = tfds.features.Encoding.BYTES  # raw little-endian bytes: no per-float proto varints
        return tfds.features.FeaturesDict(
            {
                "index": tfds.features.Scalar(np.int64),
                "caption": tfds.features.Text(),
                "image_emb": tfds.features.Tensor(shape=(d,), dtype=np.float32, encoding=raw),
                "text_emb": tfds.features.Tensor(shape=(d,), dtype=np.float32, encoding=raw),
                "text_tokens": tfds.features.Tensor(
                    shape=(length, dt), dtype=np.dtype(self.token_dtype), encoding=raw
                ),
                "tokens": tfds.features.Tensor(shape=(length,), dtype=np.int32, encoding=raw),
                "mask": tfds.features.Tensor(shape=(length,), dtype=np.bool_),
            }
        )


@dataclasses.dataclass
class EmbedReport:
    """What one `embed_dataset` call did. `complete`: the split is readable now."""

    out_dir: str
    split: str
    num_examples: int
    num_shards: int
    process_index: int
    process_count: int
    shards_written: list[int] = dataclasses.field(default_factory=list)
    shards_skipped: list[int] = dataclasses.field(default_factory=list)  # already there
    examples_written: int = 0
    truncated_captions: int = 0
    complete: bool = False
    already_complete: bool = False  # nothing was done
    seconds: float = 0.0

    def summary(self) -> str:
        if self.already_complete:
            return f"{self.split} of {self.out_dir} is already complete: nothing to do"
        state = "complete" if self.complete else "waiting for the other processes' shards"
        return (
            f"process {self.process_index}/{self.process_count}: embedded "
            f"{self.examples_written} examples into {len(self.shards_written)} shards "
            f"({len(self.shards_skipped)} already there) of {self.num_shards} in "
            f"{self.seconds:.1f} s; {self.split} of {self.out_dir} is {state}"
        )


# ---- layout ----


def shard_ranges(num_examples: int, examples_per_shard: int) -> list[tuple[int, int]]:
    """K = ceil(n / examples_per_shard) contiguous, near-equal [start, stop) ranges of the split."""
    if examples_per_shard < 1:
        raise ValueError(f"examples_per_shard must be positive, got {examples_per_shard}")
    k = math.ceil(num_examples / examples_per_shard)
    return [(i * num_examples // k, (i + 1) * num_examples // k) for i in range(k)]


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The contiguous block of shards process `process_index` of `process_count` writes."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return range(
        process_index * num_shards // process_count,
        (process_index + 1) * num_shards // process_count,
    )


def _shard_path(out: pathlib.Path, split: str, shard: int, num_shards: int) -> pathlib.Path:
    return out / f"{NAME}-{split}.array_record-{shard:05d}-of-{num_shards:05d}"


def _marker_path(out: pathlib.Path, split: str, shard: int, num_shards: int) -> pathlib.Path:
    return out / f"_done-{split}-{shard:05d}-of-{num_shards:05d}.json"


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ready_splits(out: pathlib.Path) -> dict[str, tuple[dict, list[dict]]]:
    """{split: (plan, markers)} of every split whose shards are all written."""
    ready = {}
    for plan_file in sorted(out.glob("_plan-*.json")):
        plan = json.loads(plan_file.read_text())
        k = plan["num_shards"]
        markers = [_marker_path(out, plan["split"], i, k) for i in range(k)]
        if all(m.exists() for m in markers):
            ready[plan["split"]] = (plan, [json.loads(m.read_text()) for m in markers])
    return ready


def _write_dataset_info(out: pathlib.Path) -> None:
    """dataset_info.json + features.json listing every split whose shards are all written."""
    ready = _ready_splits(out)
    specs = {json.dumps(plan["spec"], sort_keys=True) for plan, _ in ready.values()}
    if len(specs) != 1:
        raise ValueError(f"splits of {out} disagree on the embedding shapes: {sorted(specs)}")
    spec = EmbeddingSpec(**next(iter(ready.values()))[0]["spec"])
    identity = tfds.core.DatasetIdentity(
        name=NAME, version=tfds.core.Version(VERSION), data_dir=str(out), module_name=__name__
    )
    info = tfds.core.DatasetInfo(
        builder=identity, description=__doc__.split("\n\n")[0], features=spec.features()
    )
    info.set_file_format("array_record")
    splits = []
    for split, (_, markers) in sorted(ready.items()):
        template = tfds.core.ShardedFileTemplate(
            data_dir=str(out), dataset_name=NAME, split=split, filetype_suffix="array_record"
        )
        splits.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[m["num_examples"] for m in markers],
                num_bytes=sum(m["num_bytes"] for m in markers),
                filename_template=template,
            )
        )
    info.set_splits(tfds.core.SplitDict(splits))
    info.write_to_directory(out)


def _complete_splits(out: pathlib.Path) -> set[str]:
    try:
        info = json.loads((out / "dataset_info.json").read_text())
    except FileNotFoundError:
        return set()
    return {s["name"] for s in info.get("splits", [])}


# ---- embedding ----


@functools.partial(jax.jit, static_argnames=("model", "token_dtype"))
def _encode(model: CLIP, params, images, input_ids, eot_positions, token_dtype: str):
    """images [B, S, S, 3] in [-1, 1] (S = the tower's size), ids [B, L], eot [B] -> embeddings."""
    pixels = preprocess_images(images, model.vision.image_size)
    out = model.apply({"params": params}, input_ids, pixels, eot_positions=eot_positions)
    return {
        "image_emb": out.image_embeds.astype(jnp.float32),
        "text_emb": out.text_embeds.astype(jnp.float32),
        "text_tokens": out.text_hidden_states.astype(token_dtype),
    }


def clip_images(records: Sequence[dict], image_size: int) -> np.ndarray:
    """Source images -> [B, S, S, 3] float32 in [-1, 1] for `preprocess_images` (host).

    An image that is not already S x S is resized (shorter side, PIL bicubic as OpenAI's CLIP
    preprocessing) and centre-cropped here, per example, so the result never depends on which
    examples share a batch; `preprocess_images` then only normalises.
    """
    out = []
    for record in records:
        image = transforms.decode_image(record["image"])
        if image.shape[:2] != (image_size, image_size):
            image = transforms.resize_center_crop(image, image_size)
        out.append(transforms.to_float(image))
    return np.stack(out)


def _caption(record: dict) -> str:
    caption = record["caption"]
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    return str(caption)


def _read(source, start: int, stop: int) -> list[dict]:
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(list(range(start, stop))))
    return [source[i] for i in range(start, stop)]


def local_mesh() -> Mesh:
    """This process's devices on one `data` axis (embedding never crosses hosts)."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def embed_dataset(
    source_builder_or_data_source,
    split: str,
    clip_model: CLIP,
    clip_params,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    mesh: Mesh | None = None,
    examples_per_shard: int = 4096,
    token_dtype: str = "float32",
    compute_stats: bool = True,
) -> EmbedReport:
    """Embed `split` of a source with CLIP into the side dataset `out_dir` (module docstring).

    Args:
      source_builder_or_data_source: a tfds builder (its `as_data_source(split)` is read) or a
        random-access source of {"image": uint8 [H, W, 3] or bytes, "caption": str | bytes}.
      clip_model, clip_params: a two-tower CLIP and its params (boxed or not).
      tokenizer: a `tokenizers.ClipTokenizer`; its context length is L.
      batch_size: examples per forward pass (rounded up to a multiple of the mesh's devices).
      process_index, process_count: this process's share; None: jax.process_index/count(),
        with a barrier before the metadata is written. Given, no barrier: tests call the
        "processes" one after the other and the last one finishes the dataset.
      mesh: process-local devices to shard the batch over (default: all local devices).
      examples_per_shard: records per array_record file (the unit of resumption).
      token_dtype: "float32" or "float16" for `text_tokens`.
      compute_stats: write `stats-{split}.json/.npz` once the split is complete.
    """
    start_time = time.perf_counter()
    if clip_model.text is None or clip_model.vision is None:
        raise ValueError("embedding needs a CLIP with both towers (text and vision)")
    if tokenizer.context_length > clip_model.text.context_length:
        raise ValueError(
            f"tokenizer context {tokenizer.context_length} exceeds the text tower's "
            f"{clip_model.text.context_length}"
        )
    if hasattr(source_builder_or_data_source, "as_data_source"):
        builder = source_builder_or_data_source
        source, source_name = builder.as_data_source(split), builder.info.full_name
    else:
        source, source_name = (
            source_builder_or_data_source,
            type(source_builder_or_data_source).__name__,
        )
    num_examples = len(source)
    if num_examples == 0:
        raise ValueError(f"split {split!r} of {source_name} is empty: nothing to embed")
    multihost = process_index is None
    if (process_index is None) != (process_count is None):
        raise ValueError("pass both process_index and process_count, or neither")
    if multihost:
        process_index, process_count = jax.process_index(), jax.process_count()
    spec = EmbeddingSpec(
        clip_model.projection_dim, clip_model.text.width, tokenizer.context_length, token_dtype
    )
    ranges = shard_ranges(num_examples, examples_per_shard)
    # A gs:// folder is written through its local mirror: each file goes up as soon as it is
    # complete (a shard before its marker, dataset_info.json last), so a resume on any machine
    # skips the shards already in the bucket.
    remote = str(out_dir) if storage.is_remote(out_dir) else None
    out = storage.pull(remote) if remote else pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = EmbedReport(str(out), split, num_examples, len(ranges), process_index, process_count)

    plan = {
        "split": split,
        "num_examples": num_examples,
        "num_shards": len(ranges),
        "spec": dataclasses.asdict(spec),
        "source": source_name,
        "clip": _describe(clip_model),
    }
    plan_path = out / f"_plan-{split}.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old != plan:
            diff = sorted(k for k in plan if old.get(k) != plan[k])
            raise ValueError(
                f"{out} holds {split} embeddings made differently ({', '.join(diff)} "
                f"differ: {[old.get(k) for k in diff]} vs {[plan[k] for k in diff]}); "
                "use another folder"
            )
    else:
        _write_atomic(plan_path, json.dumps(plan, indent=1))
        storage.push(plan_path, out, remote)
    if split in _complete_splits(out) and (
        not compute_stats or _stats_paths(out, split)[0].exists()
    ):
        log.info("%s of %s is already complete: nothing to do", split, out)
        report.complete = report.already_complete = True
        return report

    encode = _Encoder(clip_model, clip_params, tokenizer, mesh or local_mesh(), batch_size,
                      token_dtype)  # fmt: skip
    features = spec.features()
    from array_record.python.array_record_module import ArrayRecordWriter

    for shard in process_shards(len(ranges), process_index, process_count):
        marker = _marker_path(out, split, shard, len(ranges))
        if marker.exists():
            report.shards_skipped.append(shard)
            continue
        path = _shard_path(out, split, shard, len(ranges))
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        writer = ArrayRecordWriter(str(tmp), "group_size:1")  # tfds's option: random access
        lo, hi = ranges[shard]
        for start, batch in _pipelined(encode, source, lo, hi, batch_size):
            for i in range(len(batch["caption"])):
                example = {k: v[i] for k, v in batch.items()}
                writer.write(features.serialize_example({**example, "index": start + i}))
        writer.close()
        os.replace(tmp, path)  # a shard appears complete or not at all, then its marker
        _write_atomic(marker, json.dumps({"num_examples": hi - lo,
                                          "num_bytes": path.stat().st_size}))  # fmt: skip
        storage.push(path, out, remote)
        storage.push(marker, out, remote)
        report.shards_written.append(shard)
        report.examples_written += hi - lo
        log.info("wrote %s (%d examples)", path.name, hi - lo)
    report.truncated_captions = encode.truncated

    if multihost and process_count > 1:  # every shard on disk before the metadata
        multihost_utils.sync_global_devices(f"{NAME}-{split}-shards")
    if remote and (not multihost or process_index == 0):
        storage.pull(remote)  # the other processes' shards and markers
    if split in _ready_splits(out) and (not multihost or process_index == 0):
        _write_dataset_info(out)
        save_null_text(out, clip_model, clip_params, tokenizer)
        if compute_stats:
            save_stats(out, split)
        if remote:
            small = [out / "null_text.npz", *_stats_paths(out, split), out / "features.json"]
            for path in [*small, out / "dataset_info.json"]:
                if path.exists():
                    storage.push(path, out, remote)
    if multihost and process_count > 1:
        multihost_utils.sync_global_devices(f"{NAME}-{split}-info")
    report.complete = split in _complete_splits(out)
    report.seconds = time.perf_counter() - start_time
    log.info(report.summary())
    return report


class _Encoder:
    """Host records -> the jitted CLIP forward, dispatched (asynchronously) on a local mesh."""

    def __init__(self, model, params, tokenizer, mesh, batch_size, token_dtype):
        if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
            raise ValueError("the mesh must hold this process's devices only (embedding is "
                             "per host)")  # fmt: skip
        self.model, self.tokenizer, self.token_dtype = model, tokenizer, token_dtype
        # Every batch is padded to one size (a multiple of the devices): one compilation.
        self.padded = -(-batch_size // mesh.devices.size) * mesh.devices.size
        self.sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self.params = jax.device_put(nn.meta.unbox(params), NamedSharding(mesh, PartitionSpec()))
        self.truncated = 0

    def __call__(self, records: list[dict]) -> dict:
        captions = [_caption(r) for r in records]
        tok_log = logging.getLogger("unclip_jax.tokenizers")
        level = tok_log.level  # one count in the report instead of a warning per caption
        tok_log.setLevel(logging.ERROR)
        try:
            tokens = self.tokenizer(captions)
        finally:
            tok_log.setLevel(level)
        self.truncated += int(tokens.truncated.sum())
        n = len(records)
        host = [clip_images(records, self.model.vision.image_size), tokens.input_ids,
                tokens.eot_positions]  # fmt: skip
        host = [np.concatenate([x, np.repeat(x[-1:], self.padded - n, 0)]) for x in host]
        device = [jax.device_put(x, self.sharding) for x in host]
        out = _encode(self.model, self.params, *device, token_dtype=self.token_dtype)
        # The padding rows are cut on the host (a device slice would compile per size).
        return {"caption": captions, "tokens": tokens.input_ids, "mask": tokens.attention_mask,
                **out}  # fmt: skip


def _pipelined(encode: _Encoder, source, lo: int, hi: int, batch_size: int):
    """(start, host batch) of records [lo, hi): batch k is fetched after batch k + 1 was
    dispatched, so the host reads, decodes and writes while the devices compute."""
    pending = None
    for start in [*range(lo, hi, batch_size), None]:
        current = None
        if start is not None:
            current = (start, encode(_read(source, start, min(start + batch_size, hi))))
        if pending is not None:
            n = len(pending[1]["caption"])
            yield pending[0], {k: np.asarray(v)[:n] for k, v in pending[1].items()}
        pending = current


def _describe(model: CLIP) -> dict:
    """What about the CLIP model the plan records (a rerun with another model is an error)."""
    return {
        "projection_dim": model.projection_dim,
        "text": dataclasses.asdict(model.text),
        "vision": dataclasses.asdict(model.vision),
        "dtype": str(jnp.dtype(model.dtype)),
    }


def save_null_text(out_dir, clip_model: CLIP, clip_params, tokenizer) -> dict:
    """Write null_text.npz: the CLIP encoding of the empty prompt (unbatched), the null caption
    that the decoder's and Karlo-style prior's training drops use and their samplers reuse."""
    tokens = tokenizer([""])
    out = clip_model.apply({"params": nn.meta.unbox(clip_params)},
                           jnp.asarray(tokens.input_ids),
                           eot_positions=jnp.asarray(tokens.eot_positions))  # fmt: skip
    null = {"text_emb": np.asarray(out.text_embeds[0], np.float32),
            "text_tokens": np.asarray(out.text_hidden_states[0], np.float32),
            "text_mask": np.asarray(tokens.attention_mask[0], bool),
            "tokens": np.asarray(tokens.input_ids[0], np.int32)}  # fmt: skip
    path = pathlib.Path(out_dir) / "null_text.npz"
    tmp = path.with_name(f".null_text.tmp{os.getpid()}.npz")
    np.savez(tmp, **null)
    os.replace(tmp, path)
    return null


def load_null_text(out_dir) -> dict:
    """The empty prompt's CLIP encoding written by `save_null_text` (a dict of arrays)."""
    path = storage.local_copy(out_dir) / "null_text.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: rerun `unclip-jax data embed` into "
                                f"{out_dir} (it writes the empty prompt's encoding)")  # fmt: skip
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# ---- reading ----


def embedding_source(out_dir: str | os.PathLike, split: str):
    """The tfds data source of a finished split of the side dataset (record i = index i); a
    gs:// folder is read from its local copy (`storage.local_copy`: array_record reads local
    files only)."""
    out = storage.local_copy(out_dir)
    if not (out / "dataset_info.json").exists():
        raise FileNotFoundError(f"no finished CLIP embeddings in {out} (no dataset_info.json)")
    builder = tfds.builder_from_directory(str(out))
    if split not in builder.info.splits:
        raise ValueError(
            f"split {split!r} of {out} is not finished; finished: {sorted(builder.info.splits)}"
        )
    return builder.as_data_source(split)


class JoinedSource:
    """Side-dataset records with the source image of the same `index` added (the decoder's pairs).

    The caption of both records must agree: a guard against joining the wrong source or split.
    """

    def __init__(self, embeddings, images):
        self.embeddings, self.images = embeddings, images

    def __len__(self) -> int:
        return len(self.embeddings)

    def __repr__(self) -> str:
        # Grain compares repr(source) when a run resumes its data iterator, so it must describe
        # the sources (their names and splits), never this object's address.
        return f"JoinedSource(embeddings={self.embeddings!r}, images={self.images!r})"

    def __getitem__(self, i: int) -> dict:
        record = dict(self.embeddings[i])
        image_record = self.images[int(record["index"])]
        if _caption(image_record) != _caption(record):
            raise ValueError(
                f"embedding record {i} (index {record['index']}) does not match the "
                "image source: another dataset or split?"
            )
        record["image"] = image_record["image"]
        return record


@dataclasses.dataclass(frozen=True)
class EmbeddingExample(grain.transforms.Map):
    """A side-dataset record -> training arrays (images, when joined, in [-1, 1] at image_size)."""

    image_size: int | None = None

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        out = {
            "image_emb": np.asarray(record["image_emb"], np.float32),
            "text_emb": np.asarray(record["text_emb"], np.float32),
            "text_tokens": np.asarray(record["text_tokens"], np.float32),
            "text_mask": np.asarray(record["mask"], bool),
            "tokens": np.asarray(record["tokens"], np.int32),
            "index": np.asarray(record["index"], np.int64),
            "caption": _caption(record),
        }
        if "image" in record:
            image = transforms.decode_image(record["image"])
            if self.image_size is not None:
                image = transforms.resize_center_crop(image, self.image_size)
            out["image"] = transforms.to_float(image)
        return out


class EmbeddingBatches(GrainBatches):
    """Host batches of the side dataset; `get_state`/`set_state` (JSON-able) resume the order.

    Yields {"image_emb", "text_emb": [b, D] float32, "text_tokens": [b, L, Dt] float32,
    "text_mask": [b, L] bool, "tokens": [b, L] int32, "index": [b] int64, "caption": [b] str,
    "image": [b, S, S, 3] float32 in [-1, 1] (joined sources only)}.
    """


def make_embedding_loader(
    source: Sequence,
    *,
    global_batch: int,
    seed: int,
    image_size: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
    operations: Sequence = (),
) -> EmbeddingBatches:
    """Batches of `embedding_source(...)` (or a `JoinedSource`) for the prior / decoder.

    Sharding, shuffling and dropping are `data.loader.make_loader`'s: each process reads its own
    contiguous 1/P of the records, global_batch // P per step, reshuffled every epoch from `seed`.
    `read_options`: grain's reading threads and read-ahead (default 16 threads, 500 records).
    """
    from unclip_jax.data.loader import sharded_loader

    loader = sharded_loader(source, [EmbeddingExample(image_size), *operations],
                            global_batch=global_batch, seed=seed, shuffle=shuffle,
                            num_epochs=num_epochs, process_index=process_index,
                            process_count=process_count, worker_count=worker_count,
                            read_options=read_options)  # fmt: skip
    return EmbeddingBatches(loader)


# ---- statistics ----


def _stats_paths(out: pathlib.Path, split: str) -> tuple[pathlib.Path, pathlib.Path]:
    return out / f"stats-{split}.json", out / f"stats-{split}.npz"


def compute_stats(source, *, chunk: int = 1024, bins: int = STATS_BINS) -> dict[str, np.ndarray]:
    """Statistics of a side-dataset split, accumulated in float64 over chunks of records.

    image_emb_mean / _std [D] (per dimension, ddof 0: Karlo's clip_mean / clip_std),
    image_emb_cov [D, D] (for the AR prior's PCA), text_emb_mean / _std [D], and the cosine
    similarity z_i.z_t of the L2-normalised embeddings (the AR prior's conditioning): its exact
    mean, std, min, max, a `bins`-bin histogram over [-1, 1] and percentiles 0..100 read off it.
    """
    n, sums = 0, {}
    hist = np.zeros(bins, np.int64)
    lo, hi = np.inf, -np.inf
    for start in range(0, len(source), chunk):
        records = _read(source, start, min(start + chunk, len(source)))
        zi = np.stack([r["image_emb"] for r in records]).astype(np.float64)
        zt = np.stack([r["text_emb"] for r in records]).astype(np.float64)
        dots = np.sum(l2_normalize_np(zi) * l2_normalize_np(zt), axis=-1)
        for key, value in (
            ("zi", zi.sum(0)),
            ("zi2", zi.T @ zi),
            ("zt", zt.sum(0)),
            ("zt2", (zt * zt).sum(0)),
            ("dot", dots.sum()),
            ("dot2", (dots * dots).sum()),
        ):
            sums[key] = sums.get(key, 0.0) + value
        hist += np.histogram(np.clip(dots, -1, 1), bins=bins, range=(-1.0, 1.0))[0]
        lo, hi = min(lo, dots.min()), max(hi, dots.max())
        n += len(records)
    if n == 0:
        raise ValueError("no records: statistics of an empty split")
    mean_i, mean_t = sums["zi"] / n, sums["zt"] / n
    cov = sums["zi2"] / n - np.outer(mean_i, mean_i)
    dot_mean = sums["dot"] / n
    # The q-th percentile is the smallest value with at least q n values at or below it
    # (NumPy's "inverted_cdf"); the histogram places it to within a bin: its upper edge.
    counts = np.cumsum(hist)
    first = np.searchsorted(counts, np.arange(101) / 100 * n - 1e-9)
    percentiles = np.clip(-1.0 + 2.0 * (np.minimum(first, bins - 1) + 1) / bins, lo, hi)
    percentiles[0], percentiles[-1] = lo, hi
    return {
        "num_examples": np.asarray(n),
        "image_emb_mean": mean_i,
        "image_emb_std": np.sqrt(np.maximum(np.diag(cov), 0.0)),
        "image_emb_cov": cov,
        "text_emb_mean": mean_t,
        "text_emb_std": np.sqrt(np.maximum(sums["zt2"] / n - mean_t**2, 0.0)),
        "dot_mean": np.asarray(dot_mean),
        "dot_std": np.asarray(np.sqrt(max(sums["dot2"] / n - dot_mean**2, 0.0))),
        "dot_min": np.asarray(lo),
        "dot_max": np.asarray(hi),
        "dot_hist": hist,
        "dot_percentiles": percentiles,
    }


def l2_normalize_np(x: np.ndarray) -> np.ndarray:
    """NumPy twin of `models.clip.l2_normalize` (float64 on the host)."""
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def save_stats(out_dir: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """Compute a finished split's statistics; write stats-{split}.npz (all arrays, float32 but
    the counts) and stats-{split}.json (scalars, mean/std vectors and percentiles)."""
    out = pathlib.Path(out_dir)
    stats = compute_stats(embedding_source(out, split))
    json_path, npz_path = _stats_paths(out, split)
    arrays = {k: v if v.dtype.kind == "i" else v.astype(np.float32) for k, v in stats.items()}
    tmp = npz_path.with_name(f".{npz_path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, npz_path)
    summary = {k: v.tolist() for k, v in stats.items() if k not in ("image_emb_cov", "dot_hist")}
    _write_atomic(json_path, json.dumps(summary))
    return stats


def load_stats(out_dir: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """The statistics `save_stats` wrote (the .npz), e.g. stats["image_emb_mean"] [D]."""
    _, npz_path = _stats_paths(storage.local_copy(out_dir), split)
    if not npz_path.exists():
        raise FileNotFoundError(f"no statistics of {split!r} in {out_dir} ({npz_path.name})")
    with np.load(npz_path) as data:
        return {k: data[k] for k in data.files}
