"""Rollouts to 100 virtual devices, end to end: TLS Mosquitto with per-device ACLs, the fleet
service on a fresh PostgreSQL database, and 100 devices each running the real agent code on a
simulated hardware profile (:mod:`simulators.virtual`).

The tests are chapters of one story on one fleet (module-scoped, in order): v1 everywhere; v2
in stages while some devices are switched off and new ones enroll; a bad v3 halted at its first
stage. What is asserted is what an operator relies on, read from the devices' own data
directories and the rollout's stored state, not from logs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlmodel import Session, create_engine, select

from fleet.models import DeviceEvent, RolloutRecord
from fleet.rollout_codec import decode_rollout
from simulators.demo import BAD_V3, MAX_P95_RATIO, make_releases, run_broker, run_fleet
from simulators.hardware import DEFAULT_PROFILES, parse_profiles
from simulators.virtual import Simulation, SimulationOptions, VirtualDevice, parse_faults
from tests.integration.conftest import empty_schema, free_port
from tests.polling import wait_until

pytestmark = pytest.mark.integration

DEVICES = 100
TOKEN = "e2e-admin-" + os.urandom(6).hex()
WAIT_S = 240.0


class World:
    def __init__(self, sim: Simulation, api: httpx.Client, database_url: str) -> None:
        self.sim = sim
        self.api = api
        self.engine = create_engine(database_url)

    def versions(self, devices: list[VirtualDevice] | None = None) -> dict[str, str | None]:
        """The version of cnn each device runs, by its own data directory."""
        return {
            s["device_id"]: (s["models"].get("cnn") or {}).get("version")
            for s in (d.status() | {"device_id": d.device_id} for d in devices or self.sim.devices)
        }

    def rollout(self, version: str, stages: list[float], **gates: Any) -> str:
        body = {
            "model": "cnn",
            "version": version,
            "stages": stages,
            "soak_s": 2.0,
            "max_failure_rate": 0.0,
            "revert_on_fail": True,
            "device_timeout_s": 120,
            "gates": {"min_sample": 1, "max_error_rate": None, "max_p95_ratio": None} | gates,
        }
        response = self.api.post("/api/v1/rollouts", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def status(self, rollout_id: str) -> dict[str, Any]:
        return dict(self.api.get(f"/api/v1/rollouts/{rollout_id}").json())

    def wait(self, rollout_id: str, states: tuple[str, ...]) -> dict[str, Any]:
        return wait_until(
            lambda: (s := self.status(rollout_id))["state"] in states and s,
            what=f"rollout {rollout_id} to be {' or '.join(states)}",
            timeout=WAIT_S,
            every=0.5,
        )

    def engine_state(self, rollout_id: str) -> Any:
        with Session(self.engine) as session:
            record = session.get(RolloutRecord, rollout_id)
            assert record is not None
            return decode_rollout(record.state)

    def activated(self, version: str) -> set[str]:
        """Devices that reported running ``version`` at some point (events, deduplicated)."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(DeviceEvent.device_id).where(
                    DeviceEvent.version == version,
                    DeviceEvent.phase.in_(("activated", "committed")),  # type: ignore[attr-defined]
                )
            )
            return set(rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[World]:
    work = tmp_path_factory.mktemp("sim-e2e")
    keys = make_releases(work)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(empty_schema, postgres_url)  # last: after the fleet has stopped
        patch = cleanup.enter_context(pytest.MonkeyPatch.context())
        patch.setenv("EDGEFLEET_ADMIN_TOKEN", TOKEN)  # the fleet's admin token
        with (
            run_broker(work) as (broker_port, ca),
            run_fleet(work, keys, broker_port, ca, free_port(), database_url=postgres_url) as url,
        ):
            api = httpx.Client(
                base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
            )
            for version in ("1.0.0", "2.0.0", "3.0.0"):
                bundle = work / "releases" / f"cnn-{version}.bundle"
                api.post("/api/v1/releases", content=bundle.read_bytes()).raise_for_status()
            sim = Simulation(
                SimulationOptions(
                    fleet_url=url,
                    token=TOKEN,
                    broker=f"mqtts://127.0.0.1:{broker_port}",
                    devices=DEVICES,
                    work_dir=work / "devices",
                    profiles=parse_profiles(DEFAULT_PROFILES),
                    model_faults=parse_faults(BAD_V3)[0],
                    prefix="e2e",
                    probation_s=1.0,
                    telemetry_interval_s=1.0,
                    infer_interval_s=0.5,
                )
            )
            world = World(sim, api, postgres_url)
            try:
                sim.start()
                yield world
            finally:
                sim.stop()
                api.close()
                world.engine.dispose()


def online(world: World) -> int:
    return sum(d["online"] for d in world.api.get("/api/v1/devices?limit=1000").json())


def test_v1_reaches_every_device(world: World) -> None:
    wait_until(
        lambda: online(world) == DEVICES, what="every device online", timeout=WAIT_S, every=0.5
    )
    done = world.wait(world.rollout("1.0.0", [100]), ("completed", "halted", "paused"))
    assert done["state"] == "completed", done["decisions"]
    assert set(world.versions().values()) == {"1.0.0"}


def test_staged_rollout_with_devices_offline_and_enrolling_midway(world: World) -> None:
    sim = world.sim
    asleep = sim.devices[:10]
    for device in asleep:
        device.power_off()
    wait_until(
        lambda: online(world) == DEVICES - len(asleep),
        what="the sleeping devices offline",
        timeout=WAIT_S,
        every=0.5,
    )
    rollout_id = world.rollout("2.0.0", [10, 50, 100], max_p95_ratio=MAX_P95_RATIO)
    # Mid-rollout, once the first stage has passed, five new devices enroll.
    wait_until(
        lambda: world.status(rollout_id)["stage"] >= 1, what="the second stage", timeout=WAIT_S
    )
    newcomers = sim.add_devices(5)
    done = world.wait(rollout_id, ("completed", "halted", "paused"))
    assert done["state"] == "completed", done["decisions"]
    awake = [d for d in sim.devices if d not in asleep]
    assert set(world.versions(awake).values()) == {"2.0.0"}
    # The newcomers went through the rollout (dispatched by it, in a stage that was gated).
    progress = world.engine_state(rollout_id).progress
    for device in newcomers:
        assert device.device_id in progress
        assert progress[device.device_id].attempts >= 1
        assert progress[device.device_id].stage <= len(done["stages"]) - 1
    # The devices that were off catch up when they come back.
    for device in asleep:
        device.power_on(sim.options.broker, sim.overrides)
    wait_until(
        lambda: set(world.versions().values()) == {"2.0.0"},
        what="every device on 2.0.0 by its own data",
        timeout=WAIT_S,
        every=0.5,
    )
    assert len(world.versions()) == DEVICES + len(newcomers)


def test_bad_model_is_halted_at_its_first_stage_and_reverted(world: World) -> None:
    rollout_id = world.rollout("3.0.0", [10, 100], max_p95_ratio=MAX_P95_RATIO)
    done = world.wait(rollout_id, ("completed", "halted", "paused"))
    assert done["state"] == "halted", done["decisions"]
    assert done["stage"] == 0
    progress = world.engine_state(rollout_id).progress
    first_stage = {did for did, p in progress.items() if p.stage == 0 and p.attempts}
    ran = world.activated("3.0.0")
    # The gate halts as soon as the NPU devices' failures make its verdict certain: the slower
    # devices of the first stage may have activated v3 by then, no other device may have.
    assert ran <= first_stage
    # Every device that ran it was reverted: all devices, by their own data, run v2 again.
    wait_until(
        lambda: set(world.versions().values()) == {"2.0.0"},
        what="every device on 2.0.0 by its own data",
        timeout=WAIT_S,
        every=0.5,
    )
    broke = {did for did, p in progress.items() if p.failure_class == "self_test"}
    assert broke, "the arm-npu devices of the first stage refused v3 in their self-test"
    assert {world.sim.device(did).profile.name for did in broke} == {"arm-npu"}
