"""Images -> CLIP features: averaged random views for keys, the plain view for queries."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from tqdm import tqdm

from kvclip.cache_builder.captioners import Captioner
from kvclip.cache_builder.decoded import DecodedImages
from kvclip.cache_builder.progress import BuildMonitor
from kvclip.cache_builder.sources import Skipped, SupportItem
from kvclip.errors import ImageDecodeError
from kvclip.images import load_image
from kvclip.models import Encoder

_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


def random_view_transform(encoder: Encoder) -> T.Compose:
    """Tip-Adapter's augmentation: random crop (scale 0.5-1, bicubic) and horizontal flip; uint8
    pixels, which the encoder normalises on its device (as Encoder.preprocess)."""
    return T.Compose([
        T.RandomResizedCrop(encoder.image_size, scale=(0.5, 1.0),
                            interpolation=_INTERPOLATION.get(encoder.interpolation, T.InterpolationMode.BICUBIC)),
        T.RandomHorizontalFlip(p=0.5),
        T.PILToTensor(),
    ])


@dataclass
class SupportFeatures:
    image_keys: torch.Tensor  # N x D, mean of the views' features, re-normalised
    query_features: torch.Tensor  # N x D, plain preprocess
    captions: list[str | None]
    timings: dict[str, float] = field(default_factory=dict)


def encode_support(
    encoder: Encoder,
    items: Sequence[SupportItem],
    captioner: Captioner,
    views: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    monitor: BuildMonitor | None = None,
    query_features: torch.Tensor | None = None,
    open_image: Callable[[SupportItem], Image.Image] | None = None,
) -> SupportFeatures:
    """Decode each support image once; encode `views` random views and the plain view.

    Views are drawn from torch's RNG, seeded here, in item order, so a build is repeatable.
    `batch_size` counts images; an encoder batch holds batch_size x views crops.
    `monitor` is checked before each batch and advanced by its images.
    `query_features` (len(items) x D): plain-view features already encoded (a pool build
    has them from pseudo-labelling), used instead of encoding the plain view again.
    `open_image` gives an item's image (default: decode its file); a build hands over the
    images its reading step decoded already (DecodedImages.take).
    """
    if views < 1:
        raise ValueError("views must be at least 1")
    monitor = monitor or BuildMonitor()
    augment = random_view_transform(encoder)
    open_image = open_image or (lambda item: load_image(item.path))
    captions = captioner.caption(items, None) if not captioner.needs_images else []
    keys, queries = [], []
    timings = {"decode_s": 0.0, "encode_s": 0.0, "caption_s": 0.0}
    bar = tqdm(total=len(items), desc=f"encoding support ({views} views)", unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=2) as pool, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(items), batch_size):
            monitor.check()
            chunk = items[start : start + batch_size]
            t0 = time.perf_counter()
            images = list(pool.map(open_image, chunk))
            view_pixels = encoder.pixel_batch([augment(im) for im in images for _ in range(views)])
            if query_features is None:
                plain_pixels = encoder.pixel_batch([encoder.preprocess(im) for im in images])
            t1 = time.perf_counter()
            view_features = encoder.encode_images(view_pixels).view(len(chunk), views, -1)
            keys.append(F.normalize(view_features.mean(dim=1), dim=-1).cpu())
            queries.append(encoder.encode_images(plain_pixels).cpu() if query_features is None
                           else query_features[start : start + batch_size].cpu())
            t2 = time.perf_counter()
            if captioner.needs_images:
                captions.extend(captioner.caption(chunk, images))
            timings["decode_s"] += t1 - t0
            timings["encode_s"] += t2 - t1
            timings["caption_s"] += time.perf_counter() - t2
            bar.update(len(chunk))
            monitor.advance(len(chunk))
    bar.close()
    return SupportFeatures(torch.cat(keys), torch.cat(queries), captions, timings)


def has_captions(captions: Sequence[str | None]) -> bool:
    """Caption keys exist only when every support item has a caption."""
    return bool(captions) and all(c is not None for c in captions)


def encode_captions(
    encoder: Encoder, captions: Sequence[str | None], batch_size: int = 256, monitor: BuildMonitor | None = None
) -> torch.Tensor | None:
    """Caption keys through the text tower; None when the build has no captions."""
    if not has_captions(captions):
        return None
    monitor = monitor or BuildMonitor()
    keys = []
    for start in range(0, len(captions), batch_size):
        monitor.check()
        chunk = list(captions[start : start + batch_size])
        keys.append(encoder.encode_texts(chunk).cpu())
        monitor.advance(len(chunk))
    return torch.cat(keys)


def encode_image_files(
    encoder: Encoder,
    paths: Sequence[Path],
    batch_size: int = 128,
    progress: bool = True,
    monitor: BuildMonitor | None = None,
    keep: DecodedImages | None = None,
) -> tuple[torch.Tensor, list[int], list[Skipped]]:
    """Plain-view features of image files; unreadable files are skipped and reported.

    Returns (features of the readable files, their positions in `paths`, skipped files).
    `monitor` is checked before each batch and advanced by its files, skipped ones included.
    Decoded images go to `keep`, when given (a pool build encodes some of them again).
    """
    monitor = monitor or BuildMonitor()
    def decode(path):
        try:
            image = load_image(path)
        except ImageDecodeError as exc:
            return exc
        if keep is not None:
            keep.keep(Path(path), image)
        return encoder.preprocess(image)

    features, kept, skipped = [], [], []
    bar = tqdm(total=len(paths), desc="encoding images", unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(paths), batch_size):
            monitor.check()
            pixels = []
            for offset, result in enumerate(pool.map(decode, paths[start : start + batch_size])):
                if isinstance(result, Exception):
                    skipped.append(Skipped(str(paths[start + offset]), str(result)))
                else:
                    pixels.append(result)
                    kept.append(start + offset)
            if pixels:
                features.append(encoder.encode_images(encoder.pixel_batch(pixels)).cpu())
            bar.update(min(batch_size, len(paths) - start))
            monitor.advance(min(batch_size, len(paths) - start))
    bar.close()
    dim = features[0].shape[1] if features else 0
    return (torch.cat(features) if features else torch.empty(0, dim)), kept, skipped
