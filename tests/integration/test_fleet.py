"""The fleet service against SQLite and a real PostgreSQL, and its MQTT bridge against a real
Mosquitto: tokens and roles, release verification on upload, the audit chain, ingest."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, create_engine, select, text

from fleet.app import create_app
from fleet.config import FleetSettings
from shared.bundle import build_bundle, inspect_bundle, write_signed_copy
from shared.keystore import KeyStore
from shared.protocol import FetchRequest, decode_frame, device_topic
from shared.trust import sign_release
from tests.conftest import make_model_dir
from tests.integration.conftest import empty_schema
from tests.polling import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path, postgres_url) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    yield postgres_url
    empty_schema(postgres_url)  # each test starts from an empty schema


@pytest.fixture
def keys(tmp_path) -> KeyStore:
    return KeyStore.create(tmp_path / "keys", now=datetime.now(UTC))


def signed_bundle(
    tmp_path: Path, keys: KeyStore, version: str, payload: bytes = b"m" * 5000
) -> Path:
    model = make_model_dir(tmp_path / f"model-{version}-{uuid.uuid4().hex[:6]}", payload=payload)
    out = tmp_path / f"tiny-{version}-{uuid.uuid4().hex[:6]}.bundle"
    build_bundle(model, name=None, version=version, out=out)
    _, files = sign_release(
        keys, inspect_bundle(out), expires_in=timedelta(days=1), now=datetime.now(UTC)
    )
    write_signed_copy(out, files)
    return out


@pytest.fixture
def app_client(tmp_path, db_url, keys, monkeypatch) -> Iterator[TestClient]:
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", "admin-secret-for-tests")
    settings = FleetSettings(db=db_url, keys=keys.path, data_dir=tmp_path / "fleet")
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = "Bearer admin-secret-for-tests"
        yield client


def token(client: TestClient, name: str, role: str) -> dict[str, str]:
    response = client.post("/api/v1/tokens", json={"name": name, "role": role})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


def test_requests_without_a_valid_token_are_refused(app_client):
    assert app_client.get("/api/v1/devices", headers={"Authorization": ""}).status_code == 401
    bad = app_client.get("/api/v1/devices", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    assert bad.json()["detail"] == "unknown or revoked token"


def test_roles_decide_what_a_token_may_do(app_client, tmp_path, keys):
    viewer = token(app_client, "viewer-1", "viewer")
    assert app_client.get("/api/v1/releases", headers=viewer).status_code == 200
    refused = app_client.post(
        "/api/v1/releases",
        headers=viewer,
        content=signed_bundle(tmp_path, keys, "1.0.0").read_bytes(),
    )
    assert refused.status_code == 403
    assert refused.json()["detail"] == "this action needs the operator role; the token has viewer"
    operator = token(app_client, "ci", "operator")
    assert (
        app_client.post(
            "/api/v1/tokens", headers=operator, json={"name": "x", "role": "admin"}
        ).status_code
        == 403
    )


def test_publish_verifies_the_bundle_and_audits_it(app_client, tmp_path, keys):
    import shutil

    fork = KeyStore(shutil.copytree(keys.path, tmp_path / "keys-fork"))  # lost signer state
    bundle = signed_bundle(tmp_path, keys, "1.0.0")
    response = app_client.post("/api/v1/releases", content=bundle.read_bytes())
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "tiny"
    assert [r["version"] for r in app_client.get("/api/v1/releases").json()] == ["1.0.0"]

    tampered = bytearray(signed_bundle(tmp_path, keys, "2.0.0").read_bytes())
    tampered[-1024 - 600] ^= 1
    refused = app_client.post("/api/v1/releases", content=bytes(tampered))
    assert refused.status_code == 422
    assert "bundle refused:" in refused.json()["detail"]
    other_keys = KeyStore.create(tmp_path / "other-keys", now=datetime.now(UTC))
    untrusted = app_client.post(
        "/api/v1/releases", content=signed_bundle(tmp_path, other_keys, "3.0.0").read_bytes()
    )
    assert untrusted.status_code == 422
    assert "signed by 0/1 keys" in untrusted.json()["detail"]
    other = signed_bundle(tmp_path, fork, "1.0.0", payload=b"other")  # validly signed, but...
    conflict = app_client.post("/api/v1/releases", content=other.read_bytes())
    assert conflict.status_code == 409
    assert "tiny 1.0.0 is already published with manifest" in conflict.json()["detail"]
    assert [r["version"] for r in app_client.get("/api/v1/releases").json()] == ["1.0.0"]
    audit = app_client.get("/api/v1/audit").json()
    assert audit["chain_ok"] is True
    assert [e["action"] for e in audit["entries"]][:1] == ["release.publish"]


def test_a_tampered_audit_log_is_detected(app_client, db_url, tmp_path, keys):
    for version in ("1.0.0", "2.0.0"):
        bundle = signed_bundle(tmp_path, keys, version)
        assert app_client.post("/api/v1/releases", content=bundle.read_bytes()).status_code == 201
    engine = create_engine(db_url.replace("sqlite:///", "sqlite:///"))
    with Session(engine) as session:
        session.connection().execute(
            text("UPDATE auditentry SET actor = 'mallory' WHERE action = 'release.publish'")
        )
        session.commit()
    engine.dispose()
    assert app_client.get("/api/v1/audit").json()["chain_ok"] is False


def test_oversized_upload_is_refused_before_reading(app_client):
    response = app_client.post(
        "/api/v1/releases", content=b"x", headers={"content-length": str(10 << 40)}
    )
    assert response.status_code == 413


# -- the MQTT bridge, against a real Mosquitto -------------------------------------------------


@pytest.fixture
def bridged(broker, tmp_path, keys, monkeypatch) -> Iterator[TestClient]:
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", "admin-secret-for-tests")
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
    )
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = "Bearer admin-secret-for-tests"
        assert client.app.state.bridge.link.wait_connected(10)
        yield client


def state_payload(device_id: str, seq: int, version: str) -> bytes:
    return json.dumps(
        {
            "device_id": device_id,
            "seq": seq,
            "time": datetime.now(UTC).isoformat(),
            "hardware_class": "x86_64-avx2",
            "models": {"cnn": {"version": version, "state": "active"}},
        }
    ).encode()


def test_bridge_ingests_reports_and_drops_spoofed_and_stale_ones(bridged, broker):
    dev = broker.client("dev-001")
    topic = device_topic("dev-001", "up/state")
    dev.publish_and_wait(topic, state_payload("dev-001", 10, "2.0.0"))
    dev.publish_and_wait(topic, state_payload("dev-001", 5, "1.0.0"))  # stale: older seq
    dev.publish_and_wait(topic, state_payload("dev-002", 11, "6.6.6"))  # claims another device
    dev.publish_and_wait(topic, b"{not json")
    event = {
        "device_id": "dev-001",
        "seq": 12,
        "time": datetime.now(UTC).isoformat(),
        "model": "cnn",
        "version": "2.0.0",
        "phase": "activated",
    }
    for _ in range(2):  # QoS 1 redelivery: stored once
        dev.publish_and_wait(device_topic("dev-001", "up/events"), json.dumps(event).encode())
    devices = wait_until(
        lambda: bridged.get("/api/v1/devices").json(), what="a device registered", timeout=10
    )
    assert [(d["id"], d["models"], d["online"]) for d in devices] == [
        ("dev-001", {"cnn": "2.0.0"}, True)
    ]
    detail = wait_until(
        lambda: bridged.get("/api/v1/devices/dev-001").json()["events"],
        what="the event stored",
        timeout=10,
    )
    assert [(e["phase"], e["seq"]) for e in detail] == [("activated", 12)]
    assert bridged.get("/api/v1/devices/dev-002").status_code == 404


def test_bridge_serves_signed_metadata_and_chunks(bridged, broker, tmp_path, keys):
    bundle = signed_bundle(tmp_path, keys, "1.0.0")
    assert bridged.post("/api/v1/releases", content=bundle.read_bytes()).status_code == 201
    dev = broker.client("dev-001")
    dev.subscribe_and_wait(device_topic("dev-001", "down/fetch"))
    request = FetchRequest(request_id="r1", kind="metadata", name="timestamp.json")
    dev.publish_and_wait(device_topic("dev-001", "up/fetch"), request.model_dump_json().encode())
    header, data = decode_frame(dev.expect_message().payload)
    assert (header.request_id, header.kind, header.status) == ("r1", "metadata", 200)
    assert json.loads(data)["signed"]["_type"] == "timestamp"
    missing = FetchRequest(request_id="r2", kind="manifest", target="tiny/9.9.9/manifest.json")
    dev.publish_and_wait(device_topic("dev-001", "up/fetch"), missing.model_dump_json().encode())
    header, _ = decode_frame(dev.expect_message().payload)
    assert (header.request_id, header.status) == ("r2", 404)


def test_metrics_are_exposed(bridged):
    body = bridged.get("/metrics").text
    assert "edgefleet_devices" in body
    assert "edgefleet_mqtt_messages_total" in body


def test_generated_admin_token_is_saved_privately(tmp_path, keys, monkeypatch):
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    settings = FleetSettings(keys=keys.path, data_dir=tmp_path / "fleet")
    with TestClient(create_app(settings)) as client:
        saved = tmp_path / "fleet" / "admin-token"
        assert oct(saved.stat().st_mode & 0o777) == "0o600"
        secret = saved.read_text().strip()
        assert client.get(
            "/api/v1/whoami", headers={"Authorization": f"Bearer {secret}"}
        ).json() == {"name": "admin", "role": "admin"}
    assert os.environ.get("EDGEFLEET_ADMIN_TOKEN") is None


def test_enroll_issues_credentials_for_valid_ids_only(app_client):
    from cryptography import x509

    response = app_client.post("/api/v1/devices/dev-042/enroll")
    assert response.status_code == 201, response.text
    cert = x509.load_pem_x509_certificate(response.json()["cert_pem"].encode())
    assert cert.subject.rfc4514_string() == "CN=dev-042"
    assert json.loads(response.json()["trust_root"])["signed"]["_type"] == "root"
    assert [d["id"] for d in app_client.get("/api/v1/devices").json()] == ["dev-042"]
    hostile = app_client.post("/api/v1/devices/dev-002%2Fup%2Fx/enroll")
    assert hostile.status_code in (404, 422)  # never a certificate for a CN with '/'
    viewer = token(app_client, "v", "viewer")
    assert app_client.post("/api/v1/devices/dev-043/enroll", headers=viewer).status_code == 403


def test_reports_mark_devices_seen_and_never_move_last_seen_back(db_url):
    from fleet import crud
    from fleet.db import make_engine, migrate
    from fleet.models import Device
    from shared.protocol import Telemetry

    engine = make_engine(db_url)
    migrate(engine)
    later, earlier = (
        datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
        datetime(2026, 11, 21, 11, 0, tzinfo=UTC),
    )
    with Session(engine) as session:
        crud.ingest_telemetry(
            session,
            [
                Telemetry(device_id="dev-9", seq=2, time=later),
                Telemetry(device_id="dev-8", seq=1, time=earlier),
            ],
        )
        session.commit()
        crud.ingest_telemetry(session, [Telemetry(device_id="dev-9", seq=1, time=earlier)])
        session.commit()
        seen = {
            d.id: (d.online, d.last_seen.replace(tzinfo=UTC)) for d in session.exec(select(Device))
        }
    engine.dispose()
    assert seen == {"dev-8": (True, earlier), "dev-9": (True, later)}


def test_replayed_reports_are_stored_once(db_url):
    from fleet import crud
    from fleet.db import make_engine, migrate
    from fleet.models import DeviceEvent, TelemetrySample
    from shared.protocol import DeploymentEvent, Telemetry

    engine = make_engine(db_url)
    migrate(engine)
    now = datetime.now(UTC)
    samples = [Telemetry(device_id="dev-1", seq=s, time=now, health={"cpu": 0.5}) for s in (1, 2)]
    event = DeploymentEvent(
        device_id="dev-1", seq=3, time=now, model="cnn", version="1.0.0", phase="activated"
    )
    for _ in range(2):  # the same batch again: a QoS 1 redelivery, or a second replica
        with Session(engine) as session:
            crud.ingest_telemetry(session, samples)
            crud.ingest_events(session, [event])
            session.commit()
    with Session(engine) as session:
        stored = [(t.seq, t.health) for t in session.exec(select(TelemetrySample))]
        events = [e.seq for e in session.exec(select(DeviceEvent))]
    engine.dispose()
    assert sorted(stored) == [(1, {"cpu": 0.5}), (2, {"cpu": 0.5})]
    assert events == [3]


def test_a_report_the_database_refuses_costs_only_itself(db_url, tmp_path, caplog):
    from fleet.db import make_engine, migrate
    from fleet.distribution import BundleRepository
    from fleet.models import TelemetrySample
    from fleet.mqtt_bridge import MqttBridge
    from shared.protocol import Telemetry

    engine = make_engine(db_url)
    migrate(engine)
    bridge = MqttBridge(  # never started: its store step is called directly
        FleetSettings(broker="mqtt://127.0.0.1:1", data_dir=tmp_path), engine, BundleRepository()
    )
    now = datetime.now(UTC)
    batch = [
        ("up/telemetry", Telemetry(device_id="dev-1", seq=1, time=now)),
        ("up/telemetry", Telemetry(device_id="dev-2", seq=2**63, time=now)),  # too large
        ("up/telemetry", Telemetry(device_id="dev-3", seq=1, time=now)),
    ]
    bridge._store(batch)
    with Session(engine) as session:
        stored = sorted(t.device_id for t in session.exec(select(TelemetrySample)))
    engine.dispose()
    assert stored == ["dev-1", "dev-3"]
    assert "dropping a up/telemetry message from dev-2 (seq 9223372036854775808)" in caplog.text


def test_reports_the_database_could_not_store_as_sent_are_refused_on_arrival():
    from fleet.distribution import BundleRepository
    from fleet.mqtt_bridge import MqttBridge
    from shared.mqtt import Message

    bridge = MqttBridge(
        FleetSettings(broker="mqtt://127.0.0.1:1"), create_engine("sqlite://"), BundleRepository()
    )
    topic = device_topic("dev-1", "up/telemetry")
    good = {"device_id": "dev-1", "seq": 1, "time": "2026-11-21T12:00:00+00:00"}
    assert bridge._parse(Message(topic=topic, payload=json.dumps(good).encode())) is not None
    for bad in ({"seq": 2**63}, {"time": "2026-11-21T12:00:00"}):  # beyond int8; no UTC offset
        payload = json.dumps({**good, **bad}).encode()
        assert bridge._parse(Message(topic=topic, payload=payload)) is None


def test_reports_numbered_from_the_clock_in_milliseconds_are_stored(app_client):
    """Agents number reports from the clock in ms, beyond 32 bits: both databases keep them."""
    from fleet import crud
    from fleet.models import TelemetrySample
    from shared.protocol import Telemetry

    seq = int(time.time() * 1000)
    with Session(app_client.app.state.engine) as session:
        crud.ingest_telemetry(
            session, [Telemetry(device_id="dev-ms", seq=seq, time=datetime.now(UTC))]
        )
        session.commit()
        stored = session.exec(
            select(TelemetrySample.seq).where(TelemetrySample.device_id == "dev-ms")
        ).all()
    assert list(stored) == [seq]


def test_the_device_list_comes_in_linked_pages(app_client):
    from fleet import crud
    from shared.protocol import Telemetry

    now = datetime.now(UTC)
    with Session(app_client.app.state.engine) as session:
        crud.ingest_telemetry(
            session, [Telemetry(device_id=f"dev-{i}", seq=1, time=now) for i in range(5)]
        )
        session.commit()
    pages, url = [], "/api/v1/devices?limit=2"
    while url:
        response = app_client.get(url)
        assert response.status_code == 200, response.text
        pages.append([d["id"] for d in response.json()])
        url = response.links.get("next", {}).get("url")
    assert pages == [["dev-0", "dev-1"], ["dev-2", "dev-3"], ["dev-4"]]
    assert app_client.get("/api/v1/devices?limit=1001").status_code == 422
    assert [d["id"] for d in app_client.get("/api/v1/devices?offset=3").json()] == [
        "dev-3",
        "dev-4",
    ]
    only = app_client.get("/api/v1/devices", params={"search": "-4"}).json()
    assert [(d["id"], d["online"], d["models"]) for d in only] == [("dev-4", True, {})]


def test_device_list_command_fetches_every_page(app_client, monkeypatch, capsys):
    import contextlib

    from fleet import cli, crud
    from shared.protocol import Telemetry

    monkeypatch.setattr(cli, "_client", lambda fleet: contextlib.nullcontext(app_client))
    now = datetime.now(UTC)
    ids = [f"dev-{i:04d}" for i in range(1001)]  # more than the largest page
    with Session(app_client.app.state.engine) as session:
        crud.ingest_telemetry(session, [Telemetry(device_id=d, seq=1, time=now) for d in ids])
        session.commit()
    cli.list_devices(fleet=None, as_json=True)
    assert [d["id"] for d in json.loads(capsys.readouterr().out)] == ids


def test_a_batch_of_states_is_applied_in_seq_order_per_device(db_url):
    from fleet import crud
    from fleet.db import make_engine, migrate
    from fleet.models import Device, DeviceModel
    from shared.protocol import ModelState, ReportedState

    engine = make_engine(db_url)
    migrate(engine)
    now = datetime.now(UTC)

    def state(device: str, seq: int, version: str) -> ReportedState:
        return ReportedState(
            device_id=device, seq=seq, time=now, models={"cnn": ModelState(version=version)}
        )

    with Session(engine) as session:
        assert crud.ingest_state(session, state("dev-1", 5, "1.0.0"))
        session.commit()
        # out of order, with one report older than what is stored
        batch = [state("dev-1", 7, "3.0.0"), state("dev-2", 1, "1.0.0"), state("dev-1", 6, "2.0.0")]
        assert crud.ingest_states(session, [*batch, state("dev-1", 4, "0.9.0")]) == 3
        session.commit()
        seqs = {d.id: d.last_state_seq for d in session.exec(select(Device))}
        versions = {(m.device_id, m.model): m.version for m in session.exec(select(DeviceModel))}
    engine.dispose()
    assert seqs == {"dev-1": 7, "dev-2": 1}
    assert versions == {("dev-1", "cnn"): "3.0.0", ("dev-2", "cnn"): "1.0.0"}


def test_device_and_group_pins_hold_devices_back_from_rollouts(app_client):
    """A pinned device is skipped by rollouts of that model; a device pin wins over its group's;
    every change is audited, and bad input gets a clear refusal."""
    from fleet.models import RolloutRecord

    for device_id in ("pin-a", "pin-b", "pin-c"):
        assert app_client.post(f"/api/v1/devices/{device_id}/enroll").status_code == 201
    for device_id in ("pin-a", "pin-b"):
        response = app_client.put(f"/api/v1/devices/{device_id}/group", json={"group": "lab"})
        assert response.status_code == 200, response.text
    assert app_client.put("/api/v1/groups/lab/pins/tiny", json={"version": "1.0.0"}).json() == {
        "tiny": "1.0.0"
    }
    pinned = app_client.put("/api/v1/devices/pin-b/pins/tiny", json={"version": "1.2.0"})
    assert pinned.json()["pinned"] == {"tiny": "1.2.0"}

    def pins() -> dict[str, str | None]:
        with Session(app_client.app.state.engine) as session:
            views = app_client.app.state.rollouts.devices(
                session, RolloutRecord(model="tiny", target="")
            )
        return {v.device_id: v.pinned_version for v in views}

    assert pins() == {"pin-a": "1.0.0", "pin-b": "1.2.0", "pin-c": None}
    assert app_client.delete("/api/v1/devices/pin-b/pins/tiny").status_code == 200
    assert app_client.delete("/api/v1/groups/lab/pins/tiny").status_code == 200
    assert pins() == {"pin-a": None, "pin-b": None, "pin-c": None}

    assert app_client.delete("/api/v1/devices/pin-c/pins/tiny").status_code == 404
    assert (
        app_client.put("/api/v1/devices/nobody/pins/tiny", json={"version": "1"}).status_code == 404
    )
    bad = app_client.put("/api/v1/devices/pin-a/pins/tiny", json={"version": "1.0\x00"})
    assert bad.status_code == 422
    actions = [e["action"] for e in app_client.get("/api/v1/audit").json()["entries"]]
    for action in ("device.group", "group.pin", "device.pin", "device.unpin", "group.unpin"):
        assert action in actions


def test_a_rollout_takes_the_fleet_defaults_for_what_its_request_leaves_out(
    tmp_path, db_url, keys, monkeypatch
):
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", "admin-secret-for-tests")
    monkeypatch.setenv(
        "EDGEFLEET_FLEET_ROLLOUT_DEFAULTS",
        '{"stages": [34, 100], "soak_s": 2, "max_failure_rate": 0,'
        ' "gates": {"min_sample": 4, "max_error_rate": null, "max_p95_ratio": 3}}',
    )
    settings = FleetSettings(db=db_url, keys=keys.path, data_dir=tmp_path / "fleet")
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = "Bearer admin-secret-for-tests"
        viewer = token(client, "defaults-viewer", "viewer")
        defaults = client.get("/api/v1/rollout-defaults", headers=viewer).json()
        assert defaults["stages"] == [34.0, 100.0]
        assert defaults["gates"]["max_error_rate"] is None
        assert defaults["gates"]["max_crash_rate"] == 0.05  # left out of the JSON: built-in
        for version in ("1.0.0", "2.0.0"):
            bundle = signed_bundle(tmp_path, keys, version)
            assert client.post("/api/v1/releases", content=bundle.read_bytes()).status_code == 201

        def plan(rollout: dict[str, Any]) -> dict[str, Any]:
            page = client.get(f"/api/v1/console/rollouts/{rollout['id']}").json()
            return {"stages": [s["percent"] for s in page["stages"]], **page["plan"]}

        first = client.post("/api/v1/rollouts", json={"model": "tiny", "version": "1.0.0"})
        assert first.status_code == 201, first.text
        got = plan(first.json())
        assert got["stages"] == [34.0, 100.0]
        assert got["gates"]["min_install_success"] == 1.0
        assert (got["gates"]["min_sample"], got["gates"]["max_p95_ratio"]) == (4, 3.0)
        assert got["gates"]["max_error_rate"] is None
        assert client.post(f"/api/v1/rollouts/{first.json()['id']}/abort").status_code == 200

        # A request's gates change only the thresholds they name; null turns a check off.
        body = {
            "model": "tiny",
            "version": "2.0.0",
            "stages": [100],
            "max_in_flight": 7,
            "gates": {"min_sample": 1, "max_crash_rate": None},
        }
        second = client.post("/api/v1/rollouts", json=body)
        assert second.status_code == 201, second.text
        got = plan(second.json())
        assert (got["stages"], got["max_in_flight"]) == ([100.0], 7)
        assert got["gates"]["min_sample"] == 1
        assert got["gates"]["max_crash_rate"] is None
        assert got["gates"]["max_p95_ratio"] == 3.0  # the fleet's, not the built-in 1.25
        assert got["gates"]["max_error_rate"] is None

        bad = client.post(
            "/api/v1/rollouts", json={"model": "tiny", "version": "2.0.0", "soak_s": -1}
        )
        assert bad.status_code == 422
        (problem,) = bad.json()["detail"]
        assert problem["loc"] == ["body", "soak_s"]
        assert problem["msg"] == "Input should be greater than or equal to 0"
        assert problem["input"] == -1
        unknown = client.post(
            "/api/v1/rollouts",
            json={"model": "tiny", "version": "2.0.0", "gates": {"min_samples": 1}},
        )
        assert unknown.status_code == 422
        assert unknown.json()["detail"][0]["loc"] == ["body", "gates", "min_samples"]

        # The command line sends only the options it is given.
        import contextlib

        from fleet import cli
        from shared.errors import UsageError

        monkeypatch.setattr(cli, "_client", lambda fleet: contextlib.nullcontext(client))
        assert client.post(f"/api/v1/rollouts/{second.json()['id']}/abort").status_code == 200
        with pytest.raises(UsageError) as refused:
            cli.rollout_create("tiny", "2.0.0", max_in_flight=0)
        assert str(refused.value) == (
            "the fleet refused: 422 max_in_flight: Input should be greater than or equal to 1, "
            "got 0"
        )
        cli.rollout_create("tiny", "2.0.0", soak="5s")
        (latest, *_) = client.get("/api/v1/rollouts").json()
        got = plan(latest)
        assert (got["stages"], got["gates"]["min_sample"]) == ([34.0, 100.0], 4)
        page = client.get(f"/api/v1/console/rollouts/{latest['id']}").json()
        assert page["stages"][0]["soak_s"] == 5.0


def test_non_finite_numbers_in_a_rollout_request_are_refused_with_what_arrived(
    app_client, tmp_path, keys
):
    """Python's JSON parser reads NaN and Infinity; the API must refuse them, and say so."""
    bundle = signed_bundle(tmp_path, keys, "1.0.0")
    assert app_client.post("/api/v1/releases", content=bundle.read_bytes()).status_code == 201

    def post(options: str) -> Any:
        body = '{"model": "tiny", "version": "1.0.0", ' + options + "}"
        return app_client.post(
            "/api/v1/rollouts", content=body, headers={"Content-Type": "application/json"}
        )

    nan = post('"stages": [NaN]')
    assert nan.status_code == 422
    assert nan.json()["detail"][0]["loc"] == ["body", "stages", 0]
    assert nan.json()["detail"][0]["input"] == "nan"  # quoted, as JSON cannot carry it
    for options, message in [
        ('"soak_s": Infinity', "stage soak_s must be >= 0 seconds, got inf"),
        ('"gates": {"max_p95_ratio": Infinity}', "max_p95_ratio must be > 0 or None, got inf"),
    ]:
        refused = post(options)
        assert refused.status_code == 422
        assert refused.json()["detail"] == message
    assert app_client.get("/api/v1/rollouts").json() == []  # nothing was stored


def test_rollout_requests_refuse_unknown_fields_and_foreign_plans(app_client, tmp_path, keys):
    bundle = signed_bundle(tmp_path, keys, "1.0.0")
    assert app_client.post("/api/v1/releases", content=bundle.read_bytes()).status_code == 201
    release = {"model": "tiny", "version": "1.0.0"}

    misspelt = app_client.post("/api/v1/rollouts", json={**release, "soak": 5})
    assert misspelt.status_code == 422  # not quietly the default soak
    assert misspelt.json()["detail"][0]["loc"] == ["body", "soak"]
    broken = app_client.post("/api/v1/rollouts", json={**release, "plan": {"stages": "x"}})
    assert broken.status_code == 422
    assert broken.json()["detail"].startswith("the plan is not one the preview made")
    assert app_client.get("/api/v1/rollouts").json() == []

    # A previewed plan keeps its cohorts, but what it replaces is decided when it starts.
    preview = app_client.post("/api/v1/console/rollouts/preview", json=release).json()
    plan = {**preview["plan"], "previous_version": "0.0.1"}
    created = app_client.post("/api/v1/rollouts", json={**release, "plan": plan})
    assert created.status_code == 201, created.text
    assert created.json()["previous_version"] is None  # no device runs another version of tiny
    assert app_client.post(f"/api/v1/rollouts/{created.json()['id']}/abort").status_code == 200

    empty = app_client.post("/api/v1/rollouts", json={**release, "stages": []})
    assert empty.status_code == 201, empty.text  # [] means the default stages, as null does
    page = app_client.get(f"/api/v1/console/rollouts/{empty.json()['id']}").json()
    assert [s["percent"] for s in page["stages"]] == [5.0, 25.0, 100.0]


def test_fleet_rollout_defaults_are_checked_at_start(monkeypatch):
    monkeypatch.setenv("EDGEFLEET_FLEET_ROLLOUT_DEFAULTS", '{"stages": [10, 90]}')
    with pytest.raises(ValueError, match="the last stage must be percent=100"):
        FleetSettings()
