"""Support data: a labelled image folder or a JSONL manifest -> sampled, readable items."""
from __future__ import annotations

import json
import random
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kvclip.cache_builder.decoded import DecodedImages
from kvclip.cache_builder.progress import BuildMonitor
from kvclip.errors import DataError, ImageDecodeError
from kvclip.images import IMAGE_SUFFIXES, load_image
from kvclip.textfiles import class_text, parse_labels


@dataclass(frozen=True)
class SupportItem:
    path: Path
    label: str
    # Given by a manifest row; after the captioning step, the build's caption of the image
    # (cache_builder/captioning.py); a synthetic image's prompt.
    caption: str | None = None
    origin: str = "real"  # or "synthetic": rendered by the build (cache_builder/synthesize.py)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Selection:
    labels: list[str]
    items: list[SupportItem]  # readable images, grouped by class in label order
    skipped: list[Skipped] = field(default_factory=list)
    available: dict[str, int] = field(default_factory=dict)  # candidates per class

    def per_class(self) -> dict[str, int]:
        counts = {label: 0 for label in self.labels}
        for item in self.items:
            counts[item.label] += 1
        return counts


_LINK_OUT = "a symbolic link to outside {root}: not followed"


def _leaves(path: Path, within: Path | None, skipped: list[Skipped] | None) -> bool:
    """Whether `path` leads outside `within` (a link out of it); recorded in `skipped` if so."""
    if within is None or path.resolve().is_relative_to(within):
        return False
    if skipped is not None:
        skipped.append(Skipped(str(path), _LINK_OUT.format(root=within)))
    return True


def discover_folder(data_dir: str | Path, within: Path | None = None,
                    skipped: list[Skipped] | None = None) -> list[SupportItem]:
    """DATA_DIR/<label>/<image>: one sub-folder per class; other files are ignored.

    With `within` (a folder a server may read), entries whose links lead outside it are
    skipped and listed in `skipped`."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    within = None if within is None else Path(within).resolve()
    items = [
        SupportItem(path, class_dir.name)
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not _leaves(class_dir, within, skipped)
        for path in sorted(class_dir.iterdir())
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not _leaves(path, within, skipped)
    ]
    if not items:
        raise DataError(f"data folder {root} holds no images in <label>/<file> sub-folders")
    return items


def discover_images(folder: str | Path, within: Path | None = None,
                    skipped: list[Skipped] | None = None) -> list[Path]:
    """Every image file under `folder`, searched recursively (hidden files and folders skipped);
    `within` as for discover_folder."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    within = None if within is None else Path(within).resolve()
    paths = sorted(
        path for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and not _leaves(path, within, skipped)
    )
    if not paths:
        raise DataError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def read_manifest(manifest: str | Path) -> list[SupportItem]:
    """JSONL rows {"path", "label", "caption"?}; relative paths are relative to the file."""
    manifest = Path(manifest)
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read manifest {manifest}: {exc.strerror or exc}") from exc
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not isinstance(row.get("label"), str):
            raise DataError(f'{manifest}:{number}: each row needs string fields "path" and "label"')
        caption = row.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise DataError(f'{manifest}:{number}: "caption" must be a string')
        path = Path(row["path"])
        items.append(SupportItem(path if path.is_absolute() else manifest.parent / path, row["label"], caption))
    if not items:
        raise DataError(f"manifest {manifest} has no rows")
    return items


def sidecar_caption(item: SupportItem) -> str | None:
    """The manifest's caption, else the text next to the image (cat.jpg -> cat.txt); None if neither."""
    if item.caption is not None and item.caption.strip():
        return item.caption.strip()
    try:
        text = item.path.with_suffix(".txt").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or None


def read_labels_file(path: str | Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    labels = parse_labels(text)
    if not labels:
        raise DataError(f"labels file {path} is empty")
    return labels


def check_labels(labels: Sequence[str]) -> None:
    """Labels must be distinct, also as they read in prompts ('Dog' vs 'dog ', 'a_b' vs 'a b'),
    and one line each (labels files hold one per line)."""
    seen: dict[str, str] = {}
    for label in labels:
        if not label.strip():
            raise DataError("empty label")
        if "\n" in label or "\r" in label:
            raise DataError(f"label {label!r} spans several lines")
        bad = next((ch for ch in label if _unprintable(ch)), None)
        if bad is not None:
            raise DataError(f"label {label!r} holds the control character U+{ord(bad):04X} "
                            f"({unicodedata.name(bad, 'a control character')}); labels must be printable text")
        key = class_text(label).casefold()
        if key in seen:
            raise DataError(f"duplicate labels: {seen[key]!r} and {label!r} name the same class")
        seen[key] = label


# Characters that reorder or hide text (bidi overrides and isolates, marks): a label holding one
# reads differently from what it is.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unprintable(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI_CONTROLS


def order_labels(items: Iterable[SupportItem], labels: Sequence[str] | None = None) -> list[str]:
    """Sorted labels of the items, or the given list (every one of which needs images)."""
    found = sorted({item.label for item in items})
    if labels is None:
        check_labels(found)
        return found
    labels = list(labels)
    check_labels(labels)
    missing = [label for label in labels if label not in found]
    if missing:
        raise DataError(f"no images for labels: {', '.join(missing[:10])}")
    return labels


def planned_support(items: Iterable[SupportItem], labels: Sequence[str], shots: int | None) -> int:
    """How many images `select_support` will choose at most (the checking pass's size)."""
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item.label] += 1
    return sum(min(counts[label], shots if shots is not None else counts[label]) for label in labels)


def select_support(
    items: Sequence[SupportItem],
    labels: Sequence[str],
    shots: int | None,
    seed: int = 0,
    progress: bool = True,
    monitor: BuildMonitor | None = None,
    keep: DecodedImages | None = None,
) -> Selection:
    """Up to `shots` readable images per class (all when None), sampled with `seed`.

    Unreadable files are skipped, recorded, and replaced by the class's next candidates.
    `monitor` is checked before each file and advanced by each chosen image. The chosen images,
    decoded by the check, go to `keep` for the encoding step (cache_builder/decoded.py).
    """
    monitor = monitor or BuildMonitor()
    by_label: dict[str, list[SupportItem]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    selection = Selection(labels=list(labels), items=[])
    bar = tqdm(total=planned_support(items, labels, shots), desc="checking images", unit="img",
               disable=not progress)
    for label in labels:
        candidates = sorted(by_label[label], key=lambda it: str(it.path))
        random.Random(f"{seed}:{label}").shuffle(candidates)
        selection.available[label] = len(candidates)
        chosen = 0
        for item in candidates:
            if shots is not None and chosen >= shots:
                break
            monitor.check()
            try:
                image = load_image(item.path)
            except ImageDecodeError as exc:
                selection.skipped.append(Skipped(str(item.path), str(exc)))
                continue
            if keep is not None:
                keep.keep(item.path, image)
            selection.items.append(item)
            chosen += 1
            bar.update(1)
            monitor.advance(1)
        if chosen == 0:
            raise DataError(
                f"class {label!r} has no readable images ({len(candidates)} files, all skipped)"
            )
    bar.close()
    return selection
