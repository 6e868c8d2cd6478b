"""hf:MODEL and openai:URL captioners, and the caption cache that spares a rebuild captioning again."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from kvclip.cache_builder.caption_cache import CachedCaptioner, CaptionCache
from kvclip.cache_builder.captioners import make_captioner
from kvclip.cache_builder.hf_captioner import HFCaptioner
from kvclip.cache_builder.openai_captioner import DEFAULT_CAPTION_PROMPT, OpenAICaptioner
from kvclip.cache_builder.sources import SupportItem
from kvclip.errors import DataError, ModelLoadError
from kvclip.images import load_image
from kvclip.vocabulary import captioner_spec
from tests.conftest import write_images
from tests.fake_openai import FakeChat, serving
from tests.tiny_hf import WORDS, save_tiny_blip


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


def _items(folder: Path, count: int) -> tuple[list[SupportItem], list]:
    paths = write_images(folder, count, size=40)
    return [SupportItem(p, "x") for p in paths], [load_image(p) for p in paths]


def test_captioner_spec_accepts_prefixed_forms():
    assert captioner_spec("hf:/models/blip") == "hf:/models/blip"
    assert captioner_spec("openai:http://127.0.0.1:8000/v1") == "openai:http://127.0.0.1:8000/v1"
    assert captioner_spec("none") == "none"
    for bad in ("hf:", "hf: ", "blip", "openai", "gpt:x", "openai:ftp://host/v1", "openai:host:8000/v1",
                "openai:http:///v1", "openai:https://user:secret@host/v1"):
        with pytest.raises(ValueError):
            captioner_spec(bad)


def test_hf_captioner_captions_a_batch_from_a_local_folder(tiny_blip, tmp_path):
    items, images = _items(tmp_path, 3)
    captioner = make_captioner(f"hf:{tiny_blip}", device=torch.device("cpu"))
    assert isinstance(captioner, HFCaptioner)
    captioner.batch_size = 2  # two batches: 2 + 1
    captions = captioner.caption(items, images)
    assert len(captions) == 3
    for caption in captions:
        assert caption and set(caption.split()) <= set(WORDS)
    assert captioner.describe() == {"name": "hf", "model": str(tiny_blip), "max_new_tokens": 30}


def test_hf_captioner_missing_weights_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="hf:"):
        HFCaptioner(str(tmp_path / "no-such-model"), torch.device("cpu"))


def test_openai_captioner_sends_prompt_and_image_and_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCLIP_CAPTION_MODEL", "vision-1")
    chat = FakeChat(reply=lambda body: "  A small square of colour on a plain background. ", fail_first=2)
    items, images = _items(tmp_path, 3)
    with serving(chat) as url:
        captioner = OpenAICaptioner(url, retries=3, timeout=30)
        captions = captioner.caption(items, images)
    assert captions == ["A small square of colour on a plain background"] * 3
    assert chat.failures == 2 and len(chat.requests) == 3
    body = chat.requests[0]
    assert body["model"] == "vision-1"
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": DEFAULT_CAPTION_PROMPT}
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert captioner.describe()["endpoint"] == url


def test_openai_captioner_runs_requests_concurrently(tmp_path):
    release = threading.Event()
    chat = FakeChat(reply=lambda body: "a thing", release=release)
    items, images = _items(tmp_path, 4)
    with serving(chat) as url:
        captioner = OpenAICaptioner(url, model="m", concurrency=3, prompt="Say what it is.")
        done: list = []
        worker = threading.Thread(target=lambda: done.append(captioner.caption(items, images)))
        worker.start()
        pause = threading.Event()  # never set: a timed wait between polls
        for _ in range(3000):  # up to ~30 s for three requests to be in flight at once
            if chat.most_in_flight >= 3:
                break
            pause.wait(0.01)
        release.set()
        worker.join(60)
    assert chat.most_in_flight == 3
    assert done == [["a thing"] * 4]
    assert chat.requests[0]["messages"][0]["content"][0]["text"] == "Say what it is."


def test_openai_failure_after_retries_is_a_data_error(tmp_path):
    chat = FakeChat(reply=lambda body: "never", fail_first=100)
    items, images = _items(tmp_path, 1)
    with serving(chat) as url:
        with pytest.raises(DataError, match="chat endpoint .*try again"):
            OpenAICaptioner(url, model="m", retries=1, timeout=30).caption(items, images)
    assert chat.failures == 2  # the first request and one retry


def test_openai_key_from_the_environment_only_when_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "the-environment-s-key")
    chat = FakeChat(reply=lambda body: "a thing")
    items, images = _items(tmp_path, 1)
    with serving(chat) as url:
        OpenAICaptioner(url, model="m").caption(items, images)
        OpenAICaptioner(url, model="m", key_from_env=False).caption(items, images)  # a server's HTTP build
        OpenAICaptioner(url, model="m", api_key="the-caller-s-key", key_from_env=False).caption(items, images)
    assert chat.authorizations == ["Bearer the-environment-s-key", "Bearer none", "Bearer the-caller-s-key"]


def test_an_endpoint_quoting_the_key_does_not_put_it_in_the_error(tmp_path):
    key = "sk-live-0123456789"
    chat = FakeChat(reply=lambda body: "never", fail_first=100, fail_message=f"Incorrect API key provided: {key}")
    items, images = _items(tmp_path, 1)
    with serving(chat) as url:
        with pytest.raises(DataError, match="Incorrect API key provided: <api key>") as failure:
            OpenAICaptioner(url, model="m", api_key=key, retries=0, timeout=30).caption(items, images)
    assert key not in str(failure.value)


def test_openai_captioner_needs_a_model_name(monkeypatch):
    monkeypatch.delenv("KVCLIP_CAPTION_MODEL", raising=False)
    with pytest.raises(DataError, match="KVCLIP_CAPTION_MODEL"):
        OpenAICaptioner("http://127.0.0.1:9/v1")


class Counting:
    name = "counting"
    needs_images = True

    def __init__(self, tag: str = "a") -> None:
        self.tag = tag
        self.seen: list[int] = []

    def caption(self, items, images=None):
        self.seen.append(len(items))
        return [f"{self.tag} {item.path.stem}" for item in items]

    def describe(self):
        return {"name": self.name, "tag": self.tag}


def test_caption_cache_spares_a_rebuild_and_keys_on_content_and_captioner(tmp_path):
    items, images = _items(tmp_path / "img", 3)
    inner = Counting()
    first = CachedCaptioner(inner, CaptionCache(tmp_path / "cache")).caption(items, images)
    again = Counting()
    second = CachedCaptioner(again, CaptionCache(tmp_path / "cache")).caption(items, images)
    assert second == first and again.seen == []  # a new process-like instance, the same sqlite file
    copy = tmp_path / "copy.png"  # the same bytes under another name: a hit
    copy.write_bytes(items[0].path.read_bytes())
    assert CachedCaptioner(again, CaptionCache(tmp_path / "cache")).caption([SupportItem(copy, "x")]) == first[:1]
    other = Counting("b")  # another captioner configuration: captions again
    assert CachedCaptioner(other, CaptionCache(tmp_path / "cache")).caption(items, images)[0].startswith("b ")
    assert other.seen == [3]
    items[1].path.write_bytes(items[2].path.read_bytes())  # its content is now image 2's: a hit
    mixed = Counting()
    assert CachedCaptioner(mixed, CaptionCache(tmp_path / "cache")).caption(items, images) == \
        [first[0], first[2], first[2]]
    assert mixed.seen == []
