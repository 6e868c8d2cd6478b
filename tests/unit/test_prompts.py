import json

import pytest
import torch
import torch.nn.functional as F

from kvclip.errors import DataError
from kvclip.prompts import DEFAULT_TEMPLATES, class_prompts, load_descriptions, load_templates, text_classifier


def test_default_ensemble_is_tip_adapters_seven():
    assert len(DEFAULT_TEMPLATES) == 7 and "itap of a {}." in DEFAULT_TEMPLATES


def test_templates_file_formats(tmp_path):
    lines = tmp_path / "t.txt"
    lines.write_text("# comment\na photo of a {}.\n\n{} texture.\n")
    assert load_templates(lines) == ["a photo of a {}.", "{} texture."]
    js = tmp_path / "t.json"
    js.write_text(json.dumps(["a centered satellite photo of {}."]))
    assert load_templates(js) == ["a centered satellite photo of {}."]
    js.write_text(json.dumps(["no placeholder"]))
    with pytest.raises(DataError, match="placeholder"):
        load_templates(js)


def test_classifier_averages_normalised_prompts_with_descriptions(tiny_encoder, tmp_path):
    desc = tmp_path / "d.json"
    desc.write_text(json.dumps({"golden_retriever": ["a dog with a golden coat.", "a friendly family dog."]}))
    descriptions = load_descriptions(desc)
    labels = ["golden_retriever", "tabby cat"]
    templates = ["a photo of a {}.", "art of the {}."]
    weights = text_classifier(tiny_encoder.encode_texts, labels, templates, descriptions)
    assert weights.shape[1] == 2
    prompts = class_prompts("golden_retriever", templates, descriptions)
    assert prompts[0] == "a photo of a golden retriever." and len(prompts) == 4
    expected = F.normalize(F.normalize(tiny_encoder.encode_texts(prompts), dim=-1).mean(0), dim=0)
    assert torch.allclose(weights[:, 0], expected, atol=1e-6)
    assert torch.allclose(weights.norm(dim=0), torch.ones(2), atol=1e-5)
    without = text_classifier(tiny_encoder.encode_texts, labels, templates)
    assert not torch.allclose(without[:, 0], weights[:, 0])
    assert torch.allclose(without[:, 1], weights[:, 1], atol=1e-6)


def test_descriptions_for_unknown_labels_are_an_error(tiny_encoder):
    with pytest.raises(DataError, match="not in the label set"):
        text_classifier(tiny_encoder.encode_texts, ["a"], ["{}"], {"b": ["x"]})
