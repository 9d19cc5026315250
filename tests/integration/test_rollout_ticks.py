"""The scheduler's tick keeps each rollout between ticks: an unchanged tick stores nothing, and
every change (a device report, a device's row, an operator, another writer) is still seen."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import select, update
from sqlmodel import Session

from fleet import crud
from fleet.db import make_engine, migrate
from fleet.models import Device, DeviceModel, RolloutRecord
from fleet.releases import publish_release
from fleet.rollout_codec import decode_rollout
from fleet.rollout_options import RolloutOptions
from fleet.rollout_service import RolloutService
from fleet.rollouts import DeviceState
from shared.protocol import DeploymentEvent
from tests.integration import test_fleet as fleet_tests

pytestmark = pytest.mark.integration

# The fleet tests' fixtures: a fresh database (SQLite, then PostgreSQL) and a key store.
db_url = fleet_tests.db_url
keys = fleet_tests.keys

DEVICES = [f"tick-{i}" for i in range(6)]


@pytest.fixture
def fleet(db_url, keys, tmp_path) -> Iterator[tuple[RolloutService, list[str], str]]:
    engine = make_engine(db_url)
    migrate(engine)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(
            Device.__table__.insert(),  # type: ignore[attr-defined]
            [{"id": d, "labels": {}, "pinned": {}, "online": True} for d in DEVICES],
        )
        connection.execute(
            DeviceModel.__table__.insert(),  # type: ignore[attr-defined]
            [
                {"device_id": d, "model": "tiny", "version": "1.0.0", "updated_at": now}
                for d in DEVICES
            ],
        )
    trust_root = (keys.path / "root.json").read_bytes()
    service = RolloutService(engine, keys, trust_root)
    sent: list[str] = []

    def send(device_id: str, _payload: bytes) -> bool:
        sent.append(device_id)
        return True

    service.send = send
    with (
        Session(engine) as session,
        fleet_tests.signed_bundle(tmp_path, keys, "2.0.0").open("rb") as f,
    ):
        publish_release(
            session,
            f,
            bundles_dir=tmp_path / "bundles",
            trust_root=trust_root,
            actor="test",
            max_bytes=1 << 24,
        )
        session.commit()
        record = service.create(
            session,
            model="tiny",
            version="2.0.0",
            actor="test",
            options=RolloutOptions(stages=[100], max_in_flight=2),
        )
        session.commit()
        rollout_id = record.id
    yield service, sent, rollout_id
    engine.dispose()


def stored(service: RolloutService, rollout_id: str) -> RolloutRecord:
    with Session(service.engine) as session:
        record = session.get(RolloutRecord, rollout_id)
        assert record is not None
        return record


def test_an_unchanged_tick_stores_nothing_and_every_change_is_seen(fleet):
    service, sent, rollout_id = fleet
    assert service.tick() == 1
    first = stored(service, rollout_id)
    assert first.status == "running"
    assert len(sent) == 2  # max_in_flight

    assert service.tick() == 1  # the devices are busy: nothing changed
    assert stored(service, rollout_id).updated_at == first.updated_at
    assert len(sent) == 2

    # A device reports the new version committed: stored, and its slot goes to the next one.
    with Session(service.engine) as session:
        report = DeploymentEvent(
            device_id=sent[0],
            seq=1,
            time=datetime.now(UTC),
            model="tiny",
            version="2.0.0",
            phase="committed",
        )
        crud.ingest_events(session, [report])
        session.commit()
    service.tick()
    second = stored(service, rollout_id)
    assert second.updated_at != first.updated_at
    assert decode_rollout(second.state).progress[sent[0]].state is DeviceState.SUCCEEDED
    assert len(sent) == 3

    # A device's own row changes (pinned to the old version): the next tick sees it.
    waiting = next(d for d in DEVICES if d not in sent)
    with service.engine.begin() as connection:
        connection.execute(
            update(Device).where(Device.id == waiting).values(pinned={"tiny": "1.0.0"})
        )
    service.tick()
    progress = decode_rollout(stored(service, rollout_id).state).progress
    assert progress[waiting].state is DeviceState.SKIPPED

    # An operator's action goes through the stored state, not the kept one.
    with service.stepping, Session(service.engine) as session:
        service.act(session, rollout_id, "pause", actor="operator")
        session.commit()
    service.tick()
    assert stored(service, rollout_id).status == "paused"

    # Another writer (another replica) stores a state: the next tick starts from it.
    with service.engine.begin() as connection:
        state = connection.execute(
            select(RolloutRecord.state).where(RolloutRecord.id == rollout_id)
        ).scalar_one()
        state["state"] = "running"
        state["progress"][sent[1]][0] = "succeeded"  # it saw this device's report
        connection.execute(
            update(RolloutRecord)
            .where(RolloutRecord.id == rollout_id)
            .values(state=state, status="running", updated_at=datetime.now(UTC))
        )
    service.tick()
    assert stored(service, rollout_id).status == "running"
    assert len(sent) == 4  # running again, and the slot it freed is used
