"""Data: tfds builders writing array_record (procedural `shapes`, the user's `image_text`), the
grain loader sharded per JAX process, and the transforms and degradations of the upsamplers.

No TensorFlow anywhere: builders receive encoded images, and reading goes through
`tfds.data_source` / `builder.as_data_source`.
"""

from typing import TYPE_CHECKING

from unclip_jax._lazy import lazy_exports

if TYPE_CHECKING:  # the names, for readers and type checkers; at run time they load on first use
    from unclip_jax.data.image_text import (
        BuildReport,
        ImageTextBuilder,
        ImageTextConfig,
        build_image_text,
    )
    from unclip_jax.data.loader import (
        batch_sharding,
        host_batch_size,
        make_loader,
        to_global,
    )
    from unclip_jax.data.shapes import ShapeObject, ShapesExample, relation_holds, render_example
    from unclip_jax.data.shapes_builder import (
        ShapesBuilder,
        ShapesConfig,
        build_shapes,
        decode_ground_truth,
    )
    from unclip_jax.data.transforms import (
        blur_degrade,
        bsr_degrade,
        crop_size,
        gaussian_blur,
        gaussian_kernel,
        jpeg_compress,
        resize_center_crop,
    )

_EXPORTS = {
    "BuildReport": "image_text",
    "ImageTextBuilder": "image_text",
    "ImageTextConfig": "image_text",
    "ShapeObject": "shapes",
    "ShapesBuilder": "shapes_builder",
    "ShapesConfig": "shapes_builder",
    "ShapesExample": "shapes",
    "batch_sharding": "loader",
    "blur_degrade": "transforms",
    "bsr_degrade": "transforms",
    "build_image_text": "image_text",
    "build_shapes": "shapes_builder",
    "crop_size": "transforms",
    "decode_ground_truth": "shapes_builder",
    "gaussian_blur": "transforms",
    "gaussian_kernel": "transforms",
    "host_batch_size": "loader",
    "jpeg_compress": "transforms",
    "make_loader": "loader",
    "relation_holds": "shapes",
    "render_example": "shapes",
    "resize_center_crop": "transforms",
    "to_global": "loader",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "BuildReport",
    "ImageTextBuilder",
    "ImageTextConfig",
    "ShapeObject",
    "ShapesBuilder",
    "ShapesConfig",
    "ShapesExample",
    "batch_sharding",
    "blur_degrade",
    "bsr_degrade",
    "build_image_text",
    "build_shapes",
    "crop_size",
    "decode_ground_truth",
    "gaussian_blur",
    "gaussian_kernel",
    "host_batch_size",
    "jpeg_compress",
    "make_loader",
    "relation_holds",
    "render_example",
    "resize_center_crop",
    "to_global",
]
