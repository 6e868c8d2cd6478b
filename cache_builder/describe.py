"""`kvclip describe`: CuPL-style class descriptions from an OpenAI-compatible chat endpoint.

CuPL (Pratt et al., 2023) asks a language model several questions about each class and uses
the answers as extra prompts; `kvclip build --descriptions` averages them into the class
weights, and a labels-only synthetic build prompts Stable Diffusion with them (SuS-SD).
Answers are kept in a cache keyed by (question, sample, class) and the endpoint's model, so a
repeated run asks only what it has not asked before.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvclip.cache_builder.caption_cache import CaptionCache, captioner_key
from kvclip.cache_builder.openai_captioner import chat_text, openai_client
from kvclip.prompts import class_text

# CuPL's generic questions (its "base" set), {} the class name.
CUPL_QUESTIONS = (
    "Describe what a {} looks like.",
    "How can you identify a {}?",
    "What does a {} look like?",
    "Describe an image from the internet of a {}.",
    "A caption of an image of a {}:",
)
ANSWER_RULE = " Answer in one sentence."


@dataclass
class DescribeConfig:
    endpoint: str
    model: str
    questions: Sequence[str] = CUPL_QUESTIONS
    per_question: int = 2  # answers sampled per question (CuPL samples several at a high temperature)
    temperature: float = 0.99
    max_tokens: int = 60
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 3
    api_key: str | None = None


def describe_classes(labels: Sequence[str], config: DescribeConfig, cache: CaptionCache) -> dict[str, list[str]]:
    """{label: [sentence, ...]}: distinct answers, in question order."""
    key = captioner_key({"name": "describe", "model": config.model, "endpoint": config.endpoint,
                         "temperature": config.temperature, "max_tokens": config.max_tokens})
    asks = [(label, q.format(class_text(label)) + ANSWER_RULE, i)
            for label in labels for q in config.questions for i in range(config.per_question)]
    ids = [hashlib.sha256(json.dumps([question, i]).encode()).hexdigest() for _, question, i in asks]
    known = cache.get_many(sorted(set(ids)), key)
    todo = [n for n, ask_id in enumerate(ids) if ask_id not in known]
    if todo:
        client = openai_client(config.endpoint, config.api_key, config.timeout, config.retries)

        def ask(n: int) -> str:
            return clean(chat_text(client, config.model, asks[n][1], config.max_tokens, config.temperature))

        with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
            answers = dict(zip(todo, pool.map(ask, todo)))
        fresh = {ids[n]: text for n, text in answers.items() if text}
        cache.put_many(fresh, key)
        known.update(fresh)
    out: dict[str, list[str]] = {label: [] for label in labels}
    for (label, _, _), ask_id in zip(asks, ids):
        text = known.get(ask_id)
        if text and text not in out[label]:
            out[label].append(text)
    return out


def clean(text: str) -> str:
    return " ".join(text.split()).strip().strip('"')


def write_descriptions(descriptions: dict[str, list[str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(descriptions, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    temp.replace(path)
