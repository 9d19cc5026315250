"""The fleet API against its own OpenAPI document, by property-based testing (schemathesis).

Schemathesis reads ``/openapi.json`` from the application and generates requests for every
operation, valid and invalid ones, with an admin token so that they get past authorisation. For
each answer it checks two things: it is not a server error (5xx), and a documented answer has
the documented shape. A bounded number of examples per operation keeps the run short. It runs
on SQLite (a fresh file) and on the test PostgreSQL database, which refuses some input that
SQLite takes (a NUL character in a string, say).

The operations are those of :mod:`fleet.api`, the API that clients and the command line use.
The console's own endpoints (``/api/v1/console/...``) are left out for now: they still answer
their refusals in a shape that their OpenAPI entries do not declare.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from fleet.app import create_app
from fleet.config import FleetSettings
from shared.keystore import KeyStore
from tests.integration.conftest import empty_schema

pytestmark = pytest.mark.integration

ADMIN = "admin-secret-for-schema-tests"
EXAMPLES_PER_OPERATION = 50


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet_app(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    root = tmp_path_factory.mktemp("schema")
    keys = KeyStore.create(root / "keys", now=datetime.now(UTC))
    db = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFLEET_ADMIN_TOKEN", ADMIN)
        app = create_app(FleetSettings(db=db, keys=keys.path, data_dir=root / "fleet"))
        with TestClient(app):  # runs the start-up: migrations, the admin token, the scheduler
            yield app
    if db is not None:  # leave the shared test database empty for the tests after this one
        empty_schema(db)


def test_no_request_gets_a_server_error_or_an_undocumented_answer(fleet_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fleet_app)
    failures: dict[str, str] = {}
    operations = [
        operation
        for operation in (result.ok() for result in schema.get_all_operations())
        if not operation.path.startswith("/api/v1/console/")
    ]
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                headers={"Authorization": f"Bearer {ADMIN}"},
                checks=[not_a_server_error, response_schema_conformance],
            )

        try:  # every operation is tried; the failures are reported together
            check()
        except (Exception, BaseExceptionGroup) as e:
            failures[operation.label] = str(e)[:2000]
    assert len(operations) > 10
    assert not failures, "\n\n".join(f"{label}:\n{error}" for label, error in failures.items())
