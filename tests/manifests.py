"""Manifests for tests: the v1 caches in tests/fixtures were written by the builder before the
manifest became a typed model (kept as written, to prove old artifacts still load)."""
from __future__ import annotations

import json
from pathlib import Path

from kvclip.artifact import MANIFEST_FILE
from kvclip.manifest import Manifest

V1_CACHES = Path(__file__).parent / "fixtures" / "v1_caches"


def v1_manifest_json(cache: str = "pets") -> dict:
    """manifest.json of a fixture cache (pets: labelled with captions; pooled; zs: labels only)."""
    return json.loads((V1_CACHES / cache / "versions" / "v0001" / MANIFEST_FILE).read_text())


def sample_manifest(cache: str = "pets", **changes) -> Manifest:
    """A complete manifest (from a fixture cache), with top-level fields replaced by `changes`
    (plain values are validated into their models)."""
    data = v1_manifest_json(cache)
    data.pop("version"), data.pop("files")
    return Manifest.model_validate({**data, **changes})
