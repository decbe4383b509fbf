"""Property-based fuzzing of the whole API from its own OpenAPI schema (schemathesis).

Every operation gets generated valid and invalid input with a real tenant's token: no answer
may be a 500, and every answer must match the schema (status codes, content types, bodies).
The tenant's quota allows one small cluster, so the few valid creates start real processes
(or Mesos tasks: it runs on both backends) and the rest are refused; everything is deleted
afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service import GiB, ServiceProcess, tenant
from tests.test_mesos_backend import MakeService, mesos, on_mesos

__all__ = ["mesos"]  # the fixture, shared with the Mesos backend tests

AUTH = {"Authorization": "Bearer token-fuzz"}


@pytest.fixture(params=["local", "mesos"])
def fuzz_service(request: pytest.FixtureRequest, make_service: MakeService,
                 mesos: Any) -> Iterator[ServiceProcess]:
    """The service on each backend; whatever the fuzzing created is deleted afterwards."""
    tenants = [tenant("fuzz", cores=2, memory=2 * GiB, clusters=1)]
    if request.param == "local":
        svc = make_service(tenants)
    else:
        svc = on_mesos(make_service, mesos(agents=1, agent_cpus=4, agent_mem=4096), tenants)
    yield svc.start()
    with svc.client("fuzz") as http:
        for c in http.get("/clusters").json()["clusters"]:
            http.delete(f"/clusters/{c['id']}")


@pytest.fixture
def api_schema(fuzz_service: ServiceProcess) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_service.url}/openapi.json")


def test_no_input_breaks_the_api(api_schema: Any) -> None:
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    seen: dict[int, int] = {}
    modes: dict[str, int] = {}
    assert len(operations) >= 9, [op.label for op in operations]
    for operation in operations:
        # Valid input by the schema, and input that breaks it (wrong types, out of range,
        # missing fields); no answer may be a 500 or fall outside the schema. (Unknown query
        # parameters are ignored, as is usual, so schemathesis's own "must reject" check is not
        # used: it counts them, and the token the test always sends, as accepted bad input.)
        cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=40, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            response = case.call_and_validate(headers=AUTH, timeout=60, checks=checks)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            mode = case.meta.generation.mode.value if case.meta else "unknown"
            modes[mode] = modes.get(mode, 0) + 1

        fuzz()
    # The run really exercised the service: successes, refusals and validation errors.
    assert {200, 201, 404, 422} <= set(seen), seen
    assert 500 not in seen
    assert modes.get("positive", 0) and modes.get("negative", 0), modes
