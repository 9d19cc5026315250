"""The broker half of the attack matrix (rows 13-18, 20 and 40; see docs/security.md).

Every test runs against a real mosquitto started with the configuration that
:mod:`fleet.broker_config` generates. Negative checks ("nothing is delivered") wait a bounded
0.5 s and are paired with a positive control showing the same path does deliver when allowed.
Reason codes are MQTT 5 (0x87 = 135 Not authorized).
"""

from __future__ import annotations

import socket
import ssl
import time

import paho.mqtt.client as mqtt
import pytest

from shared.protocol import DOWN_CMD, INFER_REQUEST, INFER_RESPONSE, UP_STATE, device_topic

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87
DEV1_UP_STATE = device_topic("dev-001", UP_STATE)
DEV1_DOWN_CMD = device_topic("dev-001", DOWN_CMD)
DEV2_DOWN_CMD = device_topic("dev-002", DOWN_CMD)
DEV2_DOWN_ALL = device_topic("dev-002", "down/#")
MQTT311_CONNECT = bytes([0x10, 13, 0, 4, *b"MQTT", 4, 2, 0, 30, 0, 1, *b"x"])


def tls_refusal(broker, name: str | None, *, max_version: ssl.TLSVersion) -> str:
    """Connect with ``name``'s certificate; return the TLS error (fail if the broker accepts).

    With TLS 1.2 the server's verdict on the client certificate is an alert inside the
    handshake; with TLS 1.3 it arrives after the client's side of the handshake completed, so
    it is read afterwards. The client sends nothing: unread data would make the server's close
    a TCP reset, which can destroy the alert before it is read.
    """
    context = ssl.create_default_context(cafile=str(broker.pki.ca_cert))
    context.maximum_version = max_version
    if name is not None:
        context.load_cert_chain(*map(str, broker.pki.client(name)))
    with socket.create_connection((broker.host, broker.port), timeout=2) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=broker.host) as tls:
                tls.recv(16)
        except ssl.SSLError as e:
            return str(e)
        except TimeoutError:
            pass  # the broker is waiting for CONNECT: it accepted the certificate
    pytest.fail(f"broker accepted {name!r} over {max_version.name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_log(broker, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in broker.log():
        assert time.monotonic() < deadline, f"{text!r} not in the mosquitto log"
        time.sleep(0.02)


# --- row 13: no certificate, no plaintext ---


def test_client_without_certificate_cannot_connect(broker):
    with pytest.raises(ConnectionError):
        broker.client(None)
    assert "HANDSHAKE_FAILURE" in tls_refusal(broker, None, max_version=ssl.TLSVersion.TLSv1_2)
    assert "CERTIFICATE_REQUIRED" in tls_refusal(broker, None, max_version=ssl.TLSVersion.TLSv1_3)
    wait_for_log(broker, "peer did not return a certificate")


def test_plain_mqtt_connect_on_the_tls_port_gets_no_connack(broker):
    with socket.create_connection((broker.host, broker.port), timeout=5) as sock:
        sock.sendall(MQTT311_CONNECT)
        received = b""
        try:
            while chunk := sock.recv(64):
                received += chunk
        except ConnectionResetError:
            pass
    assert not received.startswith(b"\x20"), f"got a CONNACK over plaintext: {received!r}"
    wait_for_log(broker, "wrong version number")


def test_the_broker_listens_on_its_tls_port_only(broker):
    assert broker.listening_sockets() == {("127.0.0.1", broker.port)}
    conf = broker.config_path.read_text()
    assert [line for line in conf.splitlines() if line.startswith("listener")] == [
        f"listener {broker.port} 127.0.0.1"
    ]
    assert "allow_anonymous false" in conf.splitlines()


# --- row 14: expired, revoked, foreign CA ---


@pytest.mark.parametrize(
    ("name", "alert"),
    [
        ("dev-expired", "CERTIFICATE_EXPIRED"),
        ("dev-revoked", "CERTIFICATE_REVOKED"),
        ("rogue", "UNKNOWN_CA"),  # CN dev-001, signed by another CA
    ],
)
def test_invalid_client_certificate_is_refused(broker, name, alert):
    with pytest.raises(ConnectionError):
        broker.client(name)
    assert alert in tls_refusal(broker, name, max_version=ssl.TLSVersion.TLSv1_2)
    assert alert in tls_refusal(broker, name, max_version=ssl.TLSVersion.TLSv1_3)
    wait_for_log(broker, "certificate verify failed")
    assert "New client connected" not in broker.log()


def test_the_crl_is_what_refuses_the_revoked_certificate(broker_factory):
    without_crl = broker_factory(crlfile=None)
    without_crl.client("dev-revoked")  # negative control: connects when no CRL is configured


# --- row 15: a device publishing to another device ---


def test_device_cannot_command_another_device(broker):
    dev2 = broker.client("dev-002")
    dev2.subscribe_and_wait(DEV2_DOWN_ALL)
    dev1 = broker.client("dev-001")

    rc = dev1.publish_and_wait(DEV2_DOWN_CMD, b'{"spoofed": true}')

    assert rc is not None
    assert rc.value == NOT_AUTHORIZED
    dev2.assert_no_message()
    assert not dev1.disconnected.is_set()


def test_device_reports_reach_the_fleet_service(broker):
    fleet = broker.client("fleet-svc")
    fleet.subscribe_and_wait("edgefleet/v1/devices/+/up/#")
    dev1 = broker.client("dev-001")

    rc = dev1.publish_and_wait(DEV1_UP_STATE, b'{"ok": 1}')

    assert rc is not None
    assert not rc.is_failure
    message = fleet.expect_message()
    assert (message.topic, message.payload) == (DEV1_UP_STATE, b'{"ok": 1}')


# --- row 16: wildcard subscriptions ---


def test_wildcard_subscriptions_deliver_nothing_of_other_devices(broker):
    dev2 = broker.client("dev-002")
    dev2.subscribe_and_wait(DEV2_DOWN_ALL)
    fleet = broker.client("fleet-svc")
    dev1 = broker.client("dev-001")
    subacks = {}
    for topic in (
        "#",
        "edgefleet/v1/devices/+/down/#",
        "edgefleet/v1/devices/+/+/cmd",
        "$SYS/#",
        "$CONTROL/#",
    ):
        subacks[topic] = dev1.subscribe_and_wait(topic)
    # Mosquitto 2.0 grants these (the ACL applies per message); a refusal would be fine too.
    assert all(len(codes) == 1 for codes in subacks.values()), subacks

    fleet.publish_and_wait(DEV2_DOWN_CMD, b"for dev-002 only")

    assert dev2.expect_message().payload == b"for dev-002 only"  # the message was sent
    dev1.assert_no_message()  # ...and none of dev-001's subscriptions got it ($SYS retained either)
    fleet.publish_and_wait(DEV1_DOWN_CMD, b"for dev-001")
    assert dev1.expect_message().topic == DEV1_DOWN_CMD  # positive control: subscriptions live


# --- row 17: client-id takeover ---


def test_device_cannot_take_over_another_devices_session(broker):
    dev2 = broker.client("dev-002")
    dev2.subscribe_and_wait(DEV2_DOWN_ALL)

    broker.client("dev-001", client_id="dev-002")

    assert not dev2.disconnected.wait(0.5), f"dev-002 was disconnected: {dev2.disconnect_reason}"
    fleet = broker.client("fleet-svc")
    fleet.publish_and_wait(DEV2_DOWN_CMD, b"still here?")
    assert dev2.expect_message().payload == b"still here?"
    wait_for_log(broker, "as dev-001 (p5")  # the impostor's session is named after its CN


def test_without_use_username_as_clientid_the_takeover_succeeds(broker_factory):
    """Negative control: the previous test fails if the config line is removed."""
    weak = broker_factory(
        edit_conf=lambda text: text.replace(
            "use_username_as_clientid true", "use_username_as_clientid false"
        )
    )
    dev2 = weak.client("dev-002")

    weak.client("dev-001", client_id="dev-002")

    dev2.wait_disconnected()  # (2.0.11 closes the socket; paho reports 0x80, not 0x8E)
    wait_for_log(weak, "Client dev-002 already connected, closing old connection.")
    wait_for_log(weak, "as dev-002 (p5, c1, k30, u'dev-001')")


# --- row 18 (broker part): retained messages on fleet topics ---


@pytest.mark.parametrize(
    ("topic", "owner"), [(DEV1_DOWN_CMD, "dev-001"), (DEV2_DOWN_CMD, "dev-002")]
)
def test_device_cannot_retain_commands(broker, topic, owner):
    dev1 = broker.client("dev-001")

    rc = dev1.publish_and_wait(topic, b'{"old": "command"}', retain=True)

    assert rc is not None
    assert rc.value == NOT_AUTHORIZED
    later = broker.client(owner)  # (replaces dev-001's own session in the first case)
    later.subscribe_and_wait(topic)
    later.assert_no_message()  # nothing retained for a later subscriber


def test_limitation_device_may_retain_on_its_own_up_topics(broker):
    """Mosquitto 2.0 ACLs have no retain bit: this documents, not endorses, the behaviour.

    The agent never sets retain and the fleet service does not trust retained state.
    """
    dev1 = broker.client("dev-001")
    rc = dev1.publish_and_wait(DEV1_UP_STATE, b"{}", retain=True)
    assert rc is not None
    assert not rc.is_failure


# --- row 20: oversized packets ---


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311])
def test_oversized_publish_disconnects_the_publisher(broker, protocol):
    limit = broker.cfg.max_packet_size
    fleet = broker.client("fleet-svc")
    fleet.subscribe_and_wait("edgefleet/v1/devices/+/up/#")
    dev1 = broker.client("dev-001", protocol=protocol)
    if protocol == mqtt.MQTTv5:
        assert dev1.connack_properties is not None
        assert dev1.connack_properties.MaximumPacketSize == limit

    near_limit = b"n" * (limit - 1024)
    assert dev1.publish_and_wait(DEV1_UP_STATE, near_limit) is not None  # positive control
    assert fleet.expect_message().payload == near_limit

    rc = dev1.publish_and_wait(DEV1_UP_STATE, b"x" * (2 * limit))

    assert rc is None  # no PUBACK: the connection is gone
    dev1.wait_disconnected()
    fleet.assert_no_message()
    wait_for_log(broker, "disconnected due to oversize packet")


# --- row 40: a device acting as the fleet service ---


@pytest.mark.parametrize(
    "topic",
    [
        device_topic("dev-002", UP_STATE),  # another device's reports
        device_topic("dev-002", INFER_REQUEST),
        DEV1_DOWN_CMD,  # commands, even to itself
        "edgefleet/v1/fleet/rollouts",  # anything outside its own subtree
        "$CONTROL/dynamic-security/v1",
        "$SYS/broker/uptime",
    ],
)
def test_device_cannot_publish_as_the_fleet_service(broker, topic):
    fleet = broker.client("fleet-svc")
    fleet.subscribe_and_wait("edgefleet/v1/#")
    dev1 = broker.client("dev-001")

    rc = dev1.publish_and_wait(topic, b'{"action": "deploy"}')

    assert rc is not None
    assert rc.value == NOT_AUTHORIZED
    fleet.assert_no_message()


# --- local applications on the fleet broker ---


def test_app_reaches_its_device_and_nothing_else(broker):
    request_topic = device_topic("dev-001", INFER_REQUEST)
    response_topic = device_topic("dev-001", f"{INFER_RESPONSE}/app-viewer")
    dev1 = broker.client("dev-001")
    dev1.subscribe_and_wait(request_topic)
    app = broker.client("app-viewer")
    app.subscribe_and_wait(device_topic("dev-001", f"{INFER_RESPONSE}/#"))
    app.subscribe_and_wait(device_topic("dev-002", f"{INFER_RESPONSE}/#"))

    assert not app.publish_and_wait(request_topic, b"req").is_failure
    assert dev1.expect_message().payload == b"req"
    assert not dev1.publish_and_wait(response_topic, b"resp").is_failure
    assert app.expect_message().payload == b"resp"

    for topic in (
        device_topic("dev-002", INFER_REQUEST),  # another device
        DEV1_DOWN_CMD,  # its device's commands
        device_topic("app-viewer", UP_STATE),  # posing as a device named after itself
    ):
        rc = app.publish_and_wait(topic, b"x")
        assert rc is not None
        assert rc.value == NOT_AUTHORIZED, topic
    dev2 = broker.client("dev-002")
    dev2.publish_and_wait(device_topic("dev-002", f"{INFER_RESPONSE}/other"), b"private")
    app.assert_no_message()


# --- the fixture itself: restart with persistence ---


def test_restart_keeps_the_port_and_queued_messages(broker):
    dev2 = broker.client("dev-002", clean_start=False, session_expiry_s=300)
    dev2.subscribe_and_wait(DEV2_DOWN_ALL)
    dev2.close()
    fleet = broker.client("fleet-svc")
    assert not fleet.publish_and_wait(DEV2_DOWN_CMD, b"queued").is_failure

    broker.restart()

    dev2 = broker.client("dev-002", clean_start=False, session_expiry_s=300)
    assert dev2.expect_message().payload == b"queued"


# --- the development listener (off by default) ---


def test_dev_plaintext_listener_is_loopback_only_and_trusts_claimed_names(broker_factory):
    plain_port = free_port()
    dev = broker_factory(allow_plaintext_port=plain_port)
    assert dev.listening_sockets() == {("127.0.0.1", dev.port), ("127.0.0.1", plain_port)}
    with pytest.raises(ConnectionError):
        dev.client(None)  # the TLS listener still requires a certificate

    anonymous = dev.new_client(None, client_id="anon", tls=False)
    with pytest.raises(ConnectionError):
        anonymous.connect_and_wait(dev.host, plain_port)  # no username: refused

    claimed = dev.new_client("claims dev-002", client_id="dev-001", tls=False)
    claimed.username_pw_set("dev-002")
    claimed.connect_and_wait(dev.host, plain_port)  # the documented development hazard...
    rc = claimed.publish_and_wait(DEV1_UP_STATE, b"x")  # ...but %u still confines the name
    assert rc is not None
    assert rc.value == NOT_AUTHORIZED
    assert not claimed.publish_and_wait(device_topic("dev-002", UP_STATE), b"x").is_failure
