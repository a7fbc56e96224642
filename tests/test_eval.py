"""Evaluation: the shapes detector and caption faithfulness on renders (exact and degraded), the
caption grammar, and the CLIP metrics on known cases (closed forms, constructed embeddings, a tiny
random CLIP)."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image, ImageFilter

from unclip_jax.data import shapes
from unclip_jax.eval import clip_metrics as cm
from unclip_jax.eval.faithfulness import (
    CaptionSpec,
    ObjectSpec,
    background_error,
    evaluate_shapes,
    parse_caption,
    score_caption,
)
from unclip_jax.eval.shapes_detector import detect_objects
from unclip_jax.models.clip import (
    CLIP,
    TextConfig,
    VisionConfig,
    abstract_params,
    preprocess_images,
)

N = 300  # ground-truth renders per split


def _examples(split, n, start=0):
    return [shapes.render_example(split, i) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def examples():
    return {split: _examples(split, N) for split in ("validation", "test_compositional")}


# ------------------------------------------------------------------------------------------------
# The detector and faithfulness on renders.


@pytest.mark.parametrize("split", ["validation", "test_compositional"])
def test_renders_are_faithful_to_their_captions(examples, split):
    exs = examples[split]
    result = evaluate_shapes(np.stack([e.image for e in exs]), [e.caption for e in exs])
    assert result["n"] == N and result["n_relation"] > 0 and result["n_size"] > 0
    for attr in ("count", "color", "shape", "size", "relation"):
        assert result[attr] >= 0.98, (attr, result)
    assert result["caption"] >= 0.98, result  # measured: 1.0 on both splits
    assert result["background_error"] == 0.0


def test_background_error_reads_the_tint(examples):
    ex = examples["validation"][0]
    assert background_error(ex.image) == 0.0
    small = np.asarray(Image.fromarray(ex.image).resize((32, 32), Image.BOX))
    assert background_error(small.astype(np.float32) / 127.5 - 1.0) == 0.0  # float, 32 px
    tinted = ex.image.astype(np.int16)
    is_background = np.all(ex.image == shapes.BACKGROUND, axis=-1)
    tinted[is_background] += np.array([-60, 15, -30], np.int16)
    assert background_error(tinted.astype(np.uint8)) == pytest.approx(35.0)  # (60 + 15 + 30) / 3
    result = evaluate_shapes([ex.image, tinted.astype(np.uint8)], [ex.caption] * 2)
    assert result["background_error"] == pytest.approx(17.5)


def test_detector_reads_the_ground_truth(examples):
    for ex in examples["test_compositional"][:60]:
        found = {o.color: o for o in detect_objects(ex.image)}
        assert len(found) == len(ex.objects)
        for obj in ex.objects:
            got = found[obj.color]
            assert (got.shape, got.size_class, got.box) == (obj.shape, obj.size_class, obj.box)


def _degrade(image, how, rng):
    pil = Image.fromarray(image)
    if how == "32px":  # a 32 px sample, read as is (the detector upsamples it)
        return np.asarray(pil.resize((32, 32), Image.BOX))
    if how == "32px_up":  # a 32 px sample upsampled to 64 by someone else
        return np.asarray(pil.resize((32, 32), Image.BOX).resize((64, 64), Image.BICUBIC))
    if how == "blur":
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(1.0)))
    if how == "noise_float":  # colour noise, in the diffusion models' [-1, 1] range
        noisy = image / 127.5 - 1 + rng.normal(0, 0.1, image.shape)
        return np.clip(noisy, -1.05, 1.05).astype(np.float32)
    raise ValueError(how)


@pytest.mark.parametrize("how", ["32px", "32px_up", "blur", "noise_float"])
def test_robust_to_degraded_images(examples, how):
    rng = np.random.default_rng(0)
    exs = examples["validation"][:100]
    images = [_degrade(e.image, how, rng) for e in exs]
    result = evaluate_shapes(images, [e.caption for e in exs])
    assert result["caption"] >= 0.95, result  # measured: 1.0 for each degradation


def _swapped_colors(spec):
    a, b = spec.objects
    return CaptionSpec((ObjectSpec(b.color, a.shape), ObjectSpec(a.color, b.shape)), spec.relation)


def _caption(spec):
    a, b = spec.objects
    return f"a {a.color} {a.shape} {spec.relation} a {b.color} {b.shape}"


def test_mismatched_captions_are_unfaithful(examples):
    """Each wrong caption fails as a whole and on the attribute it gets wrong. Objects are matched
    colour first, so swapped colours show as wrong shapes (or, for two objects of one shape, as a
    wrong relation): an attribute-binding error."""
    checked = dict.fromkeys(("color swap", "relation", "shape", "size", "count", "color"), 0)
    for ex in examples["validation"][:120]:
        spec = parse_caption(ex.caption)
        if len(ex.objects) == 2:
            a, b = spec.objects
            swap_fails = "shape" if a.shape != b.shape else "relation"
            inverse = CaptionSpec(spec.objects, shapes.INVERSE_RELATION[spec.relation])
            wrong = [
                ("color swap", swap_fails, _caption(_swapped_colors(spec))),
                ("relation", "relation", _caption(inverse)),
                ("count", "count", f"a {a.color} {a.shape}"),
            ]
        else:
            (obj,) = ex.objects
            other_shape = next(s for s in shapes.SHAPES if s != obj.shape)
            other_color = next(c for c in shapes.COLORS if c != obj.color)
            partner = ObjectSpec(other_color, "square")
            two = CaptionSpec((ObjectSpec(obj.color, obj.shape), partner), "above")
            wrong = [
                ("shape", "shape", f"a {obj.color} {other_shape}"),
                ("color", "color", f"a {other_color} {obj.shape}"),
                ("count", "count", _caption(two)),
            ]
            if spec.objects[0].size_class is not None:
                flipped = "large" if obj.size_class == "small" else "small"
                wrong.append(("size", "size", f"a {flipped} {obj.color} {obj.shape}"))
        for kind, attr, caption in wrong:
            verdict = score_caption(ex.image, caption)
            assert verdict["caption"] is False and verdict[attr] is False, (ex.caption, caption)
            checked[kind] += 1
    assert all(checked.values()), checked


def test_two_object_paraphrases_agree(examples):
    """ "a {a} {rel} a {b}" and "a {b} {inv} a {a}" describe one image: both are faithful."""
    ex = next(e for e in examples["validation"] if len(e.objects) == 2)
    for template in range(3):
        caption = shapes.format_caption(ex.objects, ex.relation, ("two", template))
        assert score_caption(ex.image, caption)["caption"], caption


# ------------------------------------------------------------------------------------------------
# The grammar and bad inputs.


def test_parse_every_template():
    objs = (
        shapes.ShapeObject("purple", "triangle", "small", 12, (0, 0, 12, 12)),
        shapes.ShapeObject("cyan", "circle", "large", 20, (30, 0, 50, 20)),
    )
    for form, templates in shapes.TEMPLATES.items():
        for i in range(len(templates)):
            if form == "two":
                caption = shapes.format_caption(objs, "to the left of", (form, i))
                spec = parse_caption(caption.upper() + ".")  # case and a full stop are ignored
                if i == 2:  # "a {b} {inv} a {a}": mention order b, a
                    assert spec == CaptionSpec(
                        (ObjectSpec("cyan", "circle"), ObjectSpec("purple", "triangle")),
                        "to the right of",
                    )
                else:
                    assert spec == CaptionSpec(
                        (ObjectSpec("purple", "triangle"), ObjectSpec("cyan", "circle")),
                        "to the left of",
                    )
            else:
                spec = parse_caption(shapes.format_caption(objs[:1], "none", (form, i)))
                size = "small" if form == "one_sized" else None
                assert spec == CaptionSpec((ObjectSpec("purple", "triangle", size),), "none")


@pytest.mark.parametrize(
    "caption",
    ["a pink circle", "a red hexagon", "two red circles", "a red circle near a blue square",
     "a medium red circle", ""],
)  # fmt: skip
def test_captions_outside_the_grammar_are_named(caption):
    with pytest.raises(ValueError, match="outside the shapes grammar") as info:
        parse_caption(caption)
    assert repr(caption) in str(info.value)


def test_evaluate_shapes_rejects_bad_input():
    image = shapes.render_example("validation", 0).image
    caption = shapes.render_example("validation", 0).caption
    with pytest.raises(ValueError, match="'a pink circle'"):
        evaluate_shapes([image, image], [caption, "a pink circle"])
    with pytest.raises(ValueError, match="at least one"):
        evaluate_shapes([], [])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        evaluate_shapes([image, image], [caption])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        evaluate_shapes([image[..., :2]], [caption])
    with pytest.raises(ValueError, match="dtype"):
        evaluate_shapes([image.astype(np.int64)], [caption])
    with pytest.raises(ValueError, match="value_range"):  # a [0, 255] float image taken as [-1, 1]
        evaluate_shapes([image.astype(np.float32)], [caption])
    with pytest.raises(ValueError, match="one string"):
        evaluate_shapes(image[None], caption)
    # Float images in another declared range are fine.
    result = evaluate_shapes([image.astype(np.float32)], [caption], value_range=(0, 255))
    assert result["caption"] == 1.0


# ------------------------------------------------------------------------------------------------
# CLIP score, Fréchet distance, diversity.


def test_clip_score_from_embeddings():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(16, 32))
    image = text + 0.3 * rng.normal(size=text.shape)  # each image near its caption
    matched = cm.clip_score_from_embeddings(image, text)
    mismatched = cm.clip_score_from_embeddings(image, np.roll(text, 1, axis=0))
    assert np.all(matched > 80) and matched.mean() > mismatched.mean() + 50
    np.testing.assert_allclose(cm.clip_score_from_embeddings(text, 3 * text), 100.0)
    assert np.all(cm.clip_score_from_embeddings(text, -text) == 0.0)  # clamped, as torchmetrics
    np.testing.assert_allclose(cm.clip_score_from_embeddings(text, -text, clamp=False), -100.0)
    with pytest.raises(ValueError, match="one shape"):
        cm.clip_score_from_embeddings(text, text[:3])


def _tiny_clip():
    text = TextConfig(vocab_size=64, context_length=8, width=32, layers=1, heads=4, mlp_dim=64,
                      eos_token_id=63)  # fmt: skip
    vision = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=4, mlp_dim=64)
    model = CLIP(text=text, vision=vision, projection_dim=16)
    rng = np.random.default_rng(0)

    def draw(path, leaf):  # NumPy draws: compiling `init` would cost seconds on CPU
        value = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
        return value + 1.0 if path[-1].key == "scale" else value

    return model, jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_params(model)))


def test_zero_shot_predictions():
    rng = np.random.default_rng(0)
    classes = rng.normal(size=(5, 8))
    images = 2.0 * classes[[3, 0, 4, 4]] + 0.01 * rng.normal(size=(4, 8))  # scale is ignored
    np.testing.assert_array_equal(cm.zero_shot_predictions(images, classes), [3, 0, 4, 4])
    # An image equally close to two prompts goes to the lower index.
    tie = cm.zero_shot_predictions(np.ones((1, 2)), np.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 0]]))
    np.testing.assert_array_equal(tie, [0])
    with pytest.raises(ValueError, match="class prompts"):
        cm.zero_shot_predictions(images, classes[:, :4])


def test_linear_probe():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    labels = rng.integers(0, 3, size=60)
    train = 3.0 * centres[labels] + 0.1 * rng.normal(size=(60, 8))  # scale is ignored
    test_labels = np.array([2, 0, 1, 1])
    test = centres[test_labels] + 0.1 * rng.normal(size=(4, 8))
    np.testing.assert_array_equal(cm.linear_probe(train, labels, test), test_labels)
    # The probe follows the labels it is given, not the clusters.
    swapped = np.array([1, 2, 0])[labels]
    np.testing.assert_array_equal(cm.linear_probe(train, swapped, test), [0, 1, 2, 2])
    with pytest.raises(ValueError, match="two classes"):
        cm.linear_probe(train, np.zeros(60, int), test)
    with pytest.raises(ValueError, match="integer labels"):
        cm.linear_probe(train, labels.astype(float), test)
    with pytest.raises(ValueError, match="embeddings"):
        cm.linear_probe(train, labels, test[:, :4])


def test_clip_metrics_through_a_tiny_clip():
    model, params = _tiny_clip()
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 62, (5, 8)).astype(np.int32)
    ids[:, -1] = 63
    images = rng.uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
    kw = dict(batch_size=2)  # one batch shape (the last batch is padded): few compilations
    # The same number as the model's own logits (images at the tower's size: no resizing).
    scores = cm.clip_scores(model, params, images, ids, clamp=False, **kw)
    out = jax.jit(model.apply)({"params": params}, ids, preprocess_images(images, 16))
    expected = 100 * np.diag(np.asarray(out.logits_per_text / out.logit_scale))
    np.testing.assert_allclose(scores, expected, atol=1e-3)
    mean = cm.clip_score(model, params, images, ids, **kw)
    assert mean == pytest.approx(np.maximum(expected, 0).mean(), abs=1e-3)
    # uint8 images of another size go through CLIP's preprocessing; embeddings are unit vectors.
    big = np.asarray(rng.integers(0, 256, (3, 32, 32, 3)), np.uint8)
    embeds = cm.clip_image_embeddings(model, params, big, **kw)
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=-1), 1.0, atol=1e-5)
    assert cm.clip_diversity(model, params, np.repeat(images[:1], 3, 0), **kw) < 1e-6
    assert cm.clip_diversity(model, params, images, **kw) > 1e-3
    assert cm.clip_frechet_distance(model, params, images, images, **kw) < 1e-6
    with pytest.raises(ValueError, match="5 images but 4 captions"):
        cm.clip_scores(model, params, images, ids[:4])
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        cm.clip_image_embeddings(model, params, images[0])


def _closed_form(mu1, s1, mu2, s2):
    """Two Gaussians in 2-D: tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)) for A = S1 S2 (positive
    eigenvalues), an identity independent of any matrix square root routine."""
    a = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(a) + 2 * np.sqrt(np.linalg.det(a)))
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


@pytest.mark.parametrize("method", ["scipy", "eigh"])
def test_frechet_distance_closed_forms(method):
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    s1 = np.array([[2.0, 0.6], [0.6, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 1.5]])  # does not commute with s1
    got = cm.frechet_distance_from_statistics(mu1, s1, mu2, s2, method=method)
    assert got == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-10)
    # Commuting covariances in 8-D: sum (sqrt a - sqrt b)^2 + |mu1 - mu2|^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    got = cm.frechet_distance_from_statistics(m1, q * a @ q.T, m2, q * b @ q.T, method=method)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_on_samples():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    assert cm.frechet_distance(x, x) < 1e-8
    assert cm.frechet_distance(x, x, method="eigh") < 1e-8
    shifts = [cm.frechet_distance(x, x + d) for d in (0.1, 0.5, 1.0, 2.0)]
    assert np.all(np.diff(shifts) > 0)
    np.testing.assert_allclose(shifts, 6 * np.array([0.1, 0.5, 1.0, 2.0]) ** 2, rtol=1e-6)
    # Samples from two known Gaussians approach the closed form.
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    s1 = np.array([[2.0, 0.6], [0.6, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 1.5]])
    a = rng.multivariate_normal(mu1, s1, 20000)
    b = rng.multivariate_normal(mu2, s2, 20000)
    assert cm.frechet_distance(a, b) == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=0.03)
    # Fewer samples than dimensions: singular covariances, both routes agree and stay finite.
    small_a, small_b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.5
    eigh = cm.frechet_distance(small_a, small_b, method="eigh")
    assert np.isfinite(eigh)
    assert cm.frechet_distance(small_a, small_b, method="scipy") == pytest.approx(eigh, rel=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        cm.frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="do not match"):
        cm.frechet_distance(x, x[:, :3])
    with pytest.raises(ValueError, match="method"):
        cm.frechet_distance(x, x, method="svd")


def test_diversity():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(1, 16))
    assert cm.diversity(np.repeat(one, 4, 0)) == pytest.approx(0.0, abs=1e-12)
    tight = one + 0.05 * rng.normal(size=(4, 16))
    spread = rng.normal(size=(4, 16))
    assert cm.diversity(spread) > cm.diversity(tight) > 0
    # Orthogonal unit vectors: cosine distance 1 for every pair; scale does not matter.
    assert cm.diversity(3 * np.eye(5)) == pytest.approx(1.0)
    # Grouped: each prompt counts once; a prompt with one sample is skipped.
    embeds = np.concatenate([np.repeat(one, 3, 0), np.eye(16)[:3], spread[:1]])
    groups = ["a"] * 3 + ["b"] * 3 + ["c"]
    assert cm.diversity(embeds, groups) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two or more"):
        cm.diversity(embeds[:2], ["x", "y"])
    with pytest.raises(ValueError, match="group labels"):
        cm.diversity(embeds, groups[:2])
