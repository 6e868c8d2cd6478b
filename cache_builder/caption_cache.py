"""Captions already made, keyed by (image content hash, captioner key), so a rebuild does not
caption again.

Also the answer cache of `kvclip describe` (key: the question). One sqlite file (standard
library, safe across threads with one lock and across processes through sqlite's own locking).
The captioner key is the captioner's describe() as canonical JSON: another model, prompt or
endpoint is another key.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvclip.hashing import sha256_file

if TYPE_CHECKING:  # standard library only at run time: `kvclip describe` uses the cache without torch
    import torch
    from PIL import Image

    from kvclip.cache_builder.captioners import Captioner
    from kvclip.cache_builder.context import BuildConfig
    from kvclip.cache_builder.sources import SupportItem

CACHE_FILE = "captions.sqlite"
CACHE_DIR_NAME = ".caption-cache"  # under the cache folder when no --caption-cache is given


class CaptionCache:
    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        with self._lock, self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS captions (image TEXT, captioner TEXT, caption TEXT, "
                             "PRIMARY KEY (image, captioner))")

    def get_many(self, images: Sequence[str], captioner: str) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT image, caption FROM captions WHERE captioner = ? AND image IN "
                f"({','.join('?' * len(images))})", [captioner, *images]).fetchall() if images else []
        return dict(rows)

    def put_many(self, pairs: dict[str, str], captioner: str) -> None:
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO captions VALUES (?, ?, ?)",
                                 [(image, captioner, caption) for image, caption in pairs.items()])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def captioner_key(description: dict) -> str:
    return json.dumps(description, sort_keys=True, separators=(",", ":"))


class CachedCaptioner:
    """Wraps a captioner: items whose image was captioned before (same bytes, same captioner)
    take the stored caption; the rest go to the captioner, and their captions are stored."""

    def __init__(self, inner, cache: CaptionCache, hash_file: Callable[[Path], str] = sha256_file) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.needs_images = inner.needs_images
        self.key = captioner_key(inner.describe())
        self._hash_file = hash_file
        self.hits = 0
        self.misses = 0

    def caption(self, items: Sequence[SupportItem], images: Sequence[Image.Image] | None = None) -> list[str | None]:
        hashes = [self._hash_file(item.path) for item in items]
        known = self.cache.get_many(sorted(set(hashes)), self.key)
        todo = [i for i, h in enumerate(hashes) if h not in known]
        self.hits += len(items) - len(todo)
        self.misses += len(todo)
        if todo:
            made = self.inner.caption([items[i] for i in todo], None if images is None else [images[i] for i in todo])
            fresh = {hashes[i]: text for i, text in zip(todo, made) if text is not None}
            self.cache.put_many(fresh, self.key)
            known.update(fresh)
        return [known.get(h) for h in hashes]

    def describe(self) -> dict:
        return {**self.inner.describe(), "cached": self.hits}


def build_captioner(config: BuildConfig, device: torch.device) -> Captioner:
    """A build's captioner; what generates captions keeps them in the caption cache.

    For `auto` only its generator is wrapped: caption files are read afresh on every build (an
    edited .txt must win), and auto keeps counting where each caption came from."""
    from kvclip.cache_builder.captioners import AutoCaptioner, make_captioner

    captioner = make_captioner(config.captioner, config.captioner_model, device,
                               prompt=config.caption_prompt, concurrency=config.caption_concurrency,
                               api_key=config.caption_api_key, key_from_env=config.caption_key_from_env)
    folder = config.caption_cache or Path(config.out) / CACHE_DIR_NAME
    if isinstance(captioner, AutoCaptioner):
        if captioner.generator is not None:
            captioner.generator = CachedCaptioner(captioner.generator, CaptionCache(folder))
        return captioner
    if not captioner.needs_images:  # captions from files: nothing to keep
        return captioner
    return CachedCaptioner(captioner, CaptionCache(folder))
