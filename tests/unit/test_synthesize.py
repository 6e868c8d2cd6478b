"""Synthetic support images: CapS / SuS-SD prompts, bounded retries of black or NSFW renders,
and a work folder that spares a restarted build rendering again."""
from __future__ import annotations

import pytest
from PIL import Image

from kvclip.cache_builder.captioning import ItemCaptions
from kvclip.cache_builder.sources import SupportItem
from kvclip.cache_builder.synthesize import (
    SynthesisConfig,
    image_seed,
    synthesis_prompts,
    synthesize,
)


def test_caps_prompts_cycle_the_class_captions():
    prompts = synthesis_prompts("golden_retriever", 3, ["a dog on a sofa", "two dogs in snow."])
    assert prompts == ["A photo of golden retriever. A dog on a sofa.",
                       "A photo of golden retriever. Two dogs in snow.",
                       "A photo of golden retriever. A dog on a sofa."]


def test_sus_prompts_use_descriptions_else_the_class_name():
    assert synthesis_prompts("cat", 2, [], ["a small furry pet"]) == ["A photo of cat. A small furry pet."] * 2
    assert synthesis_prompts("cat", 2) == ["A photo of a cat."] * 2
    assert synthesis_prompts("cat", 1, ["a cat"], ["ignored"]) == ["A photo of cat. A cat."]  # captions first


class StubRenderer:
    """Renders a grey image, or a black one while `black(prompt, seed)` says so; records its calls."""

    def __init__(self, black=lambda prompt, seed: False, nsfw=lambda prompt, seed: False) -> None:
        self.black, self.nsfw = black, nsfw
        self.calls: list[list[str]] = []
        self.seeds: list[int] = []

    def __call__(self, prompts, seeds, guidance, steps):
        self.calls.append(list(prompts))
        self.seeds.extend(seeds)
        return [(Image.new("RGB", (8, 8), (0, 0, 0) if self.black(p, s) else (120, 130, 140)), self.nsfw(p, s))
                for p, s in zip(prompts, seeds)]


def test_renders_each_class_in_batches_and_resumes_from_the_work_folder(tmp_path):
    prompts = {"cat": ["A photo of a cat."] * 3, "dog": ["A photo of a dog."] * 3}
    config = SynthesisConfig(per_class=3, model="m", steps=2, batch_size=4)
    renderer = StubRenderer()
    items, report = synthesize(["cat", "dog"], prompts, config, tmp_path, lambda: renderer)
    assert [it.label for it in items] == ["cat"] * 3 + ["dog"] * 3
    assert all(it.origin == "synthetic" and it.caption.startswith("A photo of") for it in items)
    assert [len(c) for c in renderer.calls] == [4, 2]
    assert len(set(renderer.seeds)) == 6  # one seed per image
    assert (report.rendered, report.reused, report.failed) == (6, 0, [])
    (tmp_path / items[0].path.name).unlink()  # as if killed before this image was saved

    def no_model():
        raise AssertionError("everything is kept: no model should load")

    again = StubRenderer()
    items2, report2 = synthesize(["cat", "dog"], prompts, config, tmp_path, lambda: again)
    assert [it.path for it in items2] == [it.path for it in items]
    assert (report2.rendered, report2.reused) == (1, 5) and again.calls == [["A photo of a cat."]]
    _, report3 = synthesize(["cat", "dog"], prompts, config, tmp_path, no_model)
    assert report3.reused == 6
    other = SynthesisConfig(per_class=3, model="m", steps=3, batch_size=4)  # another parameter: new images
    _, report4 = synthesize(["cat", "dog"], prompts, other, tmp_path, StubRenderer)
    assert report4.rendered == 6


def test_black_and_nsfw_renders_are_retried_a_bounded_number_of_times(tmp_path):
    first_seed = {image_seed(0, "cat", 0), image_seed(0, "dog", 0)}
    renderer = StubRenderer(black=lambda p, s: s in first_seed and "cat" in p,
                            nsfw=lambda p, s: "dog" in p)  # the dog's renders are always flagged
    config = SynthesisConfig(per_class=1, model="m", retries=2)
    items, report = synthesize(["cat", "dog"], {"cat": ["A photo of a cat."], "dog": ["A photo of a dog."]},
                               config, tmp_path, lambda: renderer)
    assert [it.label for it in items] == ["cat"]
    assert report.rendered == 1 and report.retried == 1 + 2
    assert report.failed == [{"label": "dog", "prompt": "A photo of a dog.",
                              "reason": "flagged NSFW after 3 renders"}]


def test_synthetic_items_keep_their_prompts_as_captions(tmp_path):
    # The encoding step reads each item's caption: the captioning step's for a real image, the
    # prompt for a rendered one.
    items = [SupportItem(tmp_path / "a.png", "cat", "a cat on a mat"),
             SupportItem(tmp_path / "b.png", "cat", "A photo of a cat.", origin="synthetic"),
             SupportItem(tmp_path / "c.png", "cat")]
    assert ItemCaptions().caption(items) == ["a cat on a mat", "A photo of a cat.", None]
    assert not ItemCaptions.needs_images


def test_renderer_missing_weights_is_a_model_load_error(tmp_path):
    import torch

    from kvclip.cache_builder.synthesize import Renderer
    from kvclip.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="Stable Diffusion"):
        Renderer(str(tmp_path / "nothing"), torch.device("cpu"))
