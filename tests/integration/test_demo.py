"""``edgefleet demo --json``: the README's main job, run as a user runs it, with each broker;
and how the demo stops on SIGINT or SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import simulators.demo
from shared.errors import UsageError
from simulators.demo import (
    Interrupted,
    _rollouts_of_cnn,
    _stop_signals,
    start_broker,
)
from tests.integration.conftest import free_port
from tests.polling import wait_until

pytestmark = pytest.mark.integration


def start_demo(
    tmp_path: Path, *options: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``edgefleet demo OPTIONS`` as a child process, its output in files: (process, stdout,
    stderr). Unbuffered, so a test can wait for a line."""
    stdout, stderr = tmp_path / "demo.out", tmp_path / "demo.err"
    command = [sys.executable, "-m", "shared.cli.main", "demo", *options]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return process, stdout, stderr


# mosquitto: MQTT 5, shared subscriptions. embedded: amqtt, MQTT 3.1.1 (about 30 s).
@pytest.mark.parametrize(("broker", "mqtt_protocol"), [("mosquitto", 5), ("embedded", 311)])
def test_demo_tells_the_whole_story(tmp_path: Path, broker: str, mqtt_protocol: int) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli.main",
            "demo",
            "--json",
            "--devices",
            "12",
            "--work-dir",
            str(tmp_path / "demo"),
            "--port",
            str(free_port()),
            "--broker",
            broker,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["broker"]["kind"] == broker
    assert summary["broker"]["mqtt_protocol"] == mqtt_protocol
    assert summary["devices"] == 12
    by_version = {r["version"]: r for r in summary["rollouts"]}
    assert by_version["1.0.0"]["state"] == "completed"
    assert by_version["1.0.0"]["devices_updated"] == 12
    assert by_version["2.0.0"]["state"] == "completed"
    assert by_version["2.0.0"]["stages_reached"] == 2
    bad = by_version["3.0.0"]
    assert bad["state"] == "halted"
    assert bad["stages_reached"] == 1
    # v3 breaks on the arm-npu class (its self-test refuses it there); the first stage covers
    # every class, so the gate halts it there, and only first-stage devices ever ran it.
    assert bad["devices_failed"].get("self_test", 0) >= 1
    # (The slower devices of the first stage may or may not have activated it before the NPU
    # failures made the gate's verdict certain.)
    assert bad["ever_ran"] <= 12 * 0.34 + 3
    # ...and every one of them was reverted: all devices, by their own data, run v2.
    assert summary["device_versions"] == {"2.0.0": 12}


def test_without_mosquitto_the_demo_runs_the_embedded_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulators.demo, "find_mosquitto", lambda: None)
    with start_broker(tmp_path, "auto") as broker:
        assert broker.kind == "embedded"
        assert broker.mqtt_protocol == 311
        assert broker.description.startswith("mosquitto not found, so the embedded Python broker")
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
            pass


def test_an_unknown_broker_is_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(UsageError, match="--broker must be one of auto, mosquitto, embedded"),
        start_broker(tmp_path, "rabbitmq"),
    ):
        pass


def _processes_under(directory: Path) -> list[int]:
    """The processes with an argument under ``directory`` (e.g. a broker's config file)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # it ended meanwhile
        if any(arg.startswith(os.fsencode(directory)) for arg in args):
            pids.append(int(cmdline.parent.name))
    return pids


# The first line comes while the demo builds its releases; "broker:" once mosquitto runs.
@pytest.mark.parametrize("line", ["edgefleet demo:", "broker:"])
def test_sigterm_during_the_set_up_stops_the_demo_and_its_broker(tmp_path: Path, line: str) -> None:
    work = tmp_path / "demo"
    process, stdout, stderr = start_demo(
        tmp_path,
        *("--rollouts", "console", "--broker", "mosquitto", "--devices", "3"),
        *("--port", str(free_port()), "--work-dir", str(work)),
    )
    try:
        wait_until(lambda: line in stdout.read_text(), what=f"the line {line!r}", timeout=120)
        if line == "broker:":
            assert _processes_under(work / "broker"), "mosquitto is not running"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        message = stderr.read_text()
        assert message.splitlines() == [
            "error: interrupted by SIGTERM: the demo and everything it started have stopped"
        ], message
        assert _processes_under(work / "broker") == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        for pid in _processes_under(work / "broker"):
            os.kill(pid, signal.SIGKILL)  # what a failed test left running


def test_a_stop_signal_ends_the_wait_and_a_second_one_the_demo() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with _stop_signals() as stop:
        with pytest.raises(Interrupted, match="interrupted by SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)  # before the wait: the demo stops
        stop.expect()
        os.kill(os.getpid(), signal.SIGINT)
        stop.wait()  # ended by the signal
        with pytest.raises(Interrupted, match="interrupted by SIGINT") as raised:
            os.kill(os.getpid(), signal.SIGINT)
        assert raised.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) == previous


def test_an_http_error_listing_the_rollouts_is_one_line() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="database\nunavailable")

    with (
        httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fleet") as client,
        pytest.raises(
            UsageError,
            match=r"^the fleet answered 503 Service Unavailable when asked for the rollouts, "
            r"so the demo has no summary: database unavailable$",
        ),
    ):
        _rollouts_of_cnn(client)
