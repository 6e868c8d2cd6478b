"""The zero-shot text classifier W_t from prompt ensembles and per-class descriptions."""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from kvclip.errors import DataError
from kvclip.textfiles import class_text, parse_templates

# The 7-template ImageNet ensemble used by Tip-Adapter.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def load_templates(path: str | Path) -> list[str]:
    """A templates file: a JSON list of strings, or one template per line; each has one {}."""
    templates = parse_templates(Path(path).read_text(encoding="utf-8"))
    if not templates:
        raise DataError(f"{path}: no templates")
    check_templates(templates, str(path))
    return templates


def check_templates(templates: Sequence[object], source: str = "templates") -> None:
    """Each template is a string with exactly one {} where the label goes."""
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise DataError(f"{source}: every template needs exactly one {{}} placeholder; bad: {bad[:3]}")


def load_descriptions(path: str | Path) -> dict[str, list[str]]:
    """A CuPL-style JSON object {label: [sentence, ...]}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    return check_descriptions(data, str(path))


def check_descriptions(data: object, source: str = "descriptions") -> dict[str, list[str]]:
    """{label: [sentence, ...]}, as a plain dict of lists."""
    if not isinstance(data, Mapping) or not all(
        isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v) for v in data.values()
    ):
        raise DataError(f"{source}: expected a JSON object mapping each label to a list of sentences")
    return {str(k): list(v) for k, v in data.items()}


def class_prompts(
    label: str, templates: Sequence[str], descriptions: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    prompts = [t.format(class_text(label)) for t in templates]
    prompts += list((descriptions or {}).get(label, ()))
    return prompts


def text_classifier(
    encode_texts,
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    descriptions: Mapping[str, Sequence[str]] | None = None,
    on_classes: Callable[[int], None] | None = None,
    classes_per_call: int = 64,
) -> torch.Tensor:
    """W_t (D x C): per class, normalise each prompt's feature, average, normalise again.

    `encode_texts` maps a list of strings to L2-normalised features (Encoder.encode_texts).
    Classes are encoded `classes_per_call` at a time; `on_classes(n)` follows each call
    (build progress and cancellation).
    """
    if descriptions:
        unknown = sorted(set(descriptions) - set(labels))
        if unknown:
            raise DataError(f"descriptions name labels that are not in the label set: {unknown[:5]}")
    prompts = [class_prompts(label, templates, descriptions) for label in labels]
    columns = []
    for first in range(0, len(prompts), classes_per_call):
        groups = prompts[first : first + classes_per_call]
        features = F.normalize(encode_texts([p for group in groups for p in group]).float(), dim=-1)
        start = 0
        for group in groups:
            columns.append(features[start : start + len(group)].mean(dim=0))
            start += len(group)
        if on_classes is not None:
            on_classes(len(groups))
    return F.normalize(torch.stack(columns, dim=1), dim=0)
