"""Evaluation: caption faithfulness on the shapes dataset (a pixel detector), and CLIP metrics
(CLIP score, Fréchet distance on CLIP image features, diversity)."""

from unclip_jax.eval.clip_metrics import (
    clip_diversity,
    clip_frechet_distance,
    clip_image_embeddings,
    clip_score,
    clip_score_from_embeddings,
    clip_scores,
    clip_text_embeddings,
    diversity,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
)
from unclip_jax.eval.faithfulness import (
    ATTRIBUTES,
    CaptionSpec,
    ObjectSpec,
    evaluate_shapes,
    parse_caption,
    score_caption,
)
from unclip_jax.eval.shapes_detector import (
    DetectedObject,
    DetectorConfig,
    detect_objects,
    relation_between,
)

__all__ = [
    "ATTRIBUTES",
    "CaptionSpec",
    "DetectedObject",
    "DetectorConfig",
    "ObjectSpec",
    "clip_diversity",
    "clip_frechet_distance",
    "clip_image_embeddings",
    "clip_score",
    "clip_score_from_embeddings",
    "clip_scores",
    "clip_text_embeddings",
    "detect_objects",
    "diversity",
    "evaluate_shapes",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "parse_caption",
    "relation_between",
    "score_caption",
]
