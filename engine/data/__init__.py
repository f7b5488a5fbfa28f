"""Image sets and batched image loading (no torch, no Qt)."""

from .images import (
    IMAGE_EXTENSIONS,
    MIN_SIDE,
    Batch,
    ImageError,
    ImageLoader,
    ImageSet,
    load_image,
    open_image_set,
    preprocess,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_SIDE",
    "Batch",
    "ImageError",
    "ImageLoader",
    "ImageSet",
    "load_image",
    "open_image_set",
    "preprocess",
]
