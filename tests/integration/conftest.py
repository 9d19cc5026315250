"""A real Mosquitto broker, configured by :mod:`fleet.broker_config`, for integration tests.

The ``broker`` fixture writes the configuration under test (the same text a deployment runs,
only paths, port and user differ) into a fresh temporary directory, starts ``mosquitto -c`` on a
free 127.0.0.1 port and yields a :class:`Broker`:

>>> dev1 = broker.client("dev-001")                                    # doctest: +SKIP
>>> dev1.publish_and_wait("edgefleet/v1/devices/dev-002/down/cmd", b"x")  # doctest: +SKIP
ReasonCode(Puback, 'Not authorized')
>>> broker.restart()                 # same port, same persistence directory  # doctest: +SKIP

``broker_factory(**changes)`` starts more brokers, or variants: ``changes`` are
:class:`~fleet.broker_config.BrokerConfig` fields, plus ``apps`` (the ACL's app bindings) and
``edit_conf`` (a function applied to the config text, for negative controls that show a test
fails without a given line).

There is deliberately no plaintext fixture: the broker under test has no plaintext listener.

Who mosquitto runs as: the tests may run as root, and mosquitto started by root drops privileges
to the ``mosquitto`` user, which can neither enter pytest's 0700 temporary directories nor read
the 0600 keys. The config therefore says ``user <the user running the tests>`` (a no-op when
that user is not root), so no file has to be made world-readable.

Start-up takes a few tens of milliseconds, so every test gets its own broker (function scope)
and its own device ids need not be unique.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.client import MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleet.broker_config import BrokerConfig, write_broker_config
from tests.pki import Pki, make_pki

START_TIMEOUT_S = 5.0
WAIT_S = 5.0
APPS = {"app-viewer": "dev-001"}

_BROKERS = pytest.StashKey[list["Broker"]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, add the log of every broker the test started to the failure report."""
    report = yield
    if report.failed:
        for broker in item.stash.get(_BROKERS, []):
            report.sections.append((f"mosquitto log ({broker.config_path})", broker.log()))
    return report


# --- the MQTT test client ---


class BrokerConnectError(ConnectionError):
    """The broker refused the connection (TLS handshake, CONNACK) or dropped it before CONNACK.

    ``reason`` is what was seen: an exception, a CONNACK or DISCONNECT reason code, or "timeout".
    """

    def __init__(self, name: str | None, reason: object) -> None:
        super().__init__(f"client {name!r} could not connect: {reason!r}")
        self.name = name
        self.reason = reason


class ProbeClient(mqtt.Client):
    """A paho client (callback API v2) that records what happens, for assertions.

    It never reconnects by itself (a security test must see a disconnect), and it runs paho's
    network loop in paho's own thread (``loop_start``). Waiting helpers all take timeouts.
    """

    def __init__(
        self,
        name: str | None,
        *,
        protocol: MQTTProtocolVersion,
        client_id: str,
        clean_start: bool = True,
    ) -> None:
        super().__init__(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else clean_start,
            reconnect_on_failure=False,
        )
        self.name = name
        self.messages: queue.Queue[MQTTMessage] = queue.Queue()
        self.connack: ReasonCode | None = None
        self.connack_properties: Properties | None = None
        self.disconnect_reason: ReasonCode | None = None
        self.connected_event = threading.Event()
        self.disconnected = threading.Event()
        self._acks: dict[int, Any] = {}
        self._acks_changed = threading.Condition()
        self.on_connect = self._record_connect
        self.on_disconnect = self._record_disconnect
        self.on_message = self._record_message
        self.on_publish = self._record_publish
        self.on_subscribe = self._record_subscribe

    # callbacks (paho's thread)
    def _record_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, props: Any) -> None:
        self.connack, self.connack_properties = rc, props
        self.connected_event.set()

    def _record_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.disconnect_reason = rc
        self.disconnected.set()
        with self._acks_changed:
            self._acks_changed.notify_all()

    def _record_message(self, _c: Any, _u: Any, message: MQTTMessage) -> None:
        self.messages.put(message)

    def _record_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._acks_changed:
            self._acks[mid] = rc
            self._acks_changed.notify_all()

    def _record_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        with self._acks_changed:
            self._acks[mid] = rcs
            self._acks_changed.notify_all()

    def _wait_ack(self, mid: int, timeout: float) -> Any:
        with self._acks_changed:
            self._acks_changed.wait_for(
                lambda: mid in self._acks or self.disconnected.is_set(), timeout
            )
            return self._acks.pop(mid, None)

    # helpers (test thread)
    def connect_and_wait(
        self,
        host: str,
        port: int,
        *,
        clean_start: bool = True,
        session_expiry_s: int | None = None,
        timeout: float = WAIT_S,
    ) -> None:
        """Connect, start paho's loop thread and wait for a successful CONNACK.

        Raises:
            BrokerConnectError: TLS or socket failure, a refusing CONNACK, or a disconnect (or
                nothing) instead of a CONNACK within ``timeout``.
        """
        options: dict[str, Any] = {}
        if self.protocol == mqtt.MQTTv5:  # (MQTT 3.1.1 takes clean_session in the constructor)
            options["clean_start"] = clean_start
            if session_expiry_s is not None:
                options["properties"] = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                options["properties"].SessionExpiryInterval = session_expiry_s
        try:
            self.connect(host, port, keepalive=30, **options)
        except OSError as e:  # includes ssl.SSLError
            raise BrokerConnectError(self.name, e) from e
        self.loop_start()
        deadline = time.monotonic() + timeout
        while not self.connected_event.wait(0.01):
            if self.disconnected.is_set():
                raise BrokerConnectError(self.name, self.disconnect_reason)
            if time.monotonic() > deadline:
                raise BrokerConnectError(self.name, "timeout")
        assert self.connack is not None
        if self.connack.is_failure:
            raise BrokerConnectError(self.name, self.connack)

    def publish_and_wait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = WAIT_S,
    ) -> ReasonCode | None:
        """Publish and return the PUBACK reason code, or None if disconnected without one."""
        info = self.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        result: ReasonCode | None = self._wait_ack(info.mid, timeout)
        if result is None and not self.disconnected.is_set():
            raise AssertionError(f"{self.name}: no PUBACK for {topic} within {timeout} s")
        return result

    def subscribe_and_wait(
        self, topic: str, *, qos: int = 1, timeout: float = WAIT_S
    ) -> list[ReasonCode]:
        """Subscribe and return the SUBACK reason codes."""
        rc, mid = self.subscribe(topic, qos=qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"{self.name}: subscribe {topic} failed: {rc}"
        assert mid is not None
        result = self._wait_ack(mid, timeout)
        assert result is not None, f"{self.name}: no SUBACK for {topic} within {timeout} s"
        return list(result)

    def expect_message(self, timeout: float = WAIT_S) -> MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no message within {timeout} s") from None

    def assert_no_message(self, window: float = 0.5) -> None:
        """Assert nothing arrives within ``window`` seconds (a bounded negative check)."""
        try:
            message = self.messages.get(timeout=window)
        except queue.Empty:
            return
        raise AssertionError(
            f"{self.name} received {message.topic!r} ({len(message.payload)} bytes) "
            "but should have received nothing"
        )

    def wait_disconnected(self, timeout: float = WAIT_S) -> ReasonCode | None:
        assert self.disconnected.wait(timeout), f"{self.name}: still connected after {timeout} s"
        return self.disconnect_reason

    def close(self) -> None:
        try:
            if not self.disconnected.is_set():
                self.disconnect()
        finally:
            self.loop_stop()


# --- the broker handle ---


@dataclasses.dataclass
class Broker:
    """One mosquitto process with the configuration under test. See the module docstring."""

    host: str
    port: int
    pki: Pki
    cfg: BrokerConfig
    config_path: Path
    acl_path: Path
    log_path: Path
    executable: str
    _proc: subprocess.Popen[bytes] | None = None
    _clients: list[ProbeClient] = dataclasses.field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self._proc is not None, "broker is not running"
        return self._proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start mosquitto and wait until its port completes a TLS handshake."""
        assert self._proc is None or self._proc.poll() is not None, "broker already running"
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.executable, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with status {self._proc.returncode}:\n{self.log()}"
                )
            try:
                self._tls_probe()
            except OSError as e:
                last_error = e
                time.sleep(0.01)
            else:
                return
        self.stop()
        raise RuntimeError(
            f"mosquitto not accepting TLS after {timeout} s ({last_error}):\n{self.log()}"
        )

    def _tls_probe(self) -> None:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(*map(str, self.pki.client("fleet-svc")))
        with (
            socket.create_connection((self.host, self.port), timeout=1) as sock,
            context.wrap_socket(sock, server_hostname=self.host),
        ):
            pass

    def stop(self, timeout: float = 5.0) -> None:
        """Stop mosquitto (SIGTERM, so it saves its persistence database; SIGKILL if stuck)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start again: same port, same config, same persistence directory."""
        self.stop()
        self.start()

    def new_client(
        self,
        name: str | None,
        *,
        protocol: MQTTProtocolVersion = mqtt.MQTTv5,
        client_id: str | None = None,
        clean_start: bool = True,
        tls: bool = True,
    ) -> ProbeClient:
        """An unconnected client with identity ``name``'s certificate (None: no certificate).

        Closed at teardown. ``tls=False`` makes a plaintext client (for the development
        listener, which the fixture's broker does not have).
        """
        client = ProbeClient(
            name,
            protocol=protocol,
            client_id=client_id if client_id is not None else name or "",
            clean_start=clean_start,
        )
        if tls:
            certfile = keyfile = None
            if name is not None:
                certfile, keyfile = (str(path) for path in self.pki.client(name))
            client.tls_set(ca_certs=str(self.pki.ca_cert), certfile=certfile, keyfile=keyfile)
        self._clients.append(client)
        return client

    def client(
        self,
        name: str | None,
        *,
        protocol: MQTTProtocolVersion = mqtt.MQTTv5,
        client_id: str | None = None,
        clean_start: bool = True,
        session_expiry_s: int | None = None,
        timeout: float = WAIT_S,
    ) -> ProbeClient:
        """A client connected with identity ``name``'s certificate (None: no certificate).

        ``client_id`` defaults to ``name``; ``session_expiry_s`` applies to MQTT 5 only.

        Raises:
            BrokerConnectError: (a ConnectionError) TLS handshake failure, a refusing CONNACK,
                or a disconnect (or nothing) instead of a CONNACK within ``timeout``.
        """
        client = self.new_client(
            name, protocol=protocol, client_id=client_id, clean_start=clean_start
        )
        client.connect_and_wait(
            self.host,
            self.port,
            clean_start=clean_start,
            session_expiry_s=session_expiry_s,
            timeout=timeout,
        )
        return client

    def listening_sockets(self) -> set[tuple[str, int]]:
        """(address, port) of every TCP socket the mosquitto process listens on (Linux /proc)."""
        inodes = set()
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        found = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A = LISTEN
                    address_hex, port_hex = local.split(":")
                    found.add((_proc_net_address(address_hex), int(port_hex, 16)))
        return found

    def close_clients(self) -> None:
        for client in self._clients:
            try:
                client.close()
            except Exception:
                pass
        self._clients.clear()


def _proc_net_address(address_hex: str) -> str:
    raw = bytes.fromhex(address_hex)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    """The mosquitto executable, or fail the test with how to install it (never skip)."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        pytest.fail(
            "mosquitto (2.0 or newer) is needed by the integration tests but is not on PATH "
            "(nor in /usr/sbin). Install it: `sudo apt-get install mosquitto` (Debian/Ubuntu), "
            "`brew install mosquitto` (macOS), or see https://mosquitto.org/download/.",
            pytrace=False,
        )
    return found


# --- fixtures ---


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def broker_factory(
    request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerFactory]:
    """Start brokers (or variants, see the module docstring); all are stopped at teardown."""
    executable = find_mosquitto()
    brokers = request.node.stash.setdefault(_BROKERS, [])

    def make(
        *,
        apps: Mapping[str, str] = APPS,
        edit_conf: Callable[[str], str] | None = None,
        **changes: Any,
    ) -> Broker:
        directory = tmp_path_factory.mktemp("broker")
        (directory / "db").mkdir()
        cfg = BrokerConfig(
            cafile=pki.ca_cert,
            certfile=pki.server_cert,
            keyfile=pki.server_key,
            crlfile=pki.crl,
            port=free_port(),
            bind_address="127.0.0.1",
            persistence_dir=directory / "db",
            run_as_user=getpass.getuser(),
            log_types=("all",),
        )
        cfg = dataclasses.replace(cfg, **changes)
        paths = write_broker_config(directory, cfg, apps=apps)
        if edit_conf is not None:
            paths["conf"].write_text(edit_conf(paths["conf"].read_text()))
        broker = Broker(
            host="127.0.0.1",
            port=cfg.port,
            pki=pki,
            cfg=cfg,
            config_path=paths["conf"],
            acl_path=paths["acl"],
            log_path=directory / "mosquitto.log",
            executable=executable,
        )
        brokers.append(broker)
        broker.start()
        return broker

    yield make

    for broker in brokers:
        broker.close_clients()
        broker.stop()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> Broker:
    """A running broker with the production configuration (apps: app-viewer bound to dev-001)."""
    return broker_factory()


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    name = f"edgefleet_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as e:
        pytest.fail(
            f"PostgreSQL is not reachable at 127.0.0.1:5432 ({e}); start it with "
            "pg_ctlcluster <version> main start"
        )
    admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()


def empty_schema(url: str) -> None:
    """Leave the session's PostgreSQL database at ``url`` empty for the tests after this one
    (each fleet stores its own admin token, releases and devices there)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
