"""`openai:URL`: captions from any OpenAI-compatible chat-completions server with vision input,
through the official `openai` client (its own retries and timeouts), several requests at once."""
from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from kvclip.errors import DataError

if TYPE_CHECKING:  # `kvclip describe` imports this module without torch or Pillow
    from PIL import Image

    from kvclip.cache_builder.sources import SupportItem

DEFAULT_CAPTION_PROMPT = ("Describe this image in one factual sentence: the main subject, what it is doing, "
                          "and the setting. No opinions, no preamble.")
MODEL_ENV = "KVCLIP_CAPTION_MODEL"
KEY_ENV = "OPENAI_API_KEY"
MAX_SIDE = 768  # images are sent downscaled: vision models read at about this size


NO_KEY = "none"  # local servers often need no key; the client insists on one


def openai_client(url: str, api_key: str | None, timeout: float, retries: int, key_from_env: bool = True):
    """`key_from_env` False: never send this process's $OPENAI_API_KEY (a server building for a
    remote caller must not hand its own key to a URL that caller chose)."""
    from openai import OpenAI  # only builds that use an endpoint import it

    key = api_key or (os.environ.get(KEY_ENV) if key_from_env else None) or NO_KEY
    return OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=retries)


def chat_text(client, model: str, content: list | str, max_tokens: int, temperature: float = 0.0) -> str:
    """One chat completion's text; a failure left after the client's retries is a DataError."""
    from openai import OpenAIError

    try:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                               max_tokens=max_tokens, temperature=temperature)
    except OpenAIError as exc:
        raise DataError(f"chat endpoint {client.base_url} (model {model!r}): {scrubbed(str(exc), client.api_key)}") from exc
    return (reply.choices[0].message.content or "").strip()


def scrubbed(text: str, api_key: str | None) -> str:
    """`text` without the API key: an endpoint may quote the key it refused, and the message
    goes into job records and logs."""
    return text.replace(api_key, "<api key>") if api_key and api_key != NO_KEY else text


class OpenAICaptioner:
    name = "openai"
    needs_images = True

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 prompt: str = DEFAULT_CAPTION_PROMPT, concurrency: int = 4, timeout: float = 60.0,
                 retries: int = 3, max_tokens: int = 60, key_from_env: bool = True) -> None:
        self.url = url
        self.model = model or os.environ.get(MODEL_ENV)
        if not self.model:
            raise DataError(f"captioner openai:{url} needs a model name: --captioner-model or {MODEL_ENV}")
        self.prompt = prompt
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.client = openai_client(url, api_key, timeout, retries, key_from_env)

    def caption(self, items: Sequence[SupportItem], images: Sequence[Image.Image] | None = None) -> list[str | None]:
        if images is None:
            raise ValueError("the openai captioner needs the images")
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, images))

    def _one(self, image: Image.Image) -> str:
        content = [{"type": "text", "text": self.prompt},
                   {"type": "image_url", "image_url": {"url": data_url(image)}}]
        text = " ".join(chat_text(self.client, self.model, content, self.max_tokens).split())
        return text.rstrip(" .") or "an image"

    def describe(self) -> dict:
        return {"name": self.name, "model": self.model, "endpoint": self.url, "prompt": self.prompt}


def data_url(image: Image.Image) -> str:
    image = image.copy()
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
