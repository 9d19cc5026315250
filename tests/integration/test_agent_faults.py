"""Fault tests of the device agent end to end (SECURITY-MATRIX rows 18-19 and 22-33).

A real agent process, a real Mosquitto (mutual TLS, ACLs) and the fleet's side played by
:class:`~tests.integration.fleet_harness.FleetHarness`, as in ``test_agent.py`` (whose fixtures
are reused). Each test injects one fault (a slow, lossy or restarting network, a killed agent,
a bad model, a damaged disk, a replayed order...) and asserts only on the agent's data directory
(``edgefleet agent status --json``, files under ``models/cnn/``) and on the events it reports
(phase and failure class), never on its logs.

Every test has its own data directory and its own broker. Rows 20-21 (oversized and endless
data) and 27 (queue overflow) are elsewhere or not covered here; row 34 needs a filesystem
fault injector.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.store import FAULT_POINTS
from shared.bundle import (
    build_bundle,
    check_payload,
    inspect_bundle,
    open_bundle,
    write_signed_copy,
)
from shared.example_models import write_example
from shared.keystore import KeyStore
from shared.protocol import DOWN_CMD, device_topic
from shared.trust import sign_release
from tests.integration import test_agent
from tests.integration.fleet_harness import FleetHarness
from tests.polling import wait_until

# test_agent.py's fixtures (pytest finds them by these names) and helpers
releases = test_agent.releases
fleet = test_agent.fleet
CLI, DEVICE, infer, status = test_agent.CLI, test_agent.DEVICE, test_agent.infer, test_agent.status

pytestmark = pytest.mark.integration

MODEL = "cnn"
BAD = "3.0.0"  # a signed release whose golden outputs are wrong (fails its self-test)
WORKER_PHASES = ("received", "downloading", "downloaded", "self_test", "activated", "failed")


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_release(releases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cnn 3.0.0, signed with the same keys, whose test vectors expect outputs twice too large."""
    root = tmp_path_factory.mktemp("bad-release")
    model = root / "model"
    write_example(model, size="small")
    golden = model / "vectors" / "output.npy"
    np.save(golden, np.load(golden) * 2)
    bundle = root / f"cnn-{BAD}.bundle"
    build_bundle(model, name=MODEL, version=BAD, out=bundle, chunk_size=64 * 1024)
    _, files = sign_release(
        KeyStore.open(releases["keys"]),
        inspect_bundle(bundle),
        expires_in=timedelta(days=1),
        now=datetime.now(UTC),
    )
    write_signed_copy(bundle, files)
    return bundle


class Agents:
    """Starts, stops and kills agent processes of one device on one data directory.

    Settings go into the agent's TOML config (``[agent]`` table); each start rewrites it. The
    agent's output goes to a log file next to the data directory (kept for debugging only).
    """

    def __init__(self, broker: Any, releases: dict[str, Path], root: Path) -> None:
        self.broker = broker
        self.releases = releases
        self.root = root
        self.data_dir = root / "agent-data"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(
        self,
        *,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        **settings: float | int,
    ) -> subprocess.Popen[bytes]:
        assert self.proc is None or self.proc.poll() is not None, "an agent is still running"
        values: dict[str, float | int] = {
            "probation_s": 1.0,
            "request_timeout_s": 2.0,
            "telemetry_interval_s": 1.0,
            **settings,
        }
        config = self.root / f"{DEVICE}.toml"
        config.write_text("[agent]\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items()))
        cert, key = self.broker.pki.client(DEVICE)
        self.starts += 1
        log = (self.root / f"agent-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                *CLI,
                "agent",
                "run",
                "--broker",
                f"mqtts://127.0.0.1:{self.broker.port}",
                "--device-id",
                DEVICE,
                "--data-dir",
                str(self.data_dir),
                "--trust",
                str(self.releases["keys"] / "root.json"),
                "--config",
                str(config),
                "--ca-file",
                str(self.broker.pki.ca_cert),
                "--cert-file",
                str(cert),
                "--key-file",
                str(key),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec_fn,  # noqa: PLW1509 (setrlimit only)
        )
        log.close()
        return self.proc

    def stop(self) -> int:
        """SIGTERM (a clean stop); SIGKILL if it does not stop within 15 s."""
        assert self.proc is not None
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> int:
        """SIGKILL, as a power cut or an OOM kill would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(15)


@pytest.fixture
def agents(broker: Any, releases: dict[str, Path], tmp_path: Path) -> Iterator[Agents]:
    runner = Agents(broker, releases, tmp_path)
    yield runner
    if runner.proc is not None and runner.proc.poll() is None:
        runner.stop()


def start_and_wait_state(
    agents: Agents,
    fleet: FleetHarness,
    **options: Any,
) -> subprocess.Popen[bytes]:
    """Start an agent and wait for its first state report (it is connected and subscribed)."""
    mark = fleet.report_count(DEVICE)
    proc = agents.start(**options)
    fleet.wait_for(
        DEVICE, lambda s, b: s == "up/state", timeout=60, what="first state report", since=mark
    )
    return proc


def outcome(
    fleet: FleetHarness,
    version: str,
    *,
    since: int,
    timeout: float = 120,
    phases: tuple[str, ...] = ("activated", "failed"),
) -> dict[str, Any]:
    """The first event (after mark ``since``) that ends a deployment of ``version``: its
    activation or a failure (a failure before the order names a release says version "?")."""
    return fleet.wait_for(
        DEVICE,
        lambda s, b: (
            s == "up/events" and b.get("phase") in phases and b.get("version") in (version, "?")
        ),
        timeout=timeout,
        what=f"{'/'.join(phases)} event for {version}",
        since=since,
    )


def deploy(fleet: FleetHarness, version: str, *, commit: bool = True) -> bytes:
    """Deploy ``version`` and wait until it is active (and committed, by default).

    Returns the exact command payload published (for replay tests)."""
    mark = fleet.report_count(DEVICE)
    payload = fleet.deploy(DEVICE, version)
    event = outcome(fleet, version, since=mark)
    assert event["phase"] == "activated", timeline(events_since(fleet, mark))
    if commit:
        fleet.wait_phase(DEVICE, "committed", version, timeout=30, since=mark)
    return payload


def events_since(fleet: FleetHarness, mark: int) -> list[dict[str, Any]]:
    return fleet.events(DEVICE, since=mark)


def timeline(events: list[dict[str, Any]]) -> str:
    """One line per event: version, phase, failure class, detail (for assertion messages)."""
    return "events:\n" + "\n".join(
        f"  {str(e.get('time'))[11:23]} {e.get('version')} {e.get('phase')} "
        f"{e.get('failure_class') or ''} "
        f"{(e.get('detail') or '')[:300]}"
        for e in events
    )


def bundle_payload(bundle: Path) -> dict[str, bytes]:
    """Every payload file of a bundle (checked against its manifest while extracted)."""
    stream, reader, header, first = open_bundle(bundle)
    with tempfile.TemporaryDirectory() as tmp, stream:
        dest = Path(tmp) / "payload"
        check_payload(reader, header.manifest, first, dest=dest)
        return {
            p.relative_to(dest).as_posix(): p.read_bytes()
            for p in sorted(dest.rglob("*"))
            if p.is_file()
        }


def verified_chunks(data_dir: Path, version: str) -> set[tuple[str, int]]:
    """The staged download's durable record of verified chunks: (file, chunk index)."""
    record = data_dir / "staging" / MODEL / version / ".verified"
    lines = record.read_text().splitlines() if record.exists() else []
    return {(file, int(index)) for file, _, index in (line.partition("\t") for line in lines)}


def chunk_requests(fleet: FleetHarness) -> dict[tuple[str, int], int]:
    """How many times the device asked for each chunk, (file, chunk index) -> count."""
    asked: dict[tuple[str, int], int] = {}
    for request in list(fleet.fetches):
        for ref in request.chunks if request.kind == "chunks" else []:
            asked[(ref.file, ref.index)] = asked.get((ref.file, ref.index), 0) + 1
    return asked


def model_files(directory: Path) -> dict[str, bytes]:
    """The payload files of an installed version (everything but its manifest.json)."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def check_installed(data_dir: Path) -> str:
    """I1: ``current`` resolves to a complete version whose files all match its manifest.
    Returns that version."""
    current = data_dir / "models" / MODEL / "current"
    assert current.is_symlink(), f"{current} is not a symlink"
    version = os.readlink(current).rsplit("/", 1)[-1]
    assert version in ("1.0.0", "2.0.0"), f"current -> {os.readlink(current)}"
    manifest = json.loads((current / "manifest.json").read_text())
    assert manifest["version"] == version
    for entry in manifest["files"]:
        data = (current / entry["path"]).read_bytes()
        assert len(data) == entry["size"], entry["path"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
    return version


def leftovers(data_dir: Path) -> list[str]:
    """I2 and I3: temporary files and switch journals left in the data directory.

    The outbox is left out: a running agent writes its reports through temp files all the time
    (and removes stale ones when it starts), so one may be caught in flight.
    """
    found = [*data_dir.rglob(".tmp-*"), *data_dir.rglob("journal.json")]
    return sorted(
        str(p.relative_to(data_dir)) for p in found if p.relative_to(data_dir).parts[0] != "outbox"
    )


def served_version(broker: Any, data_dir: Path) -> str:
    """Ask the agent for an inference over MQTT; return the version that answered (checked
    against the golden output of the version that is current on disk)."""
    app = broker.client("app-viewer")
    try:
        app.subscribe_and_wait(device_topic(DEVICE, "infer/response/app-viewer"))
        model_dir = data_dir / "models" / MODEL / "current"
        x = np.load(model_dir / "vectors" / "input.npy")
        golden = np.load(model_dir / "vectors" / "output.npy")
        answer = infer(broker, app, x[:1])
    finally:
        app.close()
    assert answer["ok"] is True, answer
    assert np.abs(np.array(answer["outputs"]["output"]) - golden[:1]).max() <= 1e-4
    return str(answer["version"])


def model_status(data_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = status(data_dir)["models"][MODEL]
    return result


# --- rows 22-26: the transfer ---------------------------------------------------------------------


def test_22_slow_retrieval_aborts_and_keeps_the_old_model(broker, fleet, agents):
    """Row 22: below the minimum throughput the download is abandoned (slow-retrieval)."""
    # The throughput window of the transfer (TransferLimits.throughput_window_s, 30 s) is not an
    # agent setting, so the check can only fire 30 s after the download starts: the fleet is
    # made slow enough (one chunk at a time, 1.6 s per part: the 20 parts v2 needs take 32 s)
    # that v2 cannot arrive in 30 s.
    start_and_wait_state(
        agents, fleet, window_chunks=1, request_timeout_s=10.0, min_bytes_per_s=1_000_000.0
    )
    deploy(fleet, "1.0.0", commit=False)

    fleet.part_delay_s = 1.6
    mark = fleet.report_count(DEVICE)
    started = time.monotonic()
    fleet.deploy(DEVICE, "2.0.0")
    event = outcome(fleet, "2.0.0", since=mark, timeout=60)
    fleet.part_delay_s = 0.0
    assert event["phase"] == "failed", event
    assert event["failure_class"] == "slow-retrieval", event
    assert time.monotonic() - started < 45

    state = model_status(agents.data_dir)
    assert state["version"] == "1.0.0"
    assert served_version(broker, agents.data_dir) == "1.0.0"


def test_23_24_duplicated_and_lost_parts(broker, fleet, agents, releases):
    """Rows 23-24: duplicated parts are ignored, lost ones asked for again; exact bytes."""
    start_and_wait_state(agents, fleet)
    fleet.duplicate_ratio = 0.3
    fleet.drop_ratio = 0.1
    deploy(fleet, "2.0.0", commit=False)

    assert fleet.dropped_parts, "no part was dropped: the test did not exercise row 24"
    assert fleet.duplicated_parts, "no part was duplicated: the test did not exercise row 23"
    asked = chunk_requests(fleet)
    again = {key for key, count in asked.items() if count > 1}
    assert again <= set(fleet.dropped_parts), (
        "only chunks that lost a part are asked for again",
        again - set(fleet.dropped_parts),
    )
    current = agents.data_dir / "models" / MODEL / "current"
    assert model_status(agents.data_dir)["version"] == "2.0.0"
    assert model_files(current) == bundle_payload(releases["2.0.0"])


def test_25_broker_restart_mid_transfer(broker, fleet, agents, releases):
    """Row 25: the agent reconnects after a broker restart and resumes where it was."""
    start_and_wait_state(agents, fleet, request_timeout_s=10.0)
    payload = sum(len(v) for v in bundle_payload(releases["2.0.0"]).values())
    fleet.part_delay_s = 0.1
    mark = fleet.report_count(DEVICE)
    fleet.deploy(DEVICE, "2.0.0")
    fleet.wait_phase(DEVICE, "downloading", "2.0.0", since=mark)
    wait_until(
        lambda: fleet.chunk_bytes_sent >= payload / 3,
        timeout=30,
        what="a third of v2 sent",
        every=0.02,
    )

    broker.stop()  # a restart, with a look at the device's record while nothing can arrive
    before = verified_chunks(agents.data_dir, "2.0.0")
    broker.start()
    fleet.reconnect(broker)
    assert before, "nothing was verified before the restart"
    assert not [e for e in events_since(fleet, mark) if e["phase"] == "downloaded"]
    fleet.part_delay_s = 0.02
    event = outcome(fleet, "2.0.0", since=mark)
    assert event["phase"] == "activated", timeline(events_since(fleet, mark))
    current = agents.data_dir / "models" / MODEL / "current"
    assert model_status(agents.data_dir)["version"] == "2.0.0"
    assert model_files(current) == bundle_payload(releases["2.0.0"])
    # resumed: the chunks verified before the restart were never asked for again
    asked = chunk_requests(fleet)
    assert {key: asked[key] for key in before} == dict.fromkeys(before, 1)


def test_26_agent_killed_mid_download_resumes(broker, fleet, agents, releases):
    """Row 26: a SIGKILLed agent resumes from its durable record of verified chunks."""
    start_and_wait_state(agents, fleet, window_chunks=2)
    bundle_size = releases["2.0.0"].stat().st_size
    fleet.part_delay_s = 0.1
    mark = fleet.report_count(DEVICE)
    fleet.deploy(DEVICE, "2.0.0")
    fleet.wait_phase(DEVICE, "downloading", "2.0.0", since=mark)
    wait_until(
        lambda: fleet.chunk_bytes_sent >= bundle_size / 2,
        timeout=30,
        what="half of v2 sent",
        every=0.02,
    )
    assert agents.kill() == -signal.SIGKILL
    before = verified_chunks(agents.data_dir, "2.0.0")
    assert before, "no durable record of verified chunks"
    fleet.part_delay_s = 0.0

    start_and_wait_state(agents, fleet, window_chunks=2)
    mark = fleet.report_count(DEVICE)
    fleet.deploy(DEVICE, "2.0.0")  # the fleet re-sends: the device is not on its target
    event = outcome(fleet, "2.0.0", since=mark)
    assert event["phase"] == "activated", event
    downloaded = fleet.wait_phase(DEVICE, "downloaded", "2.0.0", since=mark)
    assert downloaded["metrics"]["reused_bytes"] > 0  # resumed from the .verified record
    assert fleet.chunk_bytes_sent < 1.5 * bundle_size, (fleet.chunk_bytes_sent, bundle_size)
    asked = chunk_requests(fleet)  # the chunks verified before the kill were asked for once
    assert {key: asked[key] for key in before} == dict.fromkeys(before, 1)
    current = agents.data_dir / "models" / MODEL / "current"
    assert model_files(current) == bundle_payload(releases["2.0.0"])
    assert not (agents.data_dir / "staging" / MODEL / "2.0.0").exists()


# --- rows 28-29: crashes and a full disk during the install --------------------------------------


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Data directories made once per module by a real agent, copied by tests (see below)."""
    return {"root": tmp_path_factory.mktemp("templates")}


@pytest.fixture
def v1_installed(
    broker: Any, fleet: FleetHarness, agents: Agents, templates: dict[str, Path]
) -> Agents:
    """The agent's data directory with v1 active and committed, as a real agent left it.

    The first test to ask makes it (start, deploy v1, wait for the commit, stop) and keeps a
    copy; later tests start from a copy. The copy also holds the cached runtime decision of v2
    (deployed once after the copy was taken), so the v2 deployments under test skip the probe.
    """
    template = templates.get("v1")
    if template is None:
        start_and_wait_state(agents, fleet)
        deploy(fleet, "1.0.0")
        agents.stop()
        template = templates["root"] / "v1-committed"
        shutil.copytree(agents.data_dir, template, symlinks=True)
        start_and_wait_state(agents, fleet)
        deploy(fleet, "2.0.0")
        agents.stop()
        shutil.copytree(agents.data_dir / "cache", template / "cache", dirs_exist_ok=True)
        shutil.rmtree(agents.data_dir)
        templates["v1"] = template
    shutil.copytree(template, agents.data_dir, symlinks=True)
    accepted = json.loads((agents.data_dir / "state.json").read_text())["order_sequence"]
    fleet.continue_sequence(accepted)
    return agents


def _staged(d: Path, name: str) -> bool:
    return (d / "staging" / MODEL / "2.0.0" / name).exists()


def _switching(d: Path) -> bool:
    return (d / "models" / MODEL / "journal.json").exists()


def _temp_links(d: Path) -> list[Path]:
    return list((d / "models" / MODEL).glob(".tmp-*"))


def _on_probation(d: Path) -> bool:
    probation = d / "probation.json"
    return probation.exists() and json.loads(probation.read_text())["version"] == "2.0.0"


# What the data directory shows at the instant of each crash (proof the fault point was hit).
AT_CRASH: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "after_download": ("v2 staged with its chunk record", lambda d: _staged(d, ".verified")),
    "after_verify": ("v2 staged with its chunk record", lambda d: _staged(d, ".verified")),
    "mid_unpack": ("v2's manifest in staging", lambda d: _staged(d, "manifest.json")),
    "before_fsync": ("a temporary file", lambda d: bool(list(d.rglob(".tmp-*")))),
    "after_symlink_tmp": (
        "a journalled switch, a temporary link",
        lambda d: _switching(d) and bool(_temp_links(d)),
    ),
    "after_replace": (
        "a journalled switch, no temporary link",
        lambda d: _switching(d) and not _temp_links(d),
    ),
    "before_commit": ("v2 on probation", _on_probation),
    "after_commit": ("v2 on probation", _on_probation),
}
assert set(AT_CRASH) == set(FAULT_POINTS)


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_28_kill_at_each_install_step(broker, fleet, v1_installed, point):
    """Row 28: a SIGKILL at each fault point leaves invariants I1-I3 and I5 after recovery."""
    agents = v1_installed
    assert check_installed(agents.data_dir) == "1.0.0"
    floor_before = model_status(agents.data_dir)["rollback_floor"]

    mark = fleet.report_count(DEVICE)
    proc = agents.start(env={"EDGEFLEET_FAULT": point})
    wait_until(
        lambda: (
            proc.poll() is not None or any(s == "up/state" for s, _ in fleet.reports[DEVICE][mark:])
        ),
        timeout=60,
        what="the faulty agent's first state report or its death",
    )
    fleet.deploy(DEVICE, "2.0.0")
    try:
        returncode = proc.wait(120)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the agent never reached fault point {point}; {timeline(fleet.events(DEVICE))}"
        )
    assert returncode == -signal.SIGKILL
    reached_install = any(e["version"] == "2.0.0" for e in events_since(fleet, mark))
    check_installed(agents.data_dir)  # I1 holds at the instant of the crash
    what, shows = AT_CRASH[point]
    assert shows(agents.data_dir), f"after a crash at {point} the data directory has no {what}"

    mark = fleet.report_count(DEVICE)
    start_and_wait_state(agents, fleet)  # recovery runs before the first report
    assert check_installed(agents.data_dir) in ("1.0.0", "2.0.0")  # I1, I3
    assert leftovers(agents.data_dir) == []  # I2, I3
    assert model_status(agents.data_dir)["rollback_floor"] >= floor_before  # I5

    fleet.deploy(DEVICE, "2.0.0")
    event = outcome(fleet, "2.0.0", since=mark)
    assert event["phase"] == "activated", timeline(events_since(fleet, mark))
    # however v2 became current, it must go through probation and be committed
    fleet.wait_phase(DEVICE, "committed", "2.0.0", timeout=10, since=mark)
    assert check_installed(agents.data_dir) == "2.0.0"
    state = model_status(agents.data_dir)
    assert state["version"] == "2.0.0"
    assert state["probation"] is None
    assert leftovers(agents.data_dir) == []
    assert reached_install, (
        f"EDGEFLEET_FAULT={point} killed the agent before it received the v2 order (at start-up):"
        " this fault point never interrupts an install step"
    )


def test_29_disk_full_during_download(broker, fleet, agents):
    """Row 29: a write refused for lack of space aborts cleanly (staging removed)."""
    # Above every state file, metadata file and v1 file (the largest, vectors/input.npy, is
    # 49 KB), below v2's extra/calibration.bin (600 KB).
    limit = 200_000

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = start_and_wait_state(agents, fleet, preexec_fn=small_disk)
    deploy(fleet, "1.0.0")
    mark = fleet.report_count(DEVICE)
    fleet.deploy(DEVICE, "2.0.0")
    event = outcome(fleet, "2.0.0", since=mark)
    assert proc.poll() is None, f"the agent died ({proc.returncode}) instead of aborting"
    assert event["phase"] == "failed", event
    assert event["failure_class"] == "storage", event
    assert event["version"] == "2.0.0"
    assert not (agents.data_dir / "staging" / MODEL / "2.0.0").exists()
    state = model_status(agents.data_dir)
    assert state["version"] == "1.0.0"
    assert state["downloading"] == []
    assert check_installed(agents.data_dir) == "1.0.0"
    assert served_version(broker, agents.data_dir) == "1.0.0"


# --- rows 30-33: bad models, crash loops, damaged disks, concurrent orders -----------------------


def test_30_model_failing_its_self_test_is_not_activated(broker, fleet, agents, bad_release):
    """Row 30: a model whose golden outputs do not match is never activated."""
    fleet.publish(bad_release)
    start_and_wait_state(agents, fleet)
    deploy(fleet, "1.0.0")
    mark = fleet.report_count(DEVICE)
    fleet.deploy(DEVICE, BAD)
    event = outcome(fleet, BAD, since=mark)
    assert event["phase"] == "failed", event
    assert event["failure_class"] == "self_test", event
    assert not [e for e in events_since(fleet, mark) if e["phase"] == "activated"]

    state = model_status(agents.data_dir)
    assert state["version"] == "1.0.0"
    assert check_installed(agents.data_dir) == "1.0.0"
    assert served_version(broker, agents.data_dir) == "1.0.0"
    # the matrix: "failed=<ver> recorded; not retried unless re-released"
    assert BAD in state["failed_versions"], state


def test_31_crash_loop_after_activation_rolls_back(broker, fleet, agents):
    """Row 31: more restarts than max_crash_restarts during probation roll back."""
    loop = {"probation_s": 60.0, "max_crash_restarts": 2}
    start_and_wait_state(agents, fleet)
    deploy(fleet, "1.0.0")
    agents.stop()
    start_and_wait_state(agents, fleet, **loop)
    deploy(fleet, "2.0.0", commit=False)
    assert model_status(agents.data_dir)["probation"] == "2.0.0"

    mark = fleet.report_count(DEVICE)
    for _ in range(3):
        assert agents.kill() == -signal.SIGKILL
        start_and_wait_state(agents, fleet, **loop)
    event = fleet.wait_phase(DEVICE, "rolled_back", "2.0.0", timeout=30, since=mark)
    assert event["failure_class"] == "crash_loop", event

    state = model_status(agents.data_dir)
    assert state["version"] == "1.0.0"
    assert "2.0.0" in state["failed_versions"]
    assert state["probation"] is None
    assert check_installed(agents.data_dir) == "1.0.0"
    assert served_version(broker, agents.data_dir) == "1.0.0"


def test_32_corrupted_current_model_falls_back(broker, fleet, agents):
    """Row 32: a damaged current model is detected at start-up and rolled back."""
    start_and_wait_state(agents, fleet)
    deploy(fleet, "1.0.0")
    deploy(fleet, "2.0.0")
    agents.stop()
    weights = (agents.data_dir / "models" / MODEL / "current" / "onnx" / "model.onnx").resolve()
    assert weights.parent.parent.name == "2.0.0"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    mark = fleet.report_count(DEVICE)
    start_and_wait_state(agents, fleet)
    event = fleet.wait_phase(DEVICE, "rolled_back", "2.0.0", timeout=30, since=mark)
    assert event["failure_class"] == "corruption", event
    state = model_status(agents.data_dir)
    assert state["version"] == "1.0.0"
    assert check_installed(agents.data_dir) == "1.0.0"
    assert served_version(broker, agents.data_dir) == "1.0.0"


def test_33_two_orders_10ms_apart_never_swap_concurrently(broker, fleet, agents):
    """Row 33: two orders 10 ms apart run one after the other (or coalesce); v2 wins."""
    start_and_wait_state(agents, fleet)
    mark = fleet.report_count(DEVICE)
    fleet.deploy(DEVICE, "1.0.0")
    time.sleep(0.01)
    fleet.deploy(DEVICE, "2.0.0")
    event = outcome(fleet, "2.0.0", since=mark)
    assert event["phase"] == "activated", timeline(events_since(fleet, mark))
    fleet.wait_phase(DEVICE, "committed", "2.0.0", timeout=30, since=mark)

    events = events_since(fleet, mark)
    steps = [(e["version"], e["phase"]) for e in events if e["phase"] in WORKER_PHASES]
    assert not [e for e in events if e["phase"] == "failed"], steps
    # one deployment at a time: v1's steps (if v1 was not coalesced away) all come before v2's
    first_v2 = next(i for i, (v, _) in enumerate(steps) if v == "2.0.0")
    assert all(v == "1.0.0" for v, _ in steps[:first_v2]), steps
    assert all(v == "2.0.0" for v, _ in steps[first_v2:]), steps
    assert [p for v, p in steps if v == "2.0.0"][-1] == "activated", steps
    assert [p for v, p in steps if v == "2.0.0"].count("activated") == 1, steps
    state = model_status(agents.data_dir)
    assert state["version"] == "2.0.0"
    assert state["failed_versions"] == []
    assert check_installed(agents.data_dir) == "2.0.0"
    assert served_version(broker, agents.data_dir) == "2.0.0"


def test_33_order_arriving_during_probation_is_installed_and_activated(broker, fleet, agents):
    """The path of the test above where the orders are not coalesced, made deterministic: v2's
    order arrives as soon as v1 is active, so v2 is installed and self-tested while v1 is still
    on probation (and v1's commit falls in the middle of it)."""
    start_and_wait_state(agents, fleet)
    mark = fleet.report_count(DEVICE)
    deploy(fleet, "1.0.0", commit=False)
    fleet.deploy(DEVICE, "2.0.0")
    event = outcome(fleet, "2.0.0", since=mark)
    assert event["phase"] == "activated", timeline(events_since(fleet, mark))
    fleet.wait_phase(DEVICE, "committed", "2.0.0", timeout=30, since=mark)
    state = model_status(agents.data_dir)
    assert state["version"] == "2.0.0"
    assert state["previous_version"] == "1.0.0"
    assert check_installed(agents.data_dir) == "2.0.0"


# --- rows 18-19: replayed and retained commands --------------------------------------------------


def _replay_rejected(fleet: FleetHarness, mark: int) -> dict[str, Any]:
    event = outcome(fleet, "?", since=mark, phases=("failed", "activated", "received"))
    assert event["phase"] == "failed", event
    assert event["failure_class"] == "verification", event
    assert "replay" in event["detail"], event
    return event


def test_19_replayed_command_is_rejected(broker, fleet, agents):
    """Row 19: a captured order published again is refused as a replay; nothing changes."""
    start_and_wait_state(agents, fleet)
    old = deploy(fleet, "1.0.0")
    latest = deploy(fleet, "2.0.0")
    before = status(agents.data_dir)

    for payload in (latest, old):  # the same order again; an older one (a downgrade attempt)
        mark = fleet.report_count(DEVICE)
        fleet.send_command(DEVICE, payload)
        _replay_rejected(fleet, mark)
        started = [e for e in events_since(fleet, mark) if e["version"] != "?"]
        assert not started, timeline(started)
    assert status(agents.data_dir) == before


def test_18_retained_old_command_is_ignored_after_restart(broker, fleet, agents):
    """Row 18: a retained old order, delivered again at every resubscription, is refused."""
    start_and_wait_state(agents, fleet)
    old = deploy(fleet, "1.0.0")
    deploy(fleet, "2.0.0")
    before = status(agents.data_dir)

    mark = fleet.report_count(DEVICE)
    reason = fleet.client.publish_and_wait(device_topic(DEVICE, DOWN_CMD), old, retain=True)
    assert reason is not None
    assert not reason.is_failure, reason
    _replay_rejected(fleet, mark)  # the live agent gets it too

    agents.stop()
    mark = fleet.report_count(DEVICE)
    start_and_wait_state(agents, fleet)  # resubscribes: the broker hands it the retained order
    _replay_rejected(fleet, mark)
    # (a restarted agent re-runs the cached self-test of its current version: not a change)
    changes = ("received", "downloading", "activated", "rolled_back", "committed")
    started = [e for e in events_since(fleet, mark) if e["phase"] in changes]
    assert not started, timeline(started)
    assert status(agents.data_dir) == before
    assert served_version(broker, agents.data_dir) == "2.0.0"
