"""The first-hour fixes that need no model: the auto captioner's choices, the build summary's
wording, HTTP wording of builder errors, eval's JSON rounding, and the client commands'
exits, 401 advice, job-id check, cancel message and explain table."""
from __future__ import annotations

import functools
from pathlib import Path

import httpx
import pytest

import kvclip.clients.cli
from kvclip.build_summary import captioner_line, report_lines, tuning_lines
from kvclip.cache_builder.captioners import AutoCaptioner, make_captioner
from kvclip.cache_builder.cli import rounded
from kvclip.cache_builder.sources import SupportItem
from kvclip.clients import KvclipClient
from kvclip.clients.models import Classification
from kvclip.clients.render import classification
from kvclip.service.build_messages import for_http
from kvclip.vocabulary import DEFAULT_CAPTIONER
from tests.client_fakes import Recorder, error, job_json, run_cli


def _items(tmp_path: Path, captioned: int, total: int = 3) -> list[SupportItem]:
    items = []
    for i in range(total):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(b"")
        if i < captioned:
            path.with_suffix(".txt").write_text(f"caption {i}\n")
        items.append(SupportItem(path, "cat"))
    return items


def test_auto_is_the_default_and_never_needs_caption_files(tmp_path):
    assert DEFAULT_CAPTIONER == "auto"
    captioner = make_captioner("auto")
    assert isinstance(captioner, AutoCaptioner) and not captioner.needs_images  # no model: reads no images
    assert captioner.caption(_items(tmp_path, 0)) == [None, None, None]
    assert captioner.describe() == {"name": "auto", "sidecar": 0, "generated": 0, "uncaptioned": 3}


def test_auto_uses_the_caption_files_there_are(tmp_path):
    captioner = AutoCaptioner()
    assert captioner.caption(_items(tmp_path, 2)) == ["caption 0", "caption 1", None]
    assert captioner.describe()["uncaptioned"] == 1
    manifest_caption = SupportItem(tmp_path / "x.png", "cat", caption=" from the manifest ")
    assert AutoCaptioner().caption([manifest_caption]) == ["from the manifest"]


def test_auto_generates_what_the_files_do_not_give(tmp_path):
    class Generator:  # stands in for CocaCaptioner: captions only the images it is handed
        model_name = "fake-coca"

        def caption(self, items, images):
            return [f"generated from {im}" for im in images]

        def describe(self):
            return {"name": "coca", "model": self.model_name}

    captioner = AutoCaptioner(Generator())
    assert captioner.needs_images
    out = captioner.caption(_items(tmp_path, 1), ["im0", "im1", "im2"])
    assert out == ["caption 0", "generated from im1", "generated from im2"]
    assert captioner.describe() == {"name": "auto", "sidecar": 1, "generated": 2, "uncaptioned": 0,
                                    "model": "fake-coca"}


def test_captioner_line_says_what_is_served():
    assert "caps needs a caption for every image" in captioner_line(
        {"name": "auto", "sidecar": 1, "generated": 0, "uncaptioned": 2})
    assert "serves caps too" in captioner_line({"name": "auto", "sidecar": 3, "generated": 0, "uncaptioned": 0})
    assert "no caps" in captioner_line({"name": "none"})


def test_report_lines_warn_about_short_classes_and_show_the_pool():
    report = {"source": "uploaded archive pool.zip", "used": 3, "candidates": 5, "skipped_count": 1,
              "skipped": [{"path": "bad.png", "reason": "not an image"}], "short_classes": {"cat": 1, "dog": 2},
              "pool": {"usable": 4, "images": 5, "empty_classes": ["bird"],
                       "per_class": {"cat": {"count": 1}, "dog": {"count": 2}, "bird": {"count": 0}}},
              "captioner": {"name": "none"}}
    text = "\n".join(report_lines(report))
    assert "warning: fewer support images than asked for in cat (1), dog (2)" in text
    assert "per class: cat 1, dog 2, bird 0" in text and "no pool image for: bird" in text
    assert "skipped bad.png: not an image" in text and "captions: none" in text
    assert "uploaded archive pool.zip" in text


def test_pool_tuning_lines_explain_the_perfect_zero_shot_score():
    text = "\n".join(tuning_lines({"zeroshot": 1.0, "tip": 0.9}, "tip", {"alpha": 1.0, "beta": 5.5},
                                  pool_build=True))
    assert "agreement with the zero-shot pseudo-labels" in text and "not accuracies" in text
    assert "method auto serves tip (alpha 1, beta 5.5)" in text
    assert "leave-one-out top-1 on the support set" in "\n".join(tuning_lines({"tip": 0.5}, "tip", {}, False))


def test_http_wording_has_no_work_folder_and_no_flags(tmp_path):
    work = tmp_path / "jobs" / "ab12" / "data"
    message = (f"no caption for {work}/cat/1.png: expected a non-empty {work}/cat/1.txt; use --captioner auto "
               "or --captioner none, or fewer --shots")
    worded = for_http(message, {work: "archive data.zip"})
    assert str(tmp_path) not in worded and "--" not in worded
    assert "cat/1.png" in worded and 'the option "captioner": "auto"' in worded and 'the option "shots"' in worded


def test_eval_json_rounds_float32_noise():
    assert rounded({"top1": 0.03999999910593033, "n": 3, "m": [0.12345678]}) == {"top1": 0.04, "n": 3,
                                                                                  "m": [0.123457]}


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("KVCLIP_API_KEY", "k")

    def script(*answers) -> Recorder:
        handler = Recorder(*answers)
        monkeypatch.setattr(kvclip.clients.cli, "KvclipClient", functools.partial(
            KvclipClient, transport=httpx.MockTransport(handler), sleep=lambda s: None))
        return handler

    return script


def test_a_401_names_the_cli_ways_to_give_a_key(server, capsys):
    server(error(401, "unauthorized", "an API key is required: send 'Authorization: Bearer KEY'"))
    code, _, err = run_cli(capsys, "caches", "list")
    assert code == 1 and "$KVCLIP_API_KEY" in err and "--api-key-file" in err and "Bearer" not in err


def test_an_invalid_job_id_is_a_usage_error_without_a_regex(server, capsys):
    handler = server(httpx.Response(200, json=job_json("running")))
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "jobs", "show", "not-a-job!")
    assert exit_.value.code == 2 and not handler.requests
    err = capsys.readouterr().err
    assert "is not a job id" in err and "[0-9a-f]" not in err


def test_cancel_says_a_cancel_was_requested(server, capsys):
    server(httpx.Response(202, json=job_json("running", cancel_requested=True, step="encoding")))
    code, out, _ = run_cli(capsys, "jobs", "cancel", "ab12")
    assert code == 0 and out.startswith("cancel requested for job ab12")


def test_explain_table_puts_affinities_under_their_own_header():
    answer = Classification.from_json({
        "cache": "pets", "version": "v0001", "method": "tip", "model": "tiny-random",
        "results": [{"index": 0, "name": "a.png", "labels": [{"label": "cat", "score": 0.9, "logit": 3.0}],
                     "neighbors": [{"item": 3, "label": "cat", "affinity": 0.71, "name": "c.png"}]}]})
    header = classification(answer).splitlines()[1].split()
    assert header == ["image", "rank", "label", "score", "affinity"]


def test_explain_table_says_where_each_support_item_came_from():
    prompt = "A photo of cat. A cat on a rug."
    answer = Classification.from_json({
        "cache": "pets", "version": "v0001", "method": "caps", "model": "tiny-random",
        "results": [{"index": 0, "name": "a.png", "labels": [{"label": "cat", "score": 0.9, "logit": 3.0}],
                     "neighbors": [
                         {"item": 3, "label": "cat", "affinity": 0.71, "name": "c.png", "caption": "a cat",
                          "origin": "real", "prompt": None, "generator": None},
                         {"item": 7, "label": "cat", "affinity": 0.65, "name": "9f2e.png", "caption": prompt,
                          "origin": "synthetic", "prompt": prompt, "generator": "CompVis/stable-diffusion-v1-4"},
                         {"item": 8, "label": "cat", "affinity": 0.5, "name": "d.png"}]}]})  # an older server
    lines = classification(answer).splitlines()
    assert '~ cat (item 3, real, c.png) "a cat"' in lines[3]
    assert (f'~ cat (item 7, synthetic by CompVis/stable-diffusion-v1-4, 9f2e.png) prompt "{prompt}"'
            in lines[4])
    assert "~ cat (item 8, real, d.png)" in lines[5]


def test_a_job_report_counts_support_items_per_class_by_origin():
    # kvclip caches build prints what kvclip build prints: the renders and real/synthetic per class.
    report = {"source": "uploaded archive pets.zip", "used": 10, "candidates": 4, "skipped_count": 0,
              "captioner": {"name": "hf", "model": "<server path>/blip", "cached": 4},
              "origin_per_class": {"cat": {"real": 2, "synthetic": 3}, "dog": {"real": 2, "synthetic": 3}},
              "synthesis": {"rendered": 5, "reused": 0, "retried": 1,
                            "failed": [{"label": "dog", "prompt": "A photo of dog.", "reason": "black image after 3 renders"}]}}
    lines = report_lines(report)
    assert "  captions: hf (4 from the caption cache); every image captioned (serves caps too)" in lines
    assert ("  synthetic: 5 rendered, 0 reused, 1 retried, 1 failed; per class (real/synthetic): cat 2/3, dog 2/3"
            in lines)
    assert "  no image for 'dog' (A photo of dog.): black image after 3 renders" in lines
