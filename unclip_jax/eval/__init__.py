"""Evaluation: caption faithfulness on the shapes dataset (a pixel detector), and CLIP metrics
(CLIP score, Fréchet distance on CLIP image features, diversity)."""

from typing import TYPE_CHECKING

from unclip_jax._lazy import lazy_exports

if TYPE_CHECKING:  # the names, for readers and type checkers; at run time they load on first use
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

_EXPORTS = {
    "ATTRIBUTES": "faithfulness",
    "CaptionSpec": "faithfulness",
    "DetectedObject": "shapes_detector",
    "DetectorConfig": "shapes_detector",
    "ObjectSpec": "faithfulness",
    "clip_diversity": "clip_metrics",
    "clip_frechet_distance": "clip_metrics",
    "clip_image_embeddings": "clip_metrics",
    "clip_score": "clip_metrics",
    "clip_score_from_embeddings": "clip_metrics",
    "clip_scores": "clip_metrics",
    "clip_text_embeddings": "clip_metrics",
    "detect_objects": "shapes_detector",
    "diversity": "clip_metrics",
    "evaluate_shapes": "faithfulness",
    "feature_statistics": "clip_metrics",
    "frechet_distance": "clip_metrics",
    "frechet_distance_from_statistics": "clip_metrics",
    "parse_caption": "faithfulness",
    "relation_between": "shapes_detector",
    "score_caption": "faithfulness",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
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
