"""The devices list and a filtered audit log follow the database live, in headless Chromium:
each page watches its own filters as a topic (``devices?...``, ``audit?...``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from playwright.sync_api import expect
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet import crud
from fleet.app import create_app
from fleet.config import FleetSettings
from fleet.models import Device
from tests.integration import test_console as console_tests
from tests.integration import test_fleet as fleet_tests

pytestmark = pytest.mark.integration

keys = fleet_tests.keys
browser = console_tests.browser
ADMIN = console_tests.ADMIN


@pytest.fixture
def fleet(tmp_path, keys, monkeypatch) -> Iterator[tuple[console_tests.Fleet, Engine]]:
    """The fleet service under uvicorn (no broker) with three devices, two of them online."""
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", ADMIN)
    settings = FleetSettings(
        db=f"sqlite:///{tmp_path / 'fleet.db'}", keys=keys.path, data_dir=tmp_path / "fleet"
    )
    app = create_app(settings)
    server, thread, port = console_tests._serve(app)
    url = f"http://127.0.0.1:{port}"
    with app.state.engine.begin() as connection:
        connection.execute(
            Device.__table__.insert(),  # type: ignore[attr-defined]
            [
                {
                    "id": f"list-{i}",
                    "labels": {},
                    "pinned": {},
                    "online": i > 0,
                    "last_seen": datetime.now(UTC),
                }
                for i in range(3)
            ],
        )
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as api:
        yield console_tests.Fleet(url=url, api=api), app.state.engine
    server.should_exit = True
    thread.join(15)


def test_the_device_list_and_a_filtered_audit_log_are_live(browser, fleet):
    service, engine = fleet
    live = f"{service.url}/api/v1/console/live"
    ticket = service.api.post("/api/v1/console/ticket").json()["ticket"]
    bad = httpx.get(live, params={"topic": "devices?state=weird", "ticket": ticket})
    assert bad.status_code == 422
    assert "bad filters" in bad.json()["detail"]

    page = console_tests.new_page(browser)
    console_tests.log_in(page, service.url, ADMIN)
    console_tests.show(page, service.url, "/devices?online=false")
    expect(page.locator("#device-count")).to_have_text("Devices 1–1 of 1")
    expect(page.locator("#live-state")).to_have_attribute("data-state", "live")
    with Session(engine) as session:
        crud.set_presence(session, "list-2", online=False)
        session.commit()
    expect(page.locator("#device-count")).to_have_text("Devices 1–2 of 2")
    expect(page.locator("#device-table")).to_contain_text("list-2")

    console_tests.show(page, service.url, "/audit?action=device.")
    expect(page.locator("#live-state")).to_have_attribute("data-state", "live")
    assert page.locator('#audit-table tr[data-action="device.group"]').count() == 0
    moved = service.api.put("/api/v1/devices/list-1/group", json={"group": "lab"})
    assert moved.status_code == 200, moved.text
    expect(page.locator('#audit-table tr[data-action="device.group"]')).to_contain_text("list-1")
