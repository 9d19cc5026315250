"""The web console in headless Chromium (Playwright), against the fleet service as shipped.

The fleet service runs under uvicorn on a real Mosquitto with its MQTT bridge and rollout
scheduler. Six scripted devices speak the agent's protocol over MQTT with their own client
certificates: they report their state and telemetry, receive the signed orders, and answer with
deployment events when the test says so, so the test decides when the rollout moves.

The story: an operator logs in, creates a rollout from the form (after its preview), watches the
progress move without a reload, pauses it and finds the pause in the audit log; a viewer sees no
action button and the API refuses the action too. Each page is saved as a screenshot in
``$EDGEFLEET_CONSOLE_ARTIFACTS`` (default ``test-artifacts/console/``); the browser helpers are in
:mod:`tests.integration.console_helpers`.

Waits use Playwright's own waiting with generous timeouts; nothing asserts how long a step took.
The endpoints behind the pages are also checked directly, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, expect

from fleet.app import create_app
from fleet.config import FleetSettings
from shared.protocol import device_topic
from tests.integration import test_fleet as fleet_tests
from tests.integration.conftest import free_port
from tests.integration.console_helpers import (
    WAIT_MS,
    chromium,
    log_in,
    new_page,
    shoot,
    show,
)
from tests.integration.test_fleet import signed_bundle, token
from tests.pki import issue_client
from tests.polling import wait_until

pytestmark = pytest.mark.integration

# The fleet tests' fixtures: a fresh database (SQLite, then PostgreSQL; conftest.py starts
# PostgreSQL) and a key store.
db_url = fleet_tests.db_url
keys = fleet_tests.keys

ADMIN = "admin-secret-for-console-tests"
DEVICES = {
    "cons-01": "x86_64-avx2",
    "cons-02": "x86_64-avx2",
    "cons-03": "x86_64-avx2",
    "cons-04": "x86_64-avx2",
    "cons-05": "rpi5",
    "cons-06": "rpi5",
}


# -- the fleet service and the devices -----------------------------------------------------------


@dataclass
class Fleet:
    url: str
    api: httpx.Client


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fleet-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fleet service did not start")
        time.sleep(0.05)
    return server, thread, port


@pytest.fixture
def fleet(broker, tmp_path, keys, monkeypatch) -> Iterator[Fleet]:
    """The fleet service under uvicorn, with the bridge and a fast scheduler, and two releases."""
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", ADMIN)
    cert, key = broker.pki.client("fleet-svc")
    settings = FleetSettings(
        db=f"sqlite:///{tmp_path / 'fleet.db'}",
        keys=keys.path,
        data_dir=tmp_path / "fleet",
        broker=f"mqtts://127.0.0.1:{broker.port}",
        ca_file=broker.pki.ca_cert,
        cert_file=cert,
        key_file=key,
        ingest_flush_s=0.05,
        rollout_tick_s=0.3,
    )
    app = create_app(settings)
    server, thread, port = _serve(app)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as api:
        for version in ("1.0.0", "2.0.0"):
            bundle = signed_bundle(tmp_path, keys, version)
            response = api.post("/api/v1/releases", content=bundle.read_bytes())
            assert response.status_code == 201, response.text
        yield Fleet(url=url, api=api)
    server.should_exit = True
    thread.join(15)


class ScriptedDevice:
    """A device that speaks the agent's protocol over MQTT; the test says what it reports."""

    def __init__(self, broker: Any, device_id: str, hardware_class: str) -> None:
        if device_id not in broker.pki.clients:
            issue_client(broker.pki, device_id)
        self.id = device_id
        self.hardware_class = hardware_class
        self.client = broker.client(device_id)
        self.client.subscribe_and_wait(device_topic(device_id, "down/cmd"))
        self.seq = itertools.count(1)
        self.orders: list[dict[str, Any]] = []

    def _send(self, suffix: str, body: dict[str, Any]) -> None:
        body = {"device_id": self.id, "seq": next(self.seq), "time": _now(), **body}
        self.client.publish_and_wait(device_topic(self.id, suffix), json.dumps(body).encode())

    def report_state(self, version: str) -> None:
        model = {
            "version": version,
            "runtime": "onnxruntime/CPUExecutionProvider",
            "state": "active",
        }
        self._send(
            "up/state",
            {
                "hardware_class": self.hardware_class,
                "models": {"tiny": {**model, "state": "active"}},
            },
        )

    def report_telemetry(self, k: int) -> None:
        self._send(
            "up/telemetry",
            {
                "models": {
                    "tiny": {"requests": 50 * k, "errors": k // 2, "latency_ms": {"p95": 4 + k % 3}}
                },
                "health": {
                    "cpu_percent": 10.0 + 5 * k,
                    "memory_total_mb": 2048.0,
                    "memory_available_mb": 1500.0 - 20 * k,
                },
            },
        )

    def deploy(self, version: str) -> None:
        """Report the phases of a good deployment of ``version``, then the state."""
        for phase in ("received", "verified", "installed", "activated", "committed"):
            self._send("up/events", {"model": "tiny", "version": version, "phase": phase})
        self.report_state(version)

    def fail(self, version: str, detail: str) -> None:
        self._send(
            "up/events",
            {
                "model": "tiny",
                "version": version,
                "phase": "failed",
                "failure_class": "self_test",
                "detail": detail,
            },
        )

    def ordered(self) -> bool:
        """Whether a deploy order arrived (drains what was received)."""
        while not self.client.messages.empty():
            self.orders.append(json.loads(self.client.messages.get().payload))
        return any(o.get("type") == "deploy" for o in self.orders)


def _now() -> str:
    return datetime.now(UTC).isoformat()


@pytest.fixture
def devices(broker, fleet) -> dict[str, ScriptedDevice]:
    scripted = {d: ScriptedDevice(broker, d, hw) for d, hw in DEVICES.items()}
    for device in scripted.values():
        device.report_state("1.0.0")
    for k in range(1, 8):
        scripted["cons-01"].report_telemetry(k)
    wait_until(
        lambda: (
            fleet.api.get("/api/v1/console/overview").json()["devices"]["total"] == len(DEVICES)
        ),
        what="every device registered",
        timeout=WAIT_MS / 1000,
    )
    return scripted


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


# -- the story -----------------------------------------------------------------------------------


def test_operator_runs_a_rollout_and_a_viewer_only_watches(browser, fleet, devices):
    page = new_page(browser)
    log_in(page, fleet.url, ADMIN)
    expect(page.locator(".stat").first).to_contain_text("6")
    expect(page.locator("#overview")).to_contain_text("rpi5")
    shoot(page, "overview")

    show(page, fleet.url, "/devices?hardware_class=rpi5")
    expect(page.locator("#device-count")).to_have_text("Devices 1–2 of 2")
    shoot(page, "devices")
    show(page, fleet.url, "/devices/cons-01")
    expect(page.get_by_role("img", name=re.compile("^CPU: latest"))).to_be_visible()
    shoot(page, "device")
    show(page, fleet.url, "/releases")
    expect(page.locator('[data-release="tiny@2.0.0"]')).to_contain_text("verified")
    shoot(page, "releases")

    # The form: a release, two stages, short soak, gates a six-device fleet can pass.
    show(page, fleet.url, "/rollouts")
    page.get_by_role("link", name="New rollout").click()
    page.get_by_label("Release").select_option(label="tiny 2.0.0")
    page.get_by_label("Stages (cumulative %)").fill("50, 100")
    page.get_by_label("Soak per stage (s)").fill("1")
    page.get_by_label("Inference error rate at most (%)").fill("")
    page.get_by_label("p95 latency ratio at most").fill("")
    page.get_by_label("Devices a check needs").fill("1")
    expect(page.locator("#preview-table")).to_contain_text("Stage 1 (50%)")
    expect(page.locator("#blast-radius")).to_have_text("3")
    expect(page.locator("#preview-table tr.total")).to_contain_text("3")
    shoot(page, "new-rollout")
    page.get_by_role("button", name="Start rollout").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("up to 3 devices may run it before the first gate")
    dialog.get_by_role("button", name="Start rollout").click()
    page.wait_for_url(re.compile(r"#/rollouts/r-[0-9a-f]+$"))
    rollout_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#rollout-state")).to_contain_text("running")

    # Progress moves while the page stays loaded: the canaries report, the gate passes.
    page.evaluate("window.stillTheSamePage = true")
    canaries = wait_until(
        lambda: [d for d in devices.values() if d.ordered()] or None,
        what="orders to canaries",
        timeout=WAIT_MS / 1000,
    )
    stage0 = page.locator('[data-stage="0"]')
    expect(stage0.locator('[data-part="in_progress"]')).to_have_text(f"{len(canaries)} in progress")
    for device in canaries:
        device.deploy("2.0.0")
    expect(stage0.locator('[data-part="succeeded"]')).to_have_text(f"{len(canaries)} succeeded")
    expect(page.locator("#decisions")).to_contain_text("pass")
    expect(page.locator('[data-stage="1"]')).to_have_attribute("data-state", "running")
    rest = wait_until(
        lambda: [d for d in devices.values() if d not in canaries and d.ordered()] or None,
        what="orders to the second stage",
        timeout=WAIT_MS / 1000,
    )
    assert page.evaluate("window.stillTheSamePage") is True

    # Pause, with its confirmation (while paused, no gate judges the stage); a failure that
    # arrives then shows grouped by class x hardware x runtime; the pause is in the audit log.
    page.locator('[data-action="pause"]').click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Pause this rollout?")
    dialog.get_by_role("button", name="Pause").click()
    expect(page.locator("#rollout-state")).to_contain_text("paused")
    expect(page.locator('[data-action="resume"]')).to_be_visible()
    rest[0].fail("2.0.0", "self-test failed: output y differs from the golden vector\nat y[0]")
    expect(page.locator("#failure-groups")).to_contain_text("self_test")
    shoot(page, "rollout")
    shoot(page, "rollout-paused")
    page.get_by_role("link", name="Audit log").click()
    pause = page.locator('#audit-table tr[data-action="rollout.pause"]')
    expect(pause).to_contain_text(rollout_id)
    expect(pause).to_contain_text("admin")
    expect(page.locator("#chain")).to_contain_text("Hash chain verified")
    shoot(page, "audit")
    show(page, fleet.url, "/rollouts")
    expect(page.locator(f'[data-rollout="{rollout_id}"]')).to_contain_text("paused")
    shoot(page, "rollouts")

    # Tablet width: the same pages, one column.
    tablet = new_page(browser, width=768)
    log_in(tablet, fleet.url, ADMIN)
    shoot(tablet, "overview-tablet")
    show(tablet, fleet.url, f"/rollouts/{rollout_id}")
    expect(tablet.locator('[data-action="resume"]')).to_be_visible()
    shoot(tablet, "rollout-tablet")

    # A viewer sees the rollout but no action; the API refuses the action too.
    viewer = token_secret(fleet, "console-viewer", "viewer")
    watcher = new_page(browser)
    log_in(watcher, fleet.url, viewer)
    expect(watcher.locator("#who-name")).to_have_text("console-viewer (viewer)")
    show(watcher, fleet.url, f"/rollouts/{rollout_id}")
    expect(watcher.locator("#rollout-state")).to_contain_text("paused")
    expect(watcher.locator("[data-action]")).to_have_count(0)
    show(watcher, fleet.url, "/rollouts")
    expect(watcher.get_by_role("link", name="New rollout")).to_have_count(0)
    show(watcher, fleet.url, "/rollouts/new")
    expect(watcher.get_by_role("alert")).to_contain_text("needs the operator role")
    shoot(watcher, "viewer-rollout")
    refused = httpx.post(
        f"{fleet.url}/api/v1/rollouts/{rollout_id}/resume",
        headers={"Authorization": f"Bearer {viewer}"},
    )
    assert refused.status_code == 403
    assert refused.json()["detail"] == "this action needs the operator role; the token has viewer"
    assert fleet.api.get(f"/api/v1/rollouts/{rollout_id}").json()["state"] == "paused"


def token_secret(fleet: Fleet, name: str, role: str) -> str:
    response = fleet.api.post("/api/v1/tokens", json={"name": name, "role": role})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def test_an_operator_publishes_a_signed_bundle_from_the_releases_page(
    browser, fleet, tmp_path, keys
):
    operator = token_secret(fleet, "console-operator", "operator")
    page = new_page(browser)
    log_in(page, fleet.url, operator)
    show(page, fleet.url, "/releases")

    bundle = signed_bundle(tmp_path, keys, "3.0.0")
    page.get_by_label("Signed bundle file").set_input_files(bundle)
    page.get_by_role("button", name="Upload and publish").click()
    expect(page.locator("#upload-outcome")).to_contain_text("Published tiny 3.0.0")
    published = page.locator('[data-release="tiny@3.0.0"]')
    expect(published).to_contain_text("verified")
    expect(published).to_contain_text("by console-operator")
    shoot(page, "release-uploaded")

    tampered = bytearray(signed_bundle(tmp_path, keys, "4.0.0").read_bytes())
    tampered[-1024 - 600] ^= 1
    tampered_path = tmp_path / "tiny-4.0.0-tampered.bundle"
    tampered_path.write_bytes(bytes(tampered))
    page.get_by_label("Signed bundle file").set_input_files(tampered_path)
    page.get_by_role("button", name="Upload and publish").click()
    refusal = page.locator("#upload-outcome").get_by_role("alert")
    expect(refusal).to_contain_text("tiny-4.0.0-tampered.bundle was not published: bundle refused:")
    expect(page.locator('[data-release="tiny@4.0.0"]')).to_have_count(0)
    shoot(page, "release-refused")

    viewer = new_page(browser)
    log_in(viewer, fleet.url, token_secret(fleet, "release-viewer", "viewer"))
    show(viewer, fleet.url, "/releases")
    expect(viewer.locator('[data-release="tiny@3.0.0"]')).to_be_visible()
    expect(viewer.get_by_label("Signed bundle file")).to_have_count(0)
    expect(viewer.get_by_role("button", name="Upload and publish")).to_have_count(0)


def test_bad_addresses_and_tokens_get_a_message(browser, fleet):
    page = new_page(browser)
    page.goto(fleet.url + "/")
    page.get_by_label("API token").fill("not-a-token")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-error")).to_contain_text("unknown or revoked token")
    log_in(page, fleet.url, ADMIN)
    show(page, fleet.url, "/rollouts/r-doesnotexist")
    expect(page.get_by_role("alert")).to_have_text("no rollout 'r-doesnotexist'")
    show(page, fleet.url, "/devices/no-such-device")
    expect(page.get_by_role("alert")).to_have_text("no device 'no-such-device'")
    show(page, fleet.url, "/nowhere")
    expect(page.get_by_role("alert")).to_have_text("There is no page #/nowhere.")
    shoot(page, "unknown-rollout")


def test_the_page_loads_nothing_from_elsewhere(fleet):
    page = httpx.get(fleet.url + "/")
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # every asset is served from here
    assert httpx.get(fleet.url + "/console/js/main.js").status_code == 200


# -- the live stream -------------------------------------------------------------------------


def _events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event:
            yield event, json.loads(line.removeprefix("data: "))


def test_live_stream_needs_a_ticket_and_sends_changes(fleet, devices):
    live = f"{fleet.url}/api/v1/console/live"
    assert httpx.get(live, params={"topic": "overview", "ticket": "1.2.3"}).status_code == 401
    ticket = fleet.api.post("/api/v1/console/ticket").json()["ticket"]
    tampered = ticket[:-1] + ("0" if ticket[-1] != "0" else "1")
    assert httpx.get(live, params={"topic": "overview", "ticket": tampered}).status_code == 401
    bad_topic = httpx.get(live, params={"topic": "everything", "ticket": ticket})
    assert bad_topic.status_code == 422
    assert "topic must be" in bad_topic.json()["detail"]

    with httpx.stream(
        "GET", live, params={"topic": "device/cons-02", "ticket": ticket}, timeout=60
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = _events(stream)
        event, first = next(events)
        assert (event, first["id"], first["events"]) == ("update", "cons-02", [])
        devices["cons-02"].fail("2.0.0", "install failed: disk full")
        event, second = next(events)
        assert event == "update"
        assert second["last_failure"]["detail"] == "install failed: disk full"

    with httpx.stream(
        "GET", live, params={"topic": "rollout/r-gone", "ticket": ticket}, timeout=60
    ) as stream:
        event, problem = next(_events(stream))
        assert (event, problem) == ("problem", {"detail": "no rollout 'r-gone'", "status": 404})


def test_a_stopping_server_ends_open_streams_at_once():
    """``end_live_streams`` (called by ``edgefleet fleet serve`` on SIGINT/SIGTERM) ends every
    open stream with ``bye``, instead of the stop waiting up to 30 s for them."""
    import asyncio
    import concurrent.futures

    from fleet.console import routes
    from fleet.console.live import LiveHub

    async def scenario() -> list[str]:
        hub = LiveHub(lambda topics: dict.fromkeys(topics, ("update", "{}")), interval_s=0.05)
        stream = routes._events(hub, "overview")
        chunks = [await anext(stream), await anext(stream)]  # the retry hint, the snapshot
        following = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)
        assert not following.done()  # nothing changed: the stream waits
        hub.close_threadsafe()
        chunks.append(await asyncio.wait_for(following, 2))
        return chunks

    # In a thread of its own: Playwright's sync API may run an event loop in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        chunks = pool.submit(asyncio.run, scenario()).result(timeout=30)
    assert chunks == ["retry: 1000\n\n", "event: update\ndata: {}\n\n", "event: bye\ndata: {}\n\n"]


# -- the endpoints behind the pages, on SQLite and PostgreSQL ----------------------------------


@pytest.fixture
def app_client(tmp_path, db_url, keys, monkeypatch) -> Iterator[TestClient]:
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", ADMIN)
    settings = FleetSettings(db=db_url, keys=keys.path, data_dir=tmp_path / "fleet")
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN}"
        yield client


def _store_devices(client: TestClient) -> None:
    from sqlmodel import Session

    from fleet import crud
    from shared.protocol import DeploymentEvent, ModelState, ReportedState

    now = datetime.now(UTC)
    with Session(client.app.state.engine) as session:
        for i in range(12):
            crud.ingest_state(
                session,
                ReportedState(
                    device_id=f"d-{i:02d}",
                    seq=1,
                    time=now,
                    hardware_class="rpi5" if i % 3 == 0 else "x86_64-avx2",
                    models={
                        "tiny": ModelState(
                            version="1.0.0" if i < 9 else "0.9.0",
                            runtime="litert/xnnpack" if i % 3 == 0 else "onnxruntime/CPU",
                            state="failed" if i == 11 else "active",
                        )
                    },
                ),
            )
        crud.set_presence(session, "d-00", online=False)
        crud.ingest_events(
            session,
            [
                DeploymentEvent(
                    device_id="d-01",
                    seq=2,
                    time=now - timedelta(seconds=5),
                    model="tiny",
                    version="1.0.0",
                    phase="failed",
                    failure_class="self_test",
                    detail="golden mismatch",
                )
            ],
        )
        session.commit()


def test_overview_counts_by_class_runtime_version_and_state(app_client):
    _store_devices(app_client)
    data = app_client.get("/api/v1/console/overview").json()
    assert data["devices"] == {"total": 12, "online": 11, "offline": 1}
    assert data["hardware_classes"] == [
        {"name": "x86_64-avx2", "devices": 8, "online": 8},
        {"name": "rpi5", "devices": 4, "online": 3},
    ]
    assert data["runtimes"] == [
        {"name": "onnxruntime", "devices": 8},
        {"name": "litert", "devices": 4},
    ]
    assert data["models"] == [
        {"model": "tiny", "version": "1.0.0", "devices": 9, "states": {"active": 9}},
        {"model": "tiny", "version": "0.9.0", "devices": 3, "states": {"active": 2, "failed": 1}},
    ]
    assert data["states"] == {"active": 11, "failed": 1}
    assert data["rollouts"] == []


def test_device_pages_filter_paginate_and_say_what_is_missing(app_client):
    _store_devices(app_client)
    page = app_client.get("/api/v1/console/devices", params={"limit": 5, "offset": 5}).json()
    assert page["total"] == 12
    assert [d["id"] for d in page["devices"]] == [f"d-{i:02d}" for i in range(5, 10)]
    rpi_old = app_client.get(
        "/api/v1/console/devices",
        params={"hardware_class": "rpi5", "model": "tiny", "version": "0.9.0"},
    ).json()
    assert [d["id"] for d in rpi_old["devices"]] == ["d-09"]
    offline = app_client.get("/api/v1/console/devices", params={"online": False}).json()
    assert [d["id"] for d in offline["devices"]] == ["d-00"]
    like = app_client.get("/api/v1/console/devices", params={"search": "%"}).json()
    assert like["total"] == 0  # a wildcard is searched as text
    failed = app_client.get("/api/v1/console/devices", params={"state": "failed"}).json()
    assert [d["id"] for d in failed["devices"]] == ["d-11"]
    assert app_client.get("/api/v1/console/devices", params={"state": "weird"}).status_code == 422

    detail = app_client.get("/api/v1/console/devices/d-01").json()
    assert detail["last_failure"]["detail"] == "golden mismatch"
    assert detail["models"][0]["runtime"] == "onnxruntime/CPU"
    missing = app_client.get("/api/v1/console/devices/nope")
    assert (missing.status_code, missing.json()) == (404, {"detail": "no device 'nope'"})
    gone = app_client.get("/api/v1/console/rollouts/r-nope")
    assert (gone.status_code, gone.json()) == (404, {"detail": "no rollout 'r-nope'"})


def test_preview_matches_the_rollout_it_starts(app_client, tmp_path, keys):
    _store_devices(app_client)
    bundle = signed_bundle(tmp_path, keys, "2.0.0")
    assert app_client.post("/api/v1/releases", content=bundle.read_bytes()).status_code == 201
    body = {"model": "tiny", "version": "2.0.0", "stages": [25, 100], "gates": {"min_sample": 1}}
    preview = app_client.post("/api/v1/console/rollouts/preview", json=body).json()
    assert preview["target_devices"] == 12
    assert preview["previous_version"] == "1.0.0"
    assert preview["stage_sizes"] == [3, 9]
    assert preview["blast_radius"] == 3
    assert sum(n for counts in preview["by_hardware_class"].values() for n in counts) == 12
    assert preview["conflict"] is None
    started = app_client.post(
        "/api/v1/rollouts",
        json={"model": "tiny", "version": "2.0.0", "target": "", "plan": preview["plan"]},
    )
    assert started.status_code == 201, started.text
    rollout_id = started.json()["id"]
    stored = app_client.get(f"/api/v1/rollouts/{rollout_id}/preview").json()
    assert stored["by_hardware_class"] == preview["by_hardware_class"]
    assert stored["blast_radius"] == preview["blast_radius"]
    again = app_client.post("/api/v1/console/rollouts/preview", json=body).json()
    assert again["conflict"].startswith(f"rollout {rollout_id} of tiny is still")

    page = app_client.get(f"/api/v1/console/rollouts/{rollout_id}").json()
    assert page["actions"] == ["pause", "promote", "retry-failed", "abort"]
    assert [s["soak_s"] for s in page["stages"]] == [600.0, 600.0]
    assert page["plan"]["gates"]["min_sample"] == 1
    overview = app_client.get("/api/v1/console/overview").json()
    assert [r["id"] for r in overview["rollouts"]] == [rollout_id]

    unknown = app_client.post("/api/v1/console/rollouts/preview", json={**body, "version": "9.9.9"})
    assert unknown.status_code == 422
    assert unknown.json()["detail"] == "no published release tiny 9.9.9; publish it first"
    bad_stages = app_client.post(
        "/api/v1/console/rollouts/preview", json={**body, "stages": [50, 90]}
    )
    assert bad_stages.status_code == 422
    assert "the last stage must be percent=100" in bad_stages.json()["detail"]
    bad_target = app_client.post(
        "/api/v1/console/rollouts/preview", json={**body, "target": "colour=red"}
    )
    assert bad_target.status_code == 422
    assert "target selector parts are" in bad_target.json()["detail"]


def test_console_reads_need_a_token_and_actions_need_the_operator_role(app_client):
    assert (
        app_client.get("/api/v1/console/overview", headers={"Authorization": ""}).status_code == 401
    )
    viewer = token(app_client, "v-console", "viewer")
    assert app_client.get("/api/v1/console/overview", headers=viewer).status_code == 200
    assert app_client.post("/api/v1/console/ticket", headers=viewer).status_code == 200
    refused = app_client.post(
        "/api/v1/rollouts", headers=viewer, json={"model": "tiny", "version": "1.0.0"}
    )
    assert refused.status_code == 403


def test_releases_show_their_signature_status(app_client, tmp_path, keys):
    bundle = signed_bundle(tmp_path, keys, "1.0.0")
    assert app_client.post("/api/v1/releases", content=bundle.read_bytes()).status_code == 201
    (release,) = app_client.get("/api/v1/console/releases").json()["releases"]
    assert release["signature"]["status"] == "verified"
    assert release["formats"] == ["onnx:fp32"]
    assert 0 < release["expires_in_s"] <= 86400
    for path in (tmp_path / "fleet" / "bundles").rglob("*.bundle"):
        path.unlink()
    (release,) = app_client.get("/api/v1/console/releases").json()["releases"]
    assert release["signature"]["status"] == "missing"
