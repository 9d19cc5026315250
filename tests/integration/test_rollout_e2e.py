"""A staged rollout end to end: the fleet service (API, scheduler, MQTT bridge) on a real
Mosquitto, three real agent processes, the example model on the real runtimes.

What is asserted is what an operator relies on: the rollout goes stage by stage behind its gates
to completion, every device's own data directory ends on the new version, the fleet records the
version each device reports running, and a bad release is halted at its first stage and reverted.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fleet.app import create_app
from fleet.config import FleetSettings
from shared.bundle import build_bundle, inspect_bundle, write_signed_copy
from shared.example_models import write_example
from shared.keystore import KeyStore
from shared.trust import sign_release
from tests.integration.test_agent import start_agent, status
from tests.pki import issue_client
from tests.polling import wait_until

pytestmark = pytest.mark.integration

DEVICES = ("dev-001", "dev-002", "dev-003")


@pytest.fixture(scope="module")
def rollout_releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """cnn 1.0.0 and 2.0.0 (good), and 3.0.0 whose golden outputs are wrong (fails self-test)."""
    root = tmp_path_factory.mktemp("rollout-releases")
    keys = KeyStore.create(root / "keys", now=datetime.now(UTC))
    model = root / "model"
    write_example(model, size="small")
    out: dict[str, Path] = {"keys": root / "keys"}
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        spec = json.loads((model / "model.json").read_text())
        spec["metadata"]["release"] = version
        (model / "model.json").write_text(json.dumps(spec))
        if version == "3.0.0":
            golden = model / "vectors" / "output.npy"
            np.save(golden, np.load(golden) * 2 + 1)
        bundle = root / f"cnn-{version}.bundle"
        build_bundle(model, name="cnn", version=version, out=bundle, chunk_size=64 * 1024)
        _, files = sign_release(
            keys, inspect_bundle(bundle), expires_in=timedelta(days=1), now=datetime.now(UTC)
        )
        write_signed_copy(bundle, files)
        out[version] = bundle
    return out


@pytest.fixture
def fleet_service(broker, rollout_releases, tmp_path, monkeypatch) -> Iterator[TestClient]:
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", "admin-secret-for-tests")
    cert, key = broker.pki.client("fleet-svc")
    settings = FleetSettings(
        db=f"sqlite:///{tmp_path / 'fleet.db'}",
        keys=rollout_releases["keys"],
        data_dir=tmp_path / "fleet",
        broker=f"mqtts://127.0.0.1:{broker.port}",
        ca_file=broker.pki.ca_cert,
        cert_file=cert,
        key_file=key,
        ingest_flush_s=0.05,
        rollout_tick_s=0.3,
        max_message_bytes=64 * 1024,
    )
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = "Bearer admin-secret-for-tests"
        for version in ("1.0.0", "2.0.0", "3.0.0"):
            response = client.post(
                "/api/v1/releases", content=rollout_releases[version].read_bytes()
            )
            assert response.status_code == 201, response.text
        yield client


@pytest.fixture
def agents(broker, rollout_releases, fleet_service, tmp_path) -> Iterator[dict[str, Path]]:
    for device in DEVICES:
        if device not in broker.pki.clients:
            issue_client(broker.pki, device)
    procs, dirs = [], {}
    for device in DEVICES:
        dirs[device] = tmp_path / device
        procs.append(start_agent(broker, rollout_releases, dirs[device], device=device))
    wait_until(
        lambda: (
            len([d for d in fleet_service.get("/api/v1/devices").json() if d["online"]])
            == len(DEVICES)
        ),
        timeout=90,
        what="all devices online",
    )
    yield dirs
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


GATES = {"min_sample": 1, "max_p95_ratio": None, "max_error_rate": None}


def rollout_to(client: TestClient, version: str, **extra) -> str:
    body = {
        "model": "cnn",
        "version": version,
        "stages": [34, 100],
        "soak_s": 1.0,
        "max_failure_rate": 0.0,
        "gates": GATES,
        "device_timeout_s": 120,
        **extra,
    }
    response = client.post("/api/v1/rollouts", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def settled(client: TestClient, rollout_id: str, states: tuple[str, ...]) -> dict:
    def check():
        doc = client.get(f"/api/v1/rollouts/{rollout_id}").json()
        return doc if doc["state"] in states else None

    return wait_until(check, timeout=180, what=f"rollout {rollout_id} to reach {states}")


def test_staged_rollouts_complete_and_a_bad_release_is_halted_and_reverted(fleet_service, agents):
    first = rollout_to(fleet_service, "1.0.0")
    done = settled(fleet_service, first, ("completed",))
    assert done["devices"]["succeeded"] == len(DEVICES)
    assert [s["state"] for s in done["stages"]] == ["passed", "passed"]
    for device, data_dir in agents.items():
        assert status(data_dir)["models"]["cnn"]["version"] == "1.0.0", device

    second = rollout_to(fleet_service, "2.0.0")
    done = settled(fleet_service, second, ("completed",))
    assert done["previous_version"] == "1.0.0"
    assert done["devices"]["succeeded"] == len(DEVICES)
    stage0 = done["stages"][0]["devices"]
    assert 1 <= stage0 < len(DEVICES)  # a canary first, not everyone at once
    fleet_view = {d["id"]: d["models"] for d in fleet_service.get("/api/v1/devices").json()}
    for device, data_dir in agents.items():
        assert status(data_dir)["models"]["cnn"]["version"] == "2.0.0"
        assert fleet_view[device] == {"cnn": "2.0.0"}  # what the device reports running

    bad = rollout_to(fleet_service, "3.0.0", revert_on_fail=True)
    halted = settled(fleet_service, bad, ("halted",))
    assert halted["decisions"][0]["verdict"] == "fail"
    assert halted["stage"] == 0
    assert halted["devices"]["failed"] >= 1
    for data_dir in agents.values():  # every device still (or again) on the good version
        state = status(data_dir)["models"]["cnn"]
        assert state["version"] == "2.0.0"
        assert "3.0.0" not in (state["version"], state["previous_version"])
    audit = fleet_service.get("/api/v1/audit").json()
    assert audit["chain_ok"] is True
    actions = [e["action"] for e in audit["entries"]]
    assert "gate.fail" in actions
    assert "rollout.create" in actions
