"""items.jsonl as a sequence parsed on access (kvclip/jsonlines.py)."""
from __future__ import annotations

import pytest

from kvclip.jsonlines import JsonLines


def test_lines_are_items_in_order_and_blank_lines_are_none():
    items = JsonLines(b'{"a": 1}\n\n{"a": "\xc3\xa9"}\n{"a": 3}')  # no newline after the last line
    assert len(items) == 3
    assert items[0] == {"a": 1} and items[1] == {"a": "é"} and items[-1] == {"a": 3}
    assert items[1:] == [{"a": "é"}, {"a": 3}] and list(items) == [{"a": 1}, {"a": "é"}, {"a": 3}]
    assert items == [{"a": 1}, {"a": "é"}, {"a": 3}] and [{"a": 1}] != items
    with pytest.raises(IndexError, match="item 3 out of range"):
        items[3]
    with pytest.raises(IndexError):
        items[-4]


def test_an_empty_file_has_no_items():
    assert len(JsonLines(b"")) == 0 and JsonLines(b"") == [] and JsonLines(b"\n") == []
