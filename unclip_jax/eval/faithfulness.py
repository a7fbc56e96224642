"""Caption faithfulness on the captioned-shapes dataset: parse a caption of the dataset's grammar,
read the image with the pixel detector, and check every attribute the caption states.

The grammar is the one in `unclip_jax.data.shapes.TEMPLATES` (imported, never copied): every
template becomes a regular expression whose slots match exactly the dataset's vocabulary. A parse
lists the objects in the order the caption mentions them and the relation of the first to the
second, so "a red circle above a blue square" and its paraphrase "a blue square below a red
circle" state the same facts in different orders; both are checked the same way.

Attributes scored per (image, caption):
- count: the image holds exactly as many objects as the caption names;
- color / shape / size: every named object has a detected counterpart with that colour / shape /
  size class (size only when the caption states one), under the one assignment of detected to
  named objects that agrees best (colours first, then shapes, then sizes);
- relation: for two objects, the assigned counterparts stand in the stated relation;
- caption: all of the above that apply hold.
Since the dataset's objects always differ in colour, matching goes colour first: a caption that
swaps the colours of two objects is an attribute-binding error and shows as wrong shapes (or, for
two objects of one shape, a wrong relation), with every colour present.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from collections.abc import Sequence

import numpy as np

from unclip_jax.data import shapes
from unclip_jax.eval.shapes_detector import (
    DetectedObject,
    DetectorConfig,
    detect_objects,
    relation_between,
    to_uint8_64,
)

_DEFAULT_CONFIG = DetectorConfig()
ATTRIBUTES = ("count", "color", "shape", "size", "relation", "caption")


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption names it; size_class is None when the caption states no size."""

    color: str
    shape: str
    size_class: str | None = None


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
    """What a caption states: objects in mention order, and the first's relation to the second
    ("none" for one object)."""

    objects: tuple[ObjectSpec, ...]
    relation: str


def _alternatives(words) -> str:
    # Longest first, so that no word is cut short by a shorter one that prefixes it.
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


@functools.cache
def _grammar() -> tuple[tuple[str, re.Pattern], ...]:
    """(form, compiled pattern) for every template of shapes.TEMPLATES."""
    color, shape = _alternatives(shapes.COLORS), _alternatives(shapes.SHAPES)
    relation = _alternatives(shapes.INVERSE_RELATION)
    slots = {
        "size": f"(?P<size>{_alternatives(shapes.SIZE_CLASSES)})",
        "color": f"(?P<color>{color})",
        "shape": f"(?P<shape>{shape})",
        # In "a {b} {inv} a {a}" the first slot is b: name groups by mention order instead.
        "first": f"(?P<color1>{color}) (?P<shape1>{shape})",
        "second": f"(?P<color2>{color}) (?P<shape2>{shape})",
        "rel": f"(?P<rel>{relation})",
    }
    patterns = []
    for form, templates in shapes.TEMPLATES.items():
        for template in templates:
            if form == "two":
                # Whichever of {a}/{b} comes first is the first mention; {rel}/{inv} both read
                # "first {relation} second".
                first = "a" if template.index("{a}") < template.index("{b}") else "b"
                names = {first: "{first}", ("b" if first == "a" else "a"): "{second}"}
                template = template.replace("{a}", names["a"]).replace("{b}", names["b"])
                template = template.replace("{inv}", "{rel}")
            literal = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
            patterns.append((form, re.compile(literal.format(**slots))))
    return tuple(patterns)


def normalize_caption(caption: str) -> str:
    """Lower case, single spaces, no trailing full stop."""
    return " ".join(caption.lower().split()).rstrip(".").strip()


def parse_caption(caption: str) -> CaptionSpec:
    """The facts a caption of the dataset's grammar states; ValueError naming it otherwise."""
    if not isinstance(caption, str):
        raise ValueError(f"a caption must be a string, got {type(caption).__name__}: {caption!r}")
    text = normalize_caption(caption)
    for form, pattern in _grammar():
        match = pattern.fullmatch(text)
        if match is None:
            continue
        g = match.groupdict()
        if form == "two":
            a = ObjectSpec(g["color1"], g["shape1"])
            b = ObjectSpec(g["color2"], g["shape2"])
            return CaptionSpec((a, b), g["rel"])
        return CaptionSpec((ObjectSpec(g["color"], g["shape"], g.get("size")),), "none")
    raise ValueError(
        f"caption {caption!r} is outside the shapes grammar (templates in "
        "unclip_jax.data.shapes.TEMPLATES)"
    )


def _assign(spec: CaptionSpec, found: Sequence[DetectedObject]):
    """The detected object for each named one (None where there are too few), agreeing best."""
    named = spec.objects
    best, best_key = None, None
    slots = list(found) + [None] * len(named)  # None: a named object left without a match
    for choice in itertools.permutations(range(len(slots)), len(named)):
        pairs = [(o, slots[i]) for o, i in zip(named, choice, strict=True)]
        key = tuple(
            sum(d is not None and getattr(d, attr) == getattr(o, attr) for o, d in pairs)
            for attr in ("color", "shape", "size_class")
        )
        if best_key is None or key > best_key:
            best, best_key = [d for _, d in pairs], key
    return best


def score_objects(spec: CaptionSpec, found: Sequence[DetectedObject]) -> dict[str, bool | None]:
    """Per-attribute verdicts of detected objects against a parsed caption (None: not stated)."""
    matched = _assign(spec, found)
    pairs = list(zip(spec.objects, matched, strict=True))

    def all_agree(attr_named, attr_found):
        return all(d is not None and getattr(d, attr_found) == getattr(o, attr_named)
                   for o, d in pairs)  # fmt: skip

    sized = [(o, d) for o, d in pairs if o.size_class is not None]
    result: dict[str, bool | None] = {
        "count": len(found) == len(spec.objects),
        "color": all_agree("color", "color"),
        "shape": all_agree("shape", "shape"),
        "size": all(d is not None and d.size_class == o.size_class for o, d in sized)
        if sized
        else None,
        "relation": None,
    }
    if spec.relation != "none":
        a, b = matched
        result["relation"] = (
            a is not None and b is not None and relation_between(a, b) == spec.relation
        )
    result["caption"] = all(v for v in result.values() if v is not None)
    return result


def score_caption(
    image, caption: str, *, value_range=(-1.0, 1.0), config: DetectorConfig = _DEFAULT_CONFIG
) -> dict[str, bool | None]:
    """Faithfulness of one image [H, W, 3] to one caption, per attribute (see the module doc)."""
    spec = parse_caption(caption)
    return score_objects(spec, detect_objects(image, value_range=value_range, config=config))


def _as_image_list(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
        array = np.asarray(images)
        if array.ndim != 4:
            raise ValueError(
                f"images must be [B, H, W, 3] or a list of [H, W, 3], got {array.shape}"
            )
        return list(array)
    return [np.asarray(image) for image in images]


def background_error(image, *, value_range=(-1.0, 1.0)) -> float:
    """How far an image's background is from the shapes background (240, 240, 240): the mean
    absolute difference, in 0-255 per channel, of the median colour of the outer 2 px ring (read
    on the 64x64 scale; objects never reach it, data/shapes.py) from it. 0 for every render; a
    background tinted by a sampler or an undertrained model scores its tint, which the detector
    would otherwise only show as wrong colours or extra objects."""
    pixels = to_uint8_64(image, value_range).astype(np.float32)
    sides = (pixels[:2], pixels[-2:], pixels[2:-2, :2], pixels[2:-2, -2:])
    ring = np.concatenate([side.reshape(-1, 3) for side in sides])
    return float(np.abs(np.median(ring, axis=0) - np.asarray(shapes.BACKGROUND)).mean())


def evaluate_shapes(
    images,
    captions: Sequence[str],
    *,
    value_range=(-1.0, 1.0),
    config: DetectorConfig = _DEFAULT_CONFIG,
    return_per_example: bool = False,
) -> dict:
    """Aggregate caption faithfulness of images to captions (one caption per image).

    images: [B, H, W, 3] uint8 or float in value_range, or a list of [H, W, 3]; any size (read on
    the 64x64 scale). Returns the fraction of faithful examples per attribute in ATTRIBUTES (size
    over the captions that state a size, relation over two-object captions; NaN where none does),
    the mean `background_error` (see background_error), the counts `n`, `n_size`, `n_relation`,
    and `per_example` (a list of per-attribute verdicts) when return_per_example. Raises
    ValueError on empty or mismatched inputs, bad images, or a caption outside the grammar
    (named), before any image is read.
    """
    if isinstance(captions, str):
        raise ValueError("captions must be a sequence of strings, got one string")
    captions = list(captions)
    images = _as_image_list(images)
    if not images or not captions:
        raise ValueError("evaluate_shapes needs at least one image and caption")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    specs = [parse_caption(c) for c in captions]  # fail on a bad caption before any detection
    rows = [
        score_objects(spec, detect_objects(image, value_range=value_range, config=config))
        for spec, image in zip(specs, images, strict=True)
    ]
    summary: dict = {}
    for attr in ATTRIBUTES:
        verdicts = [r[attr] for r in rows if r[attr] is not None]
        summary[attr] = float(np.mean(verdicts)) if verdicts else math.nan
    summary["background_error"] = float(np.mean(
        [background_error(image, value_range=value_range) for image in images]))  # fmt: skip
    summary["n"] = len(rows)
    summary["n_size"] = sum(r["size"] is not None for r in rows)
    summary["n_relation"] = sum(r["relation"] is not None for r in rows)
    if return_per_example:
        summary["per_example"] = rows
    return summary
