"""`kvclip describe`: CuPL questions to an OpenAI-compatible endpoint, cached answers, and a file
`kvclip build --descriptions` reads."""
from __future__ import annotations

from kvclip.cache_builder.caption_cache import CaptionCache
from kvclip.cache_builder.describe import CUPL_QUESTIONS, DescribeConfig, describe_classes
from kvclip.cli import main
from kvclip.prompts import load_descriptions
from tests.fake_openai import FakeChat, serving


def _answer(body: dict) -> str:
    question = body["messages"][0]["content"]
    return f' "{question.split(" Answer")[0]} It has fur." '


def test_describe_writes_descriptions_build_reads_and_caches_answers(tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("cat\ngolden_retriever\n")
    chat = FakeChat(reply=_answer)
    out = tmp_path / "descriptions.json"
    args = ["describe", "--labels", str(tmp_path / "labels.txt"), "--model", "text-1", "--out", str(out),
            "--per-question", "1"]
    with serving(chat) as url:
        assert main([*args, "--endpoint", url]) == 0
        assert len(chat.requests) == 2 * len(CUPL_QUESTIONS)
        assert main([*args, "--endpoint", url]) == 0  # everything cached: nothing asked again
        assert len(chat.requests) == 2 * len(CUPL_QUESTIONS)
    descriptions = load_descriptions(out)
    assert list(descriptions) == ["cat", "golden_retriever"]
    assert descriptions["golden_retriever"][0] == "Describe what a golden retriever looks like. It has fur."
    assert len(descriptions["cat"]) == len(CUPL_QUESTIONS)
    assert chat.requests[0]["model"] == "text-1" and chat.requests[0]["temperature"] == 0.99
    assert "wrote 10 descriptions of 2 classes" in capsys.readouterr().out


def test_identical_answers_are_kept_once(tmp_path):
    chat = FakeChat(reply=lambda body: "A small animal.")
    with serving(chat) as url:
        got = describe_classes(["cat"], DescribeConfig(endpoint=url, model="m", per_question=2),
                               CaptionCache(tmp_path / "c"))
    assert got == {"cat": ["A small animal."]} and len(chat.requests) == 2 * len(CUPL_QUESTIONS)
