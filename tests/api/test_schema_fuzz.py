"""Property-based API testing: schemathesis generates requests from the service's own OpenAPI
document (valid and invalid bodies, parameters, content types) against a real server.

No answer may be a 5xx, use an undocumented status code or content type, or break its schema.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_generated_requests_get_documented_answers(tiny_server: str) -> None:
    schema = schemathesis.openapi.from_url(tiny_server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7, [op.label for op in operations]
    tried: dict[str, int] = {}
    for operation in operations:
        # valid requests, and requests that break the schema on purpose (wrong types, missing parts)
        modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
        strategy = st.one_of([operation.as_strategy(generation_mode=mode) for mode in modes])

        @given(case=strategy)
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(checks=CHECKS)
            key = f"{case.operation.label} {response.status_code}"
            tried[key] = tried.get(key, 0) + 1

        check()
    print(tried)
    answered = {key.rsplit(" ", 1)[0] for key in tried}
    assert answered == {op.label for op in operations}
    # the generator reached past validation: real images are rare, but refusals by the decoder are not
    assert any(key.startswith("POST /api/v1/predict ") and key.endswith(("400", "415")) for key in tried), tried
