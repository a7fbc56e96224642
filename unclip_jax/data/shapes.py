"""The procedural captioned-shapes dataset, version 1.0.0: every example is a pure function of
(split, index), so any machine or process produces the same pixels, and an evaluator can check a
caption against the pixels exactly (no anti-aliasing).

Specification (issue 5):
- 64x64 RGB, background (240, 240, 240); one or two filled objects, never overlapping, at least 2 px
  from the border.
- Colours: red (220, 50, 50), green (50, 160, 70), blue (50, 90, 220), yellow (230, 200, 40),
  purple (150, 70, 190), cyan (40, 190, 200). Two objects always have different colours.
- Shapes: circle (diameter = size), square (axis-aligned, side = size), triangle (isosceles,
  pointing up, base = height = size). Size classes: small 10-14 px, large 20-26 px.
- Two objects always stand in one relation, "to the left of", "to the right of", "above" or
  "below", made unambiguous: along the relation's axis the boxes are at least 4 px apart, on the
  other axis the box centres differ by at most 8 px.
- Splits: `train` and `validation` never contain a purple triangle, a yellow square or a cyan
  circle; every `test_compositional` image contains at least one of them.

Geometry. An object of size `s` with top-left corner (x, y) (integers) owns the box
[x, x + s) x [y, y + s) in pixel units; a pixel (col, row) covers [col, col + 1) x [row, row + 1)
and is painted when its centre (col + 0.5, row + 0.5) lies in the shape (closed):
- square: the whole box;
- circle: centre (x + s/2, y + s/2), radius s/2;
- triangle: apex (x + s/2, y), base from (x, y + s) to (x + s, y + s); here the test point is the
  middle of the pixel's bottom edge (col + 0.5, row + 1), so that the painted triangle is exactly
  s rows high and s columns wide.
The rasterisation is ours (NumPy, exact integer arithmetic) rather than PIL's `ImageDraw`, whose
ellipse algorithm changed between Pillow releases: the pixels are therefore identical under every
library version. PIL encodes the PNG with fixed settings; the encoded bytes additionally depend only
on the zlib that Pillow links.

Randomness is SHA-256 in counter mode keyed by (version, split, index), not numpy's or Python's
generators, whose streams are not promised to stay fixed across releases.

Caption templates ({a} = "{color} {shape}" of the subject, {b} of the other object, {rel} the
relation of the subject to the other object, {inv} the inverse relation):
- one object with size:    "a {size} {color} {shape}", "a picture of a {size} {color} {shape}",
                           "one {size} {color} {shape} on a gray background"
- one object without size: "a {color} {shape}", "an image of a {color} {shape}",
                           "a single {color} {shape}"
- two objects:             "a {a} {rel} a {b}", "there is a {a} {rel} a {b}",
                           "a {b} {inv} a {a}"
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
from PIL import Image

VERSION = "1.0.0"
IMAGE_SIZE = 64
BACKGROUND = (240, 240, 240)
MARGIN = 2
RELATION_GAP = 4  # minimum distance between boxes along the relation's axis
MAX_CENTRE_OFFSET = 8  # maximum centre difference on the other axis

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 160, 70),
    "blue": (50, 90, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 70, 190),
    "cyan": (40, 190, 200),
}
SHAPES = ("circle", "square", "triangle")
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (10, 14), "large": (20, 26)}  # inclusive
SIZE_CLASSES = tuple(SIZE_RANGES)
# "none" is the relation of a one-object image; the others read "subject {relation} other".
RELATIONS = ("none", "to the left of", "to the right of", "above", "below")
INVERSE_RELATION = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
HELD_OUT = (("purple", "triangle"), ("yellow", "square"), ("cyan", "circle"))
SPLITS = ("train", "validation", "test_compositional")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "one_sized": (
        "a {size} {color} {shape}",
        "a picture of a {size} {color} {shape}",
        "one {size} {color} {shape} on a gray background",
    ),
    "one": ("a {color} {shape}", "an image of a {color} {shape}", "a single {color} {shape}"),
    "two": ("a {a} {rel} a {b}", "there is a {a} {rel} a {b}", "a {b} {inv} a {a}"),
}

_ALL_COMBOS = tuple((c, s) for c in COLORS for s in SHAPES)
_SEEN_COMBOS = tuple(cs for cs in _ALL_COMBOS if cs not in HELD_OUT)


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object: its colour, shape, size class, size in pixels and box.

    The box is (x0, y0, x1, y1) in pixels with exclusive ends: x1 = x0 + size, y1 = y0 + size.
    """

    color: str
    shape: str
    size_class: str
    size: int
    box: tuple[int, int, int, int]

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class ShapesExample:
    """One example: the rendered image, its caption and the ground truth.

    `objects[0]` is the caption's subject; `relation` is how it stands to `objects[1]` ("none" for
    one object). `template` is (form, index into TEMPLATES[form]).
    """

    split: str
    index: int
    image: np.ndarray  # [64, 64, 3] uint8
    caption: str
    objects: tuple[ShapeObject, ...]
    relation: str
    template: tuple[str, int]

    def png(self) -> bytes:
        return encode_png(self.image)


class _Draws:
    """Uniform integer draws from SHA-256 in counter mode: stable on every platform and release."""

    def __init__(self, *key: object):
        self._key = "/".join(str(k) for k in key).encode()
        self._counter = 0

    def _u64(self) -> int:
        digest = hashlib.sha256(self._key + b"#" + str(self._counter).encode()).digest()
        self._counter += 1
        return int.from_bytes(digest[:8], "little")

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high] (inclusive), by rejection so that no value is favoured."""
        if high < low:
            raise ValueError(f"empty range [{low}, {high}]")
        n = high - low + 1
        limit = (1 << 64) - (1 << 64) % n
        while True:
            u = self._u64()
            if u < limit:
                return low + u % n

    def choice(self, options):
        return options[self.integer(0, len(options) - 1)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")


def _draw_size(draws: _Draws) -> tuple[str, int]:
    size_class = draws.choice(SIZE_CLASSES)
    low, high = SIZE_RANGES[size_class]
    return size_class, draws.integer(low, high)


def _draw_combos(draws: _Draws, split: str, count: int) -> list[tuple[str, str]]:
    """(colour, shape) pairs with different colours; held-out pairs only where the split allows."""
    if split == "test_compositional":
        first = draws.choice(HELD_OUT)  # guarantees at least one held-out object
        pool = _ALL_COMBOS
    else:
        first = draws.choice(_SEEN_COMBOS)
        pool = _SEEN_COMBOS
    combos = [first]
    if count == 2:
        combos.append(draws.choice(tuple(cs for cs in pool if cs[0] != first[0])))
        if draws.integer(0, 1):  # the held-out object is not always the caption's subject
            combos.reverse()
    return combos


def _place_pair(draws: _Draws, size_a: int, size_b: int, relation: str):
    """Top-left corners of subject a and other b so that "a {relation} b" holds unambiguously."""
    lo, hi = MARGIN, IMAGE_SIZE - MARGIN
    horizontal = relation in ("to the left of", "to the right of")
    # First/second along the relation's axis (left before right, top before bottom).
    a_first = relation in ("to the left of", "above")
    s1, s2 = (size_a, size_b) if a_first else (size_b, size_a)
    gap = draws.integer(RELATION_GAP, (hi - lo) - s1 - s2)
    p1 = draws.integer(lo, hi - (s1 + gap + s2))
    p2 = p1 + s1 + gap
    # Other axis: centres within MAX_CENTRE_OFFSET, in doubled units to stay in integers:
    # |(2 q1 + s1) - (2 q2 + s2)| <= 2 * MAX_CENTRE_OFFSET.
    q1 = draws.integer(lo, hi - s1)
    q2_low = max(lo, -((-(2 * q1 + s1 - s2 - 2 * MAX_CENTRE_OFFSET)) // 2))
    q2_high = min(hi - s2, (2 * q1 + s1 - s2 + 2 * MAX_CENTRE_OFFSET) // 2)
    q2 = draws.integer(q2_low, q2_high)
    first, second = ((p1, q1), (p2, q2)) if horizontal else ((q1, p1), (q2, p2))
    return (first, second) if a_first else (second, first)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """[size, size] bool: the pixels whose centres lie in the shape, in its own box."""
    # Doubled coordinates of pixel centres (2 * col + 1) keep every test in exact integers.
    c2 = 2 * np.arange(size) + 1
    cols, rows = c2[None, :], c2[:, None]
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (cols - size) ** 2 + (rows - size) ** 2 <= size**2
    if shape == "triangle":
        # Apex at (s/2, 0), base at y = s: half-width at depth y is y / 2. Rows are sampled at
        # their bottom edge (y = row + 1) so that the top row is never empty and the painted
        # triangle spans exactly `size` rows, as it spans `size` columns.
        return 2 * np.abs(cols - size) <= rows + 1
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: tuple[ShapeObject, ...] | list[ShapeObject]) -> np.ndarray:
    """Paint objects (later ones on top, though valid examples never overlap): [64, 64, 3] uint8."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[...] = BACKGROUND
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        image[y0:y1, x0:x1][shape_mask(obj.shape, obj.size)] = COLORS[obj.color]
    return image


def encode_png(image: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes with fixed settings (no metadata, zlib level 6)."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def render_example(split: str, index: int) -> ShapesExample:
    """Example `index` of `split`: a pure function of its arguments.

    Returns the [64, 64, 3] uint8 image, its caption and its ground truth.
    """
    _check_split(split)
    if not isinstance(index, int | np.integer) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    index = int(index)
    draws = _Draws("shapes", VERSION, split, index)
    count = draws.integer(1, 2)
    combos = _draw_combos(draws, split, count)
    sizes = [_draw_size(draws) for _ in range(count)]
    if count == 1:
        relation = "none"
        high = IMAGE_SIZE - MARGIN - sizes[0][1]
        corners = [(draws.integer(MARGIN, high), draws.integer(MARGIN, high))]
    else:
        relation = draws.choice(RELATIONS[1:])
        corners = list(_place_pair(draws, sizes[0][1], sizes[1][1], relation))
    objects = tuple(
        ShapeObject(color, shape, size_class, size, (x, y, x + size, y + size))
        for (color, shape), (size_class, size), (x, y) in zip(combos, sizes, corners, strict=True)
    )
    template = _caption_template(draws, count)
    return ShapesExample(
        split=split,
        index=index,
        image=render(objects),
        caption=format_caption(objects, relation, template),
        objects=objects,
        relation=relation,
        template=template,
    )


def _caption_template(draws: _Draws, count: int) -> tuple[str, int]:
    form = "two" if count == 2 else draws.choice(("one_sized", "one"))
    return form, draws.integer(0, len(TEMPLATES[form]) - 1)


def format_caption(
    objects: tuple[ShapeObject, ...] | list[ShapeObject], relation: str, template: tuple[str, int]
) -> str:
    """The caption of the ground truth with template (form, index) from TEMPLATES."""
    form, i = template
    text = TEMPLATES[form][i]
    if form == "two":
        a, b = objects
        return text.format(a=a.phrase, b=b.phrase, rel=relation, inv=INVERSE_RELATION[relation])
    (obj,) = objects
    return text.format(size=obj.size_class, color=obj.color, shape=obj.shape)


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """Whether "a {relation} b" holds under the dataset's unambiguity rules (boxes only)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    # Doubled centres, so that half-pixel centres compare exactly.
    dx, dy = abs((ax0 + ax1) - (bx0 + bx1)), abs((ay0 + ay1) - (by0 + by1))
    limit = 2 * MAX_CENTRE_OFFSET
    if relation == "to the left of":
        return bx0 - ax1 >= RELATION_GAP and dy <= limit
    if relation == "to the right of":
        return ax0 - bx1 >= RELATION_GAP and dy <= limit
    if relation == "above":
        return by0 - ay1 >= RELATION_GAP and dx <= limit
    if relation == "below":
        return ay0 - by1 >= RELATION_GAP and dx <= limit
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS[1:]}")
