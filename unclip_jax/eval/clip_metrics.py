"""CLIP-based sample metrics: CLIP score, Fréchet distance on CLIP image features, diversity.

- CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 x the cosine similarity of the
  CLIP image and text embeddings of each (image, caption) pair, negative values clamped to 0
  (`clamp=False` keeps them, e.g. to compare two poor models).
- Fréchet distance between two sets of features (FID's formula; with CLIP image embeddings it is
  the "FD_CLIP" of clean-fid and the unCLIP paper's zero-shot comparisons):
      d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)),
  in float64. `method="scipy"` takes the matrix square root of S_a S_b with scipy.linalg.sqrtm, as
  pytorch-fid does (including its retry with eps on the diagonals when the result is not finite,
  and dropping a negligible imaginary part). `method="eigh"` needs only symmetric eigensolvers:
  S_a S_b is similar to the symmetric PSD matrix M = S_a^(1/2) S_b S_a^(1/2), so
  tr (S_a S_b)^(1/2) = sum_i sqrt(lambda_i(M)), with tiny negative eigenvalues (round-off) clipped
  to 0. It is exact for singular covariances (fewer samples than dimensions), where sqrtm of the
  non-symmetric product is ill-conditioned. "auto" uses scipy when it imports, else eigh.
- Zero-shot classification: each image's class is the class prompt with the most similar CLIP
  text embedding (CLIP's zero-shot protocol, one prompt per class).
- Linear probe: a ridge-regression classifier (one-hot targets, closed form) fitted on the
  L2-normalised embeddings of labelled images and read on others: what the embedding encodes
  linearly, whether or not the text tower names it.
- Diversity: mean pairwise cosine distance (1 - cos) of the L2-normalised CLIP image embeddings of
  the samples of one prompt, averaged over prompts (each prompt counts once).

Model-facing functions take a `CLIP` module and its params (both towers, or the one they need)
and run one jitted forward per batch; the last batch is padded so that a call compiles once per
(model, batch shape). Images are NHWC, uint8 or float in `value_range`, of any size: CLIP's own
preprocessing (resize, centre crop, normalise) maps them to the tower's resolution.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import jax
import numpy as np

from unclip_jax.models.clip import CLIP, l2_normalize, preprocess_images

# ------------------------------------------------------------------------------------------------
# Embeddings through a CLIP model.


@functools.lru_cache(maxsize=32)
def _image_fn(model: CLIP, value_range: tuple[float, float]):
    def embed(params, images):
        x = preprocess_images(images, model.vision.image_size, value_range)
        return l2_normalize(model.apply({"params": params}, images=x).image_embeds)

    return jax.jit(embed)


@functools.lru_cache(maxsize=32)
def _text_fn(model: CLIP):
    def embed(params, input_ids, eot_positions):
        out = model.apply({"params": params}, input_ids, eot_positions=eot_positions)
        return l2_normalize(out.text_embeds)

    return jax.jit(embed)


def _batched(fn, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """fn over leading-axis batches of `arrays` (the last one padded by repetition)."""
    n = len(arrays[0])
    size = min(batch_size, n)
    out = []
    for start in range(0, n, size):
        chunk = [a[start : start + size] for a in arrays]
        real = len(chunk[0])
        if real < size:  # pad with copies of the last row: same shapes, one compilation
            chunk = [np.concatenate([c, np.repeat(c[-1:], size - real, 0)]) for c in chunk]
        out.append(np.asarray(fn(*chunk))[:real])
    return np.concatenate(out).astype(np.float32)


def _check_images(images, value_range) -> tuple[np.ndarray, tuple[float, float]]:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    if len(images) == 0:
        raise ValueError("no images given")
    if images.dtype == np.uint8:
        return images.astype(np.float32), (0.0, 255.0)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float, got dtype {images.dtype}")
    return images.astype(np.float32), (float(value_range[0]), float(value_range[1]))


def clip_image_embeddings(
    model: CLIP, params, images, *, value_range=(-1.0, 1.0), batch_size: int = 64
) -> np.ndarray:
    """L2-normalised CLIP image embeddings [N, E] float32 of images [N, H, W, 3]."""
    if model.vision is None:
        raise ValueError("this CLIP has no image tower (vision=None)")
    if model.vision.num_timesteps is not None:
        raise ValueError("a noise-aware image tower needs timesteps; use a plain CLIP for metrics")
    images, value_range = _check_images(images, value_range)
    fn = functools.partial(_image_fn(model, value_range), params)
    return _batched(fn, [images], batch_size)


def clip_text_embeddings(
    model: CLIP, params, input_ids, *, eot_positions=None, batch_size: int = 64
) -> np.ndarray:
    """L2-normalised CLIP text embeddings [N, E] float32 of token ids [N, L].

    eot_positions [N] (from `ClipTokenizer`) override the tower's pooling rule, as in training.
    """
    if model.text is None:
        raise ValueError("this CLIP has no text tower (text=None)")
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or len(input_ids) == 0:
        raise ValueError(f"input_ids must be a non-empty [N, L] array, got shape {input_ids.shape}")
    if eot_positions is None:
        # The tower's own rule, made explicit so that one compiled function serves both cases.
        eot_positions = _default_eot(model, input_ids)
    eot_positions = np.asarray(eot_positions, np.int32)
    if eot_positions.shape != (len(input_ids),):
        raise ValueError(f"eot_positions must be [{len(input_ids)}], got {eot_positions.shape}")
    fn = functools.partial(_text_fn(model), params)
    return _batched(fn, [input_ids.astype(np.int32), eot_positions], batch_size)


def _default_eot(model: CLIP, input_ids: np.ndarray) -> np.ndarray:
    if model.text.eot_pooling == "argmax":
        return input_ids.argmax(-1).astype(np.int32)
    return (input_ids == model.text.eos_token_id).argmax(-1).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# CLIP score.


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of x scaled to unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clip_score_from_embeddings(image_embeds, text_embeds, *, clamp: bool = True) -> np.ndarray:
    """Per-pair CLIP scores [N] = 100 cos(image_embeds[i], text_embeds[i]) (clamped at 0).

    Embeddings [N, E] need not be normalised.
    """
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    if a.ndim != 2 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"need two non-empty [N, E] arrays of one shape, got {a.shape}, {b.shape}")
    scores = 100.0 * (unit_rows(a) * unit_rows(b)).sum(-1)
    return np.maximum(scores, 0.0) if clamp else scores


def zero_shot_predictions(image_embeds, class_text_embeds) -> np.ndarray:
    """CLIP zero-shot classification: for each image [N, E], the index of the class prompt
    [C, E] with the highest cosine similarity (ties go to the lower index)."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(class_text_embeds, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"need non-empty [N, E] images and [C, E] class prompts, got {a.shape}, "
                         f"{b.shape}")  # fmt: skip
    return (unit_rows(a) @ unit_rows(b).T).argmax(-1)


def linear_probe(train_embeds, train_labels, test_embeds, *, ridge: float = 1e-2) -> np.ndarray:
    """Class indices [M] of `test_embeds` [M, E] from a linear probe fitted on `train_embeds`
    [N, E] with integer `train_labels` [N] in 0..C-1: ridge regression of the one-hot labels on
    the L2-normalised embeddings plus a bias, W = (A^T A + ridge I)^-1 A^T Y, then argmax (ties
    to the lower index). Closed form in float64, so it needs no tuning and is deterministic."""
    a = np.asarray(train_embeds, np.float64)
    b = np.asarray(test_embeds, np.float64)
    y = np.asarray(train_labels)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"need non-empty [N, E] train and [M, E] test embeddings, got {a.shape}, "
                         f"{b.shape}")  # fmt: skip
    if y.shape != (len(a),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(f"need {len(a)} non-negative integer labels, got {y.dtype} {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError("a linear probe needs at least two classes among the train labels")
    if not ridge > 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    design = np.c_[unit_rows(a), np.ones(len(a))]
    targets = np.eye(int(y.max()) + 1)[y]
    weights = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]),
                              design.T @ targets)  # fmt: skip
    return (np.c_[unit_rows(b), np.ones(len(b))] @ weights).argmax(-1)


def clip_scores(
    model: CLIP,
    params,
    images,
    input_ids,
    *,
    eot_positions=None,
    value_range=(-1.0, 1.0),
    batch_size: int = 64,
    clamp: bool = True,
) -> np.ndarray:
    """Per-pair CLIP scores [N] of images [N, H, W, 3] and their captions' token ids [N, L]."""
    if len(images) != len(input_ids):
        raise ValueError(f"{len(images)} images but {len(input_ids)} captions")
    image_embeds = clip_image_embeddings(
        model, params, images, value_range=value_range, batch_size=batch_size
    )
    text_embeds = clip_text_embeddings(
        model, params, input_ids, eot_positions=eot_positions, batch_size=batch_size
    )
    return clip_score_from_embeddings(image_embeds, text_embeds, clamp=clamp)


def clip_score(model: CLIP, params, images, input_ids, **kwargs) -> float:
    """The mean CLIP score of (image, caption) pairs; arguments as `clip_scores`."""
    return float(np.mean(clip_scores(model, params, images, input_ids, **kwargs)))


# ------------------------------------------------------------------------------------------------
# Fréchet distance.


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [E] and unbiased covariance [E, E] (float64) of features [N, E], N >= 2."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, E], got shape {x.shape}")
    if len(x) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {len(x)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features have non-finite values")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def _trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):  # singular product: pytorch-fid's diagonal offset
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def _resolve_method(method: str) -> str:
    if method not in ("auto", "scipy", "eigh"):
        raise ValueError(f"method must be 'auto', 'scipy' or 'eigh', got {method!r}")
    if method != "auto":
        return method
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return "eigh"
    return "scipy"


def frechet_distance_from_statistics(
    mu1, sigma1, mu2, sigma2, *, method: str = "auto", eps: float = 1e-6
) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (float64)."""
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    e = mu1.shape[0]
    if mu1.shape != (e,) or mu2.shape != (e,) or sigma1.shape != (e, e) or sigma2.shape != (e, e):
        raise ValueError(
            f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, "
            f"{sigma2.shape}"
        )
    if _resolve_method(method) == "scipy":
        tr_covmean = _trace_sqrt_product_scipy(sigma1, sigma2, eps)
    else:
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(distance, 0.0))  # round-off can dip a hair below 0 for identical sets


def frechet_distance(features_a, features_b, *, method: str = "auto") -> float:
    """Fréchet distance between two sets of features [Na, E] and [Nb, E] (each N >= 2)."""
    mu1, sigma1 = feature_statistics(features_a)
    mu2, sigma2 = feature_statistics(features_b)
    return frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2, method=method)


def clip_frechet_distance(
    model: CLIP,
    params,
    images_a,
    images_b,
    *,
    value_range=(-1.0, 1.0),
    batch_size: int = 64,
    method: str = "auto",
) -> float:
    """Fréchet distance between the L2-normalised CLIP image embeddings of two image sets."""
    kw = dict(value_range=value_range, batch_size=batch_size)
    features_a = clip_image_embeddings(model, params, images_a, **kw)
    features_b = clip_image_embeddings(model, params, images_b, **kw)
    return frechet_distance(features_a, features_b, method=method)


# ------------------------------------------------------------------------------------------------
# Diversity.


def pairwise_cosine_distance(embeddings) -> float:
    """Mean of 1 - cos over the distinct pairs of embeddings [N, E], N >= 2."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need embeddings [N, E] with N >= 2, got shape {x.shape}")
    x = unit_rows(x)
    cos = x @ x.T
    n = len(x)
    off_diagonal = (cos.sum() - np.trace(cos)) / (n * (n - 1))
    return float(max(1.0 - off_diagonal, 0.0))


def diversity(embeddings, groups: Sequence[Hashable] | None = None) -> float:
    """Mean pairwise cosine distance within each group (e.g. the prompt), averaged over groups.

    embeddings [N, E]; groups [N] labels (None: one group). Groups with one sample are skipped;
    ValueError when no group has two.
    """
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty [N, E] array, got shape {x.shape}")
    labels = [0] * len(x) if groups is None else list(groups)
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} embeddings but {len(labels)} group labels")
    members: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    per_group = [pairwise_cosine_distance(x[idx]) for idx in members.values() if len(idx) >= 2]
    if not per_group:
        raise ValueError("diversity needs at least one group with two or more samples")
    return float(np.mean(per_group))


def clip_diversity(
    model: CLIP,
    params,
    images,
    groups: Sequence[Hashable] | None = None,
    *,
    value_range=(-1.0, 1.0),
    batch_size: int = 64,
) -> float:
    """`diversity` of the CLIP image embeddings of images [N, H, W, 3] grouped by prompt."""
    embeds = clip_image_embeddings(
        model, params, images, value_range=value_range, batch_size=batch_size
    )
    return diversity(embeds, groups)
