"""Property-based: schemathesis generates requests from the server's own /openapi.json and sends them to a real
`llmkit serve` on the tiny model. Any 5xx, an undocumented status or content type, a response body or header
that does not match the spec, or a schema-violating request that is not refused with a 4xx fails the test.
Seeded and bounded (EXAMPLES per operation and mode), so a run is repeatable and takes about a minute.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server_helpers import ServerProcess

EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 40}
SEED = 20261201
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("serve-schema") / "server.log") as process:
        yield process


@pytest.fixture(scope="module")
def operations(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(spec)
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[operation.label] = operation
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /generate", "GET /health"} <= set(found)
    return found


def _fuzz(server, operation, mode: GenerationMode) -> None:
    checks = CONFORMANCE + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        case.call_and_validate(base_url=server.url, checks=checks, timeout=30)

    run()


@pytest.mark.parametrize(
    "label",
    [
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /generate",
        "GET /v1/models",
        "GET /health",
        "GET /metrics",
    ],
)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_the_server_answers_as_its_openapi_says(server, operations, label, mode):
    if mode is GenerationMode.NEGATIVE and label.startswith("GET"):
        pytest.skip("no parameters to get wrong")
    _fuzz(server, operations[label], mode)
    assert "Traceback" not in server.log()


def test_the_spec_names_the_real_statuses_and_bounds(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    completions = spec["paths"]["/v1/completions"]["post"]
    assert "422" not in completions["responses"]
    assert {"200", "400", "401", "413", "415", "429", "503", "504"} <= set(completions["responses"])
    assert set(completions["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    temperature = spec["components"]["schemas"]["CompletionRequest"]["properties"]["temperature"]["anyOf"][0]
    from llmkit.params import GenerationParams

    bounds = {type(m).__name__: m for m in GenerationParams.model_fields["temperature"].metadata}
    assert (temperature["minimum"], temperature["maximum"]) == (bounds["Ge"].ge, bounds["Le"].le)
