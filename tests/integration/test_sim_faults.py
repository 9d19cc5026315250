"""Virtual devices survive their injected faults with the real agent code: a power cut during an
install (the device reboots and recovers) and lost bundle chunks (the transfer asks again).

A small fleet (TLS Mosquitto, the fleet service on SQLite); the outcome is read from each
device's own data directory.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from simulators.demo import make_releases, run_broker, run_fleet
from simulators.hardware import parse_profiles
from simulators.virtual import Simulation, SimulationOptions, parse_faults
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


def test_power_cuts_during_install_and_lost_chunks_still_end_on_the_new_version(tmp_path):
    token = "faults-admin-" + os.urandom(6).hex()
    os.environ["EDGEFLEET_ADMIN_TOKEN"] = token
    keys = make_releases(tmp_path)
    with (
        run_broker(tmp_path) as (broker_port, ca),
        run_fleet(tmp_path, keys, broker_port, ca, free_port()) as url,
        httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as api,
    ):
        bundle = tmp_path / "releases" / "cnn-1.0.0.bundle"
        api.post("/api/v1/releases", content=bundle.read_bytes()).raise_for_status()
        _, faults = parse_faults(
            "kill-install:device=f-00001+f-00002:point=after_verify,"
            "kill-install:device=f-00003:point=after_replace,"
            "lost-chunks:device=f-00004+f-00005:rate=0.3"
        )
        sim = Simulation(
            SimulationOptions(
                fleet_url=url,
                token=token,
                broker=f"mqtts://127.0.0.1:{broker_port}",
                devices=6,
                work_dir=tmp_path / "devices",
                profiles=parse_profiles("x86-cpu=1"),
                device_faults=faults,
                prefix="f",
                probation_s=1.0,
                telemetry_interval_s=1.0,
            )
        )
        try:
            sim.start()
            response = api.post(
                "/api/v1/rollouts",
                json={
                    "model": "cnn",
                    "version": "1.0.0",
                    "stages": [100],
                    "soak_s": 1.0,
                    "device_timeout_s": 60,
                    "gates": {"min_sample": 1, "max_error_rate": None, "max_p95_ratio": None},
                },
            )
            assert response.status_code == 201, response.text
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                versions = {
                    s["device_id"]: (s["models"].get("cnn") or {}).get("version")
                    for s in sim.states()
                }
                if set(versions.values()) == {"1.0.0"}:
                    break
                time.sleep(0.5)
            assert set(versions.values()) == {"1.0.0"}, versions
            cut = {d.device_id: d.power_cuts for d in sim.devices}
            assert cut == {
                "f-00001": 1,
                "f-00002": 1,
                "f-00003": 1,
                "f-00004": 0,
                "f-00005": 0,
                "f-00006": 0,
            }
            lossy = [sim.device(f"f-0000{i}").agent for i in (4, 5)]
            assert all(a is not None and a.link.lost > 0 for a in lossy)  # chunks were lost
        finally:
            sim.stop()
