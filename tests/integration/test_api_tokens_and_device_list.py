"""Two hot paths of the fleet API, on SQLite and PostgreSQL: the token check (remembered
tokens, revoked at once) and the device list (one query whose JSON the database renders; an
answer reused for a second)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from pydantic import TypeAdapter
from sqlmodel import Session

from fleet import crud
from fleet.api import _one_reader
from fleet.app import create_app
from fleet.config import FleetSettings
from fleet.models import ApiToken, Device, DeviceModel
from fleet.ttl_cache import TtlCache
from shared.keystore import KeyStore
from tests.integration.conftest import empty_schema

pytestmark = pytest.mark.integration

ADMIN = "admin-secret-for-hot-path-tests"


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request, tmp_path, monkeypatch) -> Iterator[TestClient]:
    db = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    keys = KeyStore.create(tmp_path / "keys", now=datetime.now(UTC))
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", ADMIN)
    app = create_app(FleetSettings(db=db, keys=keys.path, data_dir=tmp_path / "fleet"))
    with TestClient(app) as test_client:
        test_client.headers["Authorization"] = f"Bearer {ADMIN}"
        yield test_client
    if db is not None:  # the next test starts from an empty schema
        empty_schema(db)


def new_token(client: TestClient, name: str, role: str) -> dict[str, str]:
    response = client.post("/api/v1/tokens", json={"name": name, "role": role})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


# -- tokens --------------------------------------------------------------------------------------


def test_a_token_revoked_through_the_api_is_refused_at_once(client):
    viewer = new_token(client, "dashboard", "viewer")
    for _ in range(2):  # the second request is answered from the remembered token
        assert client.get("/api/v1/whoami", headers=viewer).json()["name"] == "dashboard"
    assert client.delete("/api/v1/tokens/dashboard", headers=viewer).status_code == 403

    revoked = client.delete("/api/v1/tokens/dashboard")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json() == {"name": "dashboard", "role": "viewer", "revoked": True}
    refused = client.get("/api/v1/whoami", headers=viewer)
    assert refused.status_code == 401
    assert refused.json()["detail"] == "unknown or revoked token"
    assert client.get("/api/v1/devices", headers=viewer).status_code == 401

    assert client.delete("/api/v1/tokens/dashboard").status_code == 404  # already revoked
    assert client.delete("/api/v1/tokens/nobody").status_code == 404
    itself = client.delete("/api/v1/tokens/admin")
    assert itself.status_code == 409
    assert itself.json()["detail"] == "a token cannot revoke itself; use another admin token"
    entries = client.get("/api/v1/audit").json()
    assert entries["chain_ok"] is True
    newest = entries["entries"][0]
    assert (newest["action"], newest["target"]) == ("token.revoke", "dashboard")


def test_a_token_revoked_elsewhere_is_refused_once_the_service_forgets_it(client):
    clock = [1000.0]
    client.app.state.token_cache = TtlCache[str, ApiToken](5.0, clock=lambda: clock[0])
    viewer = new_token(client, "dashboard", "viewer")
    assert client.get("/api/v1/whoami", headers=viewer).status_code == 200
    with Session(client.app.state.engine) as session:  # as another replica would
        crud.revoke_token(session, name="dashboard")
        session.commit()
    assert client.get("/api/v1/whoami", headers=viewer).status_code == 200  # remembered
    clock[0] += 5.001
    assert client.get("/api/v1/whoami", headers=viewer).status_code == 401


# -- the device list -----------------------------------------------------------------------------

SEEN = datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=UTC)
DEVICES = [
    # id, online, hardware class, group, last seen, models
    ("dev-a", True, "rpi5", "site-1", SEEN, {"detector": "1.4.2", "ocr": None}),
    ("dev-b", False, 'odd "class" \\ é', None, SEEN.replace(microsecond=0), {}),
    ("dev-c", False, None, "site-2", None, {"detector": "1.4.1"}),
    ("dev-d_x", True, "rpi5", None, SEEN, {}),
    ("dev-e%x", True, "rpi5", None, SEEN, {}),
]  # in the same order whatever the database's collation


@pytest.fixture
def fleet(client) -> TestClient:
    with Session(client.app.state.engine) as session:
        for device_id, online, hardware_class, group, seen, models in DEVICES:
            session.add(
                Device(
                    id=device_id,
                    online=online,
                    hardware_class=hardware_class,
                    group=group,
                    last_seen=seen,
                )
            )
            session.flush()
            for name, version in models.items():
                session.add(
                    DeviceModel(device_id=device_id, model=name, version=version, updated_at=SEEN)
                )
        session.commit()
    return client


def expected(*ids: str) -> list[dict[str, object]]:
    """The devices as the API has always shown them: pydantic's JSON of the stored values."""
    shown = []
    for device_id, online, hardware_class, group, seen, models in DEVICES:
        if device_id in ids:
            shown.append(
                {
                    "id": device_id,
                    "online": online,
                    "hardware_class": hardware_class,
                    "group": group,
                    "last_seen": TypeAdapter(datetime | None).dump_python(seen, mode="json"),
                    "models": models,
                }
            )
    return sorted(shown, key=lambda d: str(d["id"]))


def test_the_device_list_shows_the_stored_values(fleet):
    response = fleet.get("/api/v1/devices")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == expected("dev-a", "dev-b", "dev-c", "dev-d_x", "dev-e%x")
    assert response.json()[1]["last_seen"] == "2026-11-21T12:00:00Z"
    assert response.json()[0]["last_seen"] == "2026-11-21T12:00:00.123456Z"
    assert "link" not in response.headers  # not a full page


def test_the_device_list_filters_and_pages(fleet):
    def ids(**params: object) -> list[str]:
        response = fleet.get("/api/v1/devices", params=params)
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()]

    assert ids(online=False) == ["dev-b", "dev-c"]
    assert ids(hardware_class="rpi5") == ["dev-a", "dev-d_x", "dev-e%x"]
    assert ids(hardware_class="rpi5", online=True, after="dev-a") == ["dev-d_x", "dev-e%x"]
    assert ids(search="_") == ["dev-d_x"]
    assert ids(search="v_") == []  # '_' is itself, not any character
    assert ids(search="-c") == ["dev-c"]
    assert ids(after="dev-f") == []
    assert ids(limit=2, offset=1) == ["dev-b", "dev-c"]
    first = fleet.get("/api/v1/devices", params={"limit": 2, "online": True})
    assert first.json() == expected("dev-a", "dev-d_x")
    assert first.links["next"]["url"] == "/api/v1/devices?limit=2&online=true&after=dev-d_x"
    following = fleet.get(first.links["next"]["url"])
    assert following.json() == expected("dev-e%x")
    assert "link" not in following.headers


def test_the_device_page_query_escapes_like_wildcards(fleet):
    with crud.reading(fleet.app.state.engine) as connection:
        found = crud.device_page(connection, limit=10, search="%")
        assert [d["id"] for d in found] == ["dev-e%x"]
        assert crud.device_page(connection, limit=10, search="/") == []
        assert crud.device_page(connection, limit=10, hardware_class="") != []  # no filter


def test_the_token_table_is_not_read_for_a_remembered_token(fleet):
    """A remembered token costs no query: with the token table emptied, it still works."""
    assert fleet.get("/api/v1/whoami").status_code == 200
    with Session(fleet.app.state.engine) as session:
        session.connection().execute(ApiToken.__table__.delete())  # type: ignore[attr-defined]
        session.commit()
    assert fleet.get("/api/v1/devices").json() == expected(*(d[0] for d in DEVICES))


def add_device(client: TestClient, device_id: str) -> None:
    with Session(client.app.state.engine) as session:  # as device reports would
        session.add(Device(id=device_id, online=True, last_seen=SEEN))
        session.commit()


def listed(client: TestClient) -> dict[str, str | None]:
    response = client.get("/api/v1/devices")
    assert response.status_code == 200, response.text
    return {d["id"]: d["group"] for d in response.json()}


def test_a_page_is_reused_for_the_same_query_for_a_second(fleet):
    clock = [1000.0]
    fleet.app.state.page_cache = TtlCache(1.0, clock=lambda: clock[0])
    before = listed(fleet)
    add_device(fleet, "dev-f")
    assert listed(fleet) == before  # the same answer, up to a second old
    assert "dev-f" in [d["id"] for d in fleet.get("/api/v1/devices?limit=10").json()]
    clock[0] += 1.001
    assert "dev-f" in listed(fleet)


def test_this_services_own_device_changes_are_in_the_next_page(fleet):
    fleet.app.state.page_cache = TtlCache(3600.0)
    assert listed(fleet)["dev-c"] == "site-2"
    moved = fleet.put("/api/v1/devices/dev-c/group", json={"group": "site-9"})
    assert moved.status_code == 200, moved.text
    assert listed(fleet)["dev-c"] == "site-9"
    enrolled = fleet.post("/api/v1/devices/dev-g/enroll")
    assert enrolled.status_code == 201, enrolled.text
    assert "dev-g" in listed(fleet)


def test_no_page_is_reused_with_a_zero_cache_time(fleet):
    fleet.app.state.page_cache = TtlCache(0.0)
    listed(fleet)
    add_device(fleet, "dev-f")
    assert "dev-f" in listed(fleet)


def test_one_request_at_a_time_reads_a_page_the_others_wait_for_it():
    app = SimpleNamespace(state=SimpleNamespace())
    steps: list[str] = []

    async def request(name: str, key: bytes) -> None:
        async with _one_reader(app, ("", key)):  # type: ignore[arg-type]
            steps.append(f"{name} reads")
            await asyncio.sleep(0.01)
            steps.append(f"{name} done")

    async def main() -> None:
        await asyncio.gather(
            request("a", b"limit=100"), request("b", b"limit=100"), request("c", b"limit=5")
        )

    asyncio.run(main())
    assert steps.index("b reads") > steps.index("a done")  # the same page: one at a time
    assert steps.index("c reads") < steps.index("a done")  # another page: not held up
    assert app.state.page_locks == {}
