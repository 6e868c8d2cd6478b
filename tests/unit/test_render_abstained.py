"""The client's typed result and CLI table show an abstained result ("none of these")."""
from __future__ import annotations

from kvclip.clients import render
from kvclip.clients.models import Classification, ImageResult


def _response(abstained: bool | None) -> dict:
    result = {"index": 0, "name": "a.png", "labels": [{"label": "bag", "score": 0.31, "logit": 12.0}]}
    if abstained is not None:
        result["abstained"] = abstained
    return {"cache": "c", "version": "v0001", "method": "tip", "model": "tiny-random", "results": [result]}


def test_abstained_is_read_and_shown_and_defaults_to_false_for_older_servers():
    assert ImageResult.from_json(_response(None)["results"][0]).abstained is False
    shown = Classification.from_json(_response(True))
    assert shown.results[0].abstained and shown.results[0].top.label == "bag"
    text = render.classification(shown)
    assert "none of these" in text and "bag" in text
    assert "none of these" not in render.classification(Classification.from_json(_response(False)))
