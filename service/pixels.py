"""One request image -> model-input pixels (decode, then preprocess), or why it is unusable.

Kept apart from the pipeline (service/classify.py) because decode worker processes
(service/decode_worker.py) import it: it imports Pillow and kvclip.images only, no torch,
FastAPI, model or FAISS.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from kvclip.images import decode_image

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("kvclip.service")


@dataclass
class RequestImage:
    """One image as the request carried it: bytes, not yet decoded."""

    index: int  # position in the request
    name: str  # file name, or "image[i]"
    data: bytes
    refused: str | None = None  # why the image is unusable before decoding (wrong type, bad base64, too large)
    code: str = "unsupported_media_type"  # the error code of `refused`


@dataclass
class Prepared:
    index: int
    name: str
    pixels: torch.Tensor | np.ndarray | None  # uint8 3 x S x S (numpy in a decode worker), None when unusable
    error: str | None = None
    code: str = "bad_image"  # or the code the request parser refused the image with


def prepare(
    item: RequestImage,
    preprocess: Callable[[Image.Image], torch.Tensor | np.ndarray],
    max_pixels: int,
    min_size: int | None = None,
) -> Prepared:
    """Decode and preprocess one image; an unusable image becomes its own error, never the
    request's exception (so partial=true keeps the other images)."""
    if item.refused:
        return Prepared(item.index, item.name, None, item.refused, item.code)
    try:
        image = decode_image(item.data, max_pixels=max_pixels, name=item.name, min_size=min_size)
    except Exception as exc:  # ImageDecodeError, and anything a codec throws on hostile bytes
        return Prepared(item.index, item.name, None, str(exc))
    try:
        return Prepared(item.index, item.name, preprocess(image))
    except Exception as exc:  # MemoryError included: this image is too much, the others may not be
        log.warning("preprocessing image %d (%s) failed", item.index, item.name, exc_info=True)
        return Prepared(item.index, item.name, None, f"{item.name}: could not be preprocessed ({type(exc).__name__})")
