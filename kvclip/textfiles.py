"""How labels and templates files read. Shared by the builder and the client, so it imports
nothing heavy (the client does not need torch)."""
from __future__ import annotations

import json


def class_text(label: str) -> str:
    """How a label reads inside a prompt: folder-style underscores become spaces."""
    return label.replace("_", " ").strip()


def parse_labels(text: str) -> list[str]:
    """One label per line; blank lines skipped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_templates(text: str) -> list:
    """A JSON list, or one template per line; blank lines and '#' comments skipped.
    Raises json.JSONDecodeError for a broken JSON list."""
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
