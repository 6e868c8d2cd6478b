"""Contract: the client's result dataclasses (clients/models.py) read what the server's response
models (service/schemas.py) promise. Derived from the models themselves, so renaming or
retyping a server field, or making one optional that the client requires, fails here."""
from __future__ import annotations

import dataclasses
import types
import typing

import pydantic
import pytest

from kvclip.clients import models as client
from kvclip.service import schemas as server

# (client dataclass, server response model): what each client class is parsed from.
PAIRS = [
    (client.Classification, server.ClassifyResponse),
    (client.ImageResult, server.ImageResult),
    (client.LabelScore, server.LabelScore),
    (client.Neighbor, server.Neighbor),
    (client.ImageError, server.ImageError),
    (client.CacheInfo, server.CacheDetail),
    (client.ReloadResult, server.ReloadResponse),
    (client.Readiness, server.ReadyResponse),
    (client.Job, server.JobInfo),
]

_SCALARS = {str: {"string"}, bool: {"boolean"}, int: {"integer"}, float: {"number", "integer"},
            type(None): {"null"}}


def contract_problems(cls: type, model: type[pydantic.BaseModel], required_only: bool = False) -> list[str]:
    """Why `cls` cannot read every response of `model` (empty: it can).

    `required_only`: check only the fields the client requires (a summary response that the
    client reads into a class whose detail fields have defaults).
    """
    schema = model.model_json_schema(mode="serialization")
    return _object_problems(cls, schema, schema.get("$defs", {}), cls.__name__, required_only)


def _object_problems(cls: type, schema: dict, defs: dict, where: str, required_only: bool = False) -> list[str]:
    hints = typing.get_type_hints(cls)
    properties, required = schema.get("properties", {}), set(schema.get("required", ()))
    problems = []
    for f in dataclasses.fields(cls):
        client_requires = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required_only and not client_requires:
            continue
        path = f"{where}.{f.name}"
        if f.name not in properties:
            problems.append(f"{path}: the server's {schema.get('title')} has no such field")
            continue
        if client_requires and f.name not in required:
            problems.append(f"{path}: the client requires it, the server may leave it out")
        problems += _value_problems(hints[f.name], properties[f.name], defs, path)
    return problems


def _value_problems(hint: object, schema: dict, defs: dict, path: str) -> list[str]:
    """Every JSON type the server may send for this value must be one the client's type reads."""
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    problems = []
    for variant in _variants(schema, defs):
        sent = variant.get("type")
        arm = next((a for a in arms if sent in _accepts(a)), None)
        if arm is None:
            problems.append(f"{path}: the server sends {sent or 'an untyped value'}, the client reads {hint}")
        elif dataclasses.is_dataclass(arm):
            problems += _object_problems(arm, variant, defs, path)
        elif typing.get_origin(arm) is list and typing.get_args(arm):
            problems += _value_problems(typing.get_args(arm)[0], variant.get("items", {}), defs, f"{path}[]")
        elif typing.get_origin(arm) is dict and isinstance(variant.get("additionalProperties"), dict):
            value = typing.get_args(arm)[1]
            problems += _value_problems(value, variant["additionalProperties"], defs, f"{path}{{}}")
    return problems


def _variants(schema: dict, defs: dict) -> list[dict]:
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in schema:
        return [v for option in schema["anyOf"] for v in _variants(option, defs)]
    return [schema]


def _accepts(arm: object) -> set[str]:
    if arm in _SCALARS:
        return _SCALARS[arm]
    origin = typing.get_origin(arm) or arm
    if origin is dict or dataclasses.is_dataclass(arm):
        return {"object"}
    if origin is list:
        return {"array"}
    return set()


@pytest.mark.parametrize("cls, model", PAIRS, ids=[c.__name__ for c, _ in PAIRS])
def test_client_models_read_what_the_server_sends(cls, model):
    assert contract_problems(cls, model) == []


def test_cache_list_entries_carry_every_field_the_client_requires():
    """caches() parses CacheSummary entries into CacheInfo: its required fields must be there."""
    assert contract_problems(client.CacheInfo, server.CacheSummary, required_only=True) == []


def test_the_contract_check_catches_a_renamed_retyped_or_optional_server_field():
    renamed = pydantic.create_model("LabelScore", name=(str, ...), score=(float, ...), logit=(float, ...))
    assert contract_problems(client.LabelScore, renamed) == [
        "LabelScore.label: the server's LabelScore has no such field"]
    retyped = pydantic.create_model("LabelScore", label=(str, ...), score=(str, ...), logit=(float, ...))
    assert contract_problems(client.LabelScore, retyped) == [
        "LabelScore.score: the server sends string, the client reads <class 'float'>"]
    optional = pydantic.create_model("LabelScore", label=(str, ...), score=(float, ...), logit=(float | None, None))
    assert contract_problems(client.LabelScore, optional) == [
        "LabelScore.logit: the client requires it, the server may leave it out",
        "LabelScore.logit: the server sends null, the client reads <class 'float'>"]
    neighbor = pydantic.create_model("Neighbor", item=(int, ...), label=(str, ...), caption=(str | None, ...),
                                     name=(str | None, ...), similarity=(float, ...), origin=(str, "real"),
                                     prompt=(str | None, None), generator=(str | None, None))
    result = pydantic.create_model("ImageResult", index=(int, ...), name=(str, ...),
                                   labels=(list[server.LabelScore], []), neighbors=(list[neighbor] | None, None),
                                   error=(server.ImageError | None, None), abstained=(bool, False))
    assert contract_problems(client.ImageResult, result) == [
        "ImageResult.neighbors[].affinity: the server's Neighbor has no such field"]
