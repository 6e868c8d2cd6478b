"""Support images decoded by an earlier step, handed to the encoding step so it does not decode them again.

The reading step decodes every sampled image to check it (a truncated file must be replaced
by the class's next candidate before encoding starts), and a pool build decodes every pool
image to pseudo-label it. Those decoded images are kept here for the encoding step, which
takes (and so releases) each one once. Pixels are large (W x H x 3 bytes), so only a budget's
worth is kept; images past it are read from their files again when encoded.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from kvclip.images import load_image

DEFAULT_BUDGET_BYTES = 512 * 2**20


class DecodedImages:
    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget_bytes = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
        self.used_bytes = 0
        self._images: dict[Path, Image.Image] = {}
        self._lock = threading.Lock()  # the pool step decodes on two threads

    def keep(self, path: Path, image: Image.Image) -> None:
        size = _nbytes(image)
        with self._lock:
            if path not in self._images and self.used_bytes + size <= self.budget_bytes:
                self._images[path] = image
                self.used_bytes += size

    def retain(self, paths: Iterable[Path]) -> None:
        """Release every image but those of `paths` (the pool images picked as support)."""
        wanted = set(paths)
        with self._lock:
            for path in [p for p in self._images if p not in wanted]:
                self.used_bytes -= _nbytes(self._images.pop(path))

    def take(self, path: Path) -> Image.Image:
        """The image of `path`, decoded once: the kept one (released here), else read from the file."""
        with self._lock:
            image = self._images.pop(path, None)
            if image is not None:
                self.used_bytes -= _nbytes(image)
        return image if image is not None else load_image(path)

    def peek(self, path: Path) -> Image.Image:
        """The image of `path`, kept for a later take: the kept one, else read from the file."""
        with self._lock:
            image = self._images.get(path)
        return image if image is not None else load_image(path)

    def __len__(self) -> int:
        return len(self._images)


def _nbytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())
