"""Property-based conformance (issue 12): schemathesis generates requests from the OpenAPI
document of a real ``merc serve`` and checks every answer: no server error, and every
response (status code, content type, body) conforms to the documented schema. Bounded: a
few examples per operation (about 150 in all), so the run takes a minute or two, not an hour.

(``schemathesis.pytest.from_fixture`` does not work with pytest 9, so the operations are
driven by hypothesis directly, one bounded ``@given`` per operation.)"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (hypothesis comes with schemathesis)
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES_PER_OPERATION = 25
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance]
CHECKS += [content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(server_factory):
    # ?wait is capped low: a valid generated conversation is answered 202 rather than held
    return server_factory(MERC_MAX_WAIT_S="2", MERC_TEXT_WAIT_S="1", MERC_MAX_UTTERANCES="50")


def run_operation(operation, examples: int) -> int:
    """Generate and check ``examples`` requests for one operation; how many were sent."""
    sent = 0

    @given(case=operation.as_strategy())
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the first failing case is reported as is
        suppress_health_check=list(HealthCheck),
    )
    def check(case) -> None:
        nonlocal sent
        sent += 1
        case.call_and_validate(checks=CHECKS, timeout=30)

    check()
    return sent


def test_api_conforms_to_its_openapi_document(server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures, total = {}, 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:
        try:
            total += run_operation(operation, EXAMPLES_PER_OPERATION)
        except Exception as e:  # schemathesis' FailureGroup: report them all, then fail
            failures[operation.label] = str(e)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    print(f"schemathesis: {total} requests over {len(operations)} operations, 0 failures")
    assert total >= 50, total
