"""The OpenAPI document against the server: a bounded schemathesis run over every operation
with an admin key (no 5xx, responses as documented), and what the document must say."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvclip.service.app import create_app
from tests.live_server import live_server
from tests.service_helpers import copy_caches, make_config

ADMIN = {"X-API-Key": "fuzz-admin"}
EXAMPLES = 15  # per operation: the run stays well under two minutes


@pytest.fixture(scope="module")
def server(served_caches, tiny_encoder, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVCLIP_API_KEYS", "fuzz-admin:admin")
        caches = copy_caches(served_caches, tmp_path_factory.mktemp("fuzz") / "caches")
        app = create_app(make_config(caches, max_images=4), tiny_encoder)
        with live_server(app) as url:
            # Builds are accepted and queued but never run: a stopped job manager takes no job
            # off its queue (build workers are not what this run is about).
            app.state.kv.jobs.stop()
            yield url


# The document does not depend on the caches or keys, so it is read at collection time (one
# test per operation); the live server below is the one that answers.
schema = schemathesis.openapi.from_dict(create_app(make_config(Path("unused"))).openapi())
# Valid and invalid inputs alike: a schema-breaking request must get a documented 4xx, too.
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_operation_answers_a_server_error_or_breaks_its_schema(case, server):
    case.call_and_validate(base_url=server, headers=ADMIN,
                           checks=[not_a_server_error, response_schema_conformance, content_type_conformance,
                                   status_code_conformance])


def test_the_document_declares_what_the_server_answers(server):
    document = httpx.get(server + "/openapi.json").json()
    paths = document["paths"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert "application/json" not in paths["/metrics"]["get"]["responses"]["200"]["content"]
    top_k = next(p for p in paths["/v1/classify"]["post"]["parameters"] if p["name"] == "top_k")
    assert {"minimum": 1, "maximum": 1000}.items() <= top_k["schema"]["anyOf"][0].items()
    assert "404" in paths["/v1/caches/{name}"]["get"]["responses"]
    assert {"404", "409"} <= set(paths["/v1/caches/{name}/activate"]["post"]["responses"])
    assert {"404", "409"} <= set(paths["/v1/caches/{name}/versions/{version}"]["delete"]["responses"])
    assert {"400", "403", "415"} <= set(paths["/v1/caches/{name}/builds"]["post"]["responses"])
    assert "404" in paths["/v1/jobs/{job_id}"]["get"]["responses"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    assert paths["/v1/classify"]["post"]["responses"]["422"]["content"]["application/json"]["schema"] == error


def test_options_answers_405_with_allow(server):
    response = httpx.options(server + "/v1/classify", headers=ADMIN)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"
