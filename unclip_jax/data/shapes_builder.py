"""The tfds builder of the `shapes` dataset (version 1.0.0), writing `array_record`, no TensorFlow.

    from unclip_jax.data import shapes_builder
    builder = shapes_builder.ShapesBuilder(data_dir=dir, config="tiny")
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source("train")   # or tfds.data_source("shapes/tiny", data_dir=dir)
    source[0]  # {"image": [64, 64, 3] uint8, "caption": bytes, "objects": {...}, "relation": int}

Split sizes come from the builder config: the registered configs `default` (50,000 / 2,000 /
2,000), `small` (10,000 / 1,000 / 1,000) and `tiny` (256 / 64 / 64), or any `ShapesConfig` passed as
`config=` (its name must differ from those of other sizes: the name is the folder on disk).
Examples are `shapes.render_example(split, index)` for index < split size, so a config of another
size holds the same examples at the same indices.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from unclip_jax.data import shapes
from unclip_jax.data.tfds_utils import ArrayRecordBuilder, prepare_at


@dataclasses.dataclass(kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
    """Split sizes of a `shapes` build."""

    train: int = 50_000
    validation: int = 2_000
    test_compositional: int = 2_000

    def __post_init__(self):
        for split in shapes.SPLITS:
            n = getattr(self, split)
            if not isinstance(n, int) or n < 1:
                raise ValueError(
                    f"shapes split {split!r} needs a positive example count, got {n!r}"
                )

    def split_sizes(self) -> dict[str, int]:
        return {split: getattr(self, split) for split in shapes.SPLITS}


def features() -> tfds.features.FeaturesDict:
    """The feature spec. `index` is the example's index in its split (its generating seed)."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(64, 64, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "index": tfds.features.Scalar(np.int64),
            "objects": tfds.features.Sequence(
                {
                    "color": tfds.features.ClassLabel(names=list(shapes.COLORS)),
                    "shape": tfds.features.ClassLabel(names=list(shapes.SHAPES)),
                    "size_class": tfds.features.ClassLabel(names=list(shapes.SIZE_CLASSES)),
                    "size": tfds.features.Scalar(np.int32),
                    # (x0, y0, x1, y1) in pixels, exclusive ends.
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
                }
            ),
            "relation": tfds.features.ClassLabel(names=list(shapes.RELATIONS)),
        }
    )


def example_to_features(example: shapes.ShapesExample) -> dict:
    """A `ShapesExample` as the builder's feature dict (the image as PNG bytes: no TF needed)."""
    return {
        "image": example.png(),
        "caption": example.caption,
        "index": example.index,
        "objects": [
            {
                "color": o.color,
                "shape": o.shape,
                "size_class": o.size_class,
                "size": o.size,
                "box": np.asarray(o.box, np.int32),
            }
            for o in example.objects
        ],
        "relation": example.relation,
    }


def decode_ground_truth(record: dict) -> tuple[list[shapes.ShapeObject], str]:
    """The objects (subject first) and relation of a record read back from the data source."""
    info = features()
    obj = record["objects"]
    names = {k: info["objects"].feature[k].names for k in ("color", "shape", "size_class")}
    objects = [
        shapes.ShapeObject(
            color=names["color"][int(obj["color"][i])],
            shape=names["shape"][int(obj["shape"][i])],
            size_class=names["size_class"][int(obj["size_class"][i])],
            size=int(obj["size"][i]),
            box=tuple(int(v) for v in obj["box"][i]),
        )
        for i in range(len(obj["color"]))
    ]
    return objects, shapes.RELATIONS[int(record["relation"])]


class ShapesBuilder(ArrayRecordBuilder):
    """tfds builder registered as `shapes`; see the module docstring."""

    name = "shapes"
    VERSION = tfds.core.Version(shapes.VERSION)
    RELEASE_NOTES = {"1.0.0": "The specification of issue 5."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", description="50k train images"),
        ShapesConfig(name="small", train=10_000, validation=1_000, test_compositional=1_000),
        ShapesConfig(name="tiny", train=256, validation=64, test_compositional=64),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        # Built here, not with dataset_info_from_configs, which wants the tfds package layout.
        return tfds.core.DatasetInfo(
            builder=self,
            description=shapes.__doc__,
            features=features(),
            homepage="https://github.com/unclip-jax",
            license="Apache-2.0",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # procedural: nothing to download
        sizes = self.builder_config.split_sizes()
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, num_examples: int):
        for index in range(num_examples):
            yield index, example_to_features(shapes.render_example(split, index))


def build_shapes(
    data_dir: str, config: str | ShapesConfig = "tiny", **split_sizes: int
) -> ShapesBuilder:
    """Prepare `shapes` under `data_dir` (a no-op if already there; a gs:// folder is built
    locally and uploaded, `tfds_utils.prepare_at`) and return its builder.

    `split_sizes` (train=, validation=, test_compositional=) override those of `config` and make a
    config named after the sizes (`n{train}_{validation}_{test_compositional}`).
    """
    if split_sizes:
        unknown = set(split_sizes) - set(shapes.SPLITS)
        if unknown:
            raise ValueError(f"unknown shapes splits {sorted(unknown)}; expected {shapes.SPLITS}")
        if isinstance(config, str):
            named = {c.name: c for c in ShapesBuilder.BUILDER_CONFIGS}
            if config not in named:
                raise ValueError(f"unknown shapes config {config!r}; expected one of {list(named)}")
            config = named[config]
        # Sizes not given are those of `config`.
        sizes = {**config.split_sizes(), **split_sizes}
        name = "n" + "_".join(str(sizes[s]) for s in shapes.SPLITS)
        config = ShapesConfig(name=name, **sizes)
    return prepare_at(lambda folder: ShapesBuilder(data_dir=folder, config=config), data_dir)
