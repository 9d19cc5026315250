"""The Mosquitto (2.0) configuration every edgefleet deployment runs: text in, text out.

The broker is the first line of defence between devices. This module decides, in one place, who
may connect (mutual TLS with the fleet CA, nothing else), who each connection *is* (its
certificate's CN), and what each identity may touch (ACL). It returns text; only
:func:`write_broker_config` touches the disk.

Rules the generated configuration enforces (each line is explained where it is emitted):

1. **One TLS listener, client certificate required.** There is no plaintext listener unless
   :attr:`BrokerConfig.allow_plaintext_port` asks for a loopback-only one (development only).
2. **Identity = certificate CN.** ``use_identity_as_username`` makes the CN the MQTT username, and
   ``use_username_as_clientid`` makes it the client id too, so no client can choose either.
3. **Each device is confined to its own topics** by ``%u`` pattern lines under
   ``edgefleet/v1/devices/<CN>/`` (see :mod:`shared.protocol` for the layout). The fleet service
   identity reads and writes ``edgefleet/v1/#``; an ``app-<name>`` identity may only send inference
   requests to, and read answers from, the one device it is bound to. Nobody gets ``$SYS/#`` or
   ``$CONTROL/#``.
4. **Packets are bounded** (``max_packet_size``): a client sending a larger packet is disconnected
   before the broker buffers it.

>>> cfg = BrokerConfig(cafile=Path("ca.pem"), certfile=Path("s.pem"), keyfile=Path("s.key"))
>>> "use_username_as_clientid true" in mosquitto_conf(cfg, acl_path=Path("edgefleet.acl"))
True
>>> print(acl_file(apps={"app-viewer": "dev-001"}).splitlines()[-1])
topic read edgefleet/v1/devices/dev-001/infer/response/#

What an ACL **cannot** express in Mosquitto 2.0, and who covers it instead:

- *Retained messages.* A device may publish with the retain flag to its own ``up/`` topics; ACLs
  have no retain bit. Devices never set it (the agent), and nothing the fleet or the agent does
  depends on retained state (:mod:`shared.protocol`).
- *Forbidden subscriptions are granted.* A device subscribing to ``#`` or another device's topics
  gets a SUBACK with the granted QoS; the ACL is applied per message on delivery, so it receives
  nothing. Tests therefore assert "nothing delivered", not "subscription refused".
- *Pattern lines apply to every user.* The fleet and app identities also match the device
  patterns for the name they carry, so ``app-viewer`` could publish under
  ``edgefleet/v1/devices/app-viewer/up/``. Each app gets an explicit ``deny`` for that subtree (a
  user's deny is checked before any pattern grants), and the fleet service must only accept
  device ids it has registered. The CA must issue device CNs matching
  :data:`shared.protocol.DEVICE_ID_PATTERN` only: a CN containing ``/`` would widen its pattern
  into another device's subtree (``dev-002/up/x`` → ``edgefleet/v1/devices/dev-002/up/x/up/#``).
- *CRL freshness.* With ``crlfile`` set, OpenSSL refuses **every** client once the CRL's
  ``nextUpdate`` has passed; re-issue it before then and send the broker SIGHUP.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.protocol import DEVICE_ID_PATTERN, PREFIX

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "FLEET_IDENTITY",
    "BrokerConfig",
    "acl_file",
    "mosquitto_conf",
    "write_broker_config",
]

DEFAULT_MAX_PACKET_SIZE = 1024 * 1024
"""1 MiB: EMQX's default. A fetch frame (one 256 KiB chunk plus its header) fits easily."""

FLEET_IDENTITY = "fleet-svc"
MQTT_MAX_PACKET_SIZE = 268_435_455 + 5  # largest remaining length + fixed header
MOSQUITTO_MIN_PACKET_SIZE = 20  # mosquitto refuses smaller values
ROOT_TOPIC = PREFIX.split("/devices", 1)[0]  # "edgefleet/v1"
_IDENTITY = re.compile(DEVICE_ID_PATTERN)
_TLS_VERSIONS = ("tlsv1.2", "tlsv1.3")
_LOG_TYPES = frozenset(
    {"debug", "error", "warning", "notice", "information", "subscribe", "unsubscribe", "all"}
)


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Settings of the one broker a fleet uses. Paths are as the broker process sees them.

    Attributes:
        cafile: PEM CA certificate(s) that sign device, fleet and app client certificates.
        certfile: The broker's PEM certificate (its SAN must name the host devices dial).
        keyfile: The broker's PEM private key.
        crlfile: PEM CRL of the CA; revoked device certificates are refused at the handshake.
            Strongly recommended: without it a stolen device key works until its certificate
            expires.
        port: TCP port of the TLS listener (8883 is MQTT over TLS).
        bind_address: Address to listen on; None listens on every interface (IPv4 and IPv6).
        require_certificate: Must stay True. It is a field so that the requirement is visible
            and checked: the configuration has no password file, so without client
            certificates the broker would have no way to authenticate anyone.
        tls_version: Lowest TLS version accepted ("tlsv1.2" or "tlsv1.3").
        max_packet_size: Largest MQTT packet (bytes, header included) any client may send.
        persistence_dir: Directory of ``mosquitto.db`` (sessions, queued QoS 1 messages), kept
            across broker restarts; None keeps everything in memory only.
        allow_plaintext_port: A loopback-only listener without TLS, for development and
            simulators. None (the default) means no plaintext listener. See
            :func:`mosquitto_conf` for what it trusts.
        run_as_user: User mosquitto switches to when started as root (its ``user`` option);
            None leaves mosquitto's default ("mosquitto"). The files above must be readable,
            and ``persistence_dir`` writable, by that user.
        log_types: Mosquitto ``log_type`` values; logs go to stderr.
    """

    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path | None = None
    port: int = 8883
    bind_address: str | None = None
    require_certificate: bool = True
    tls_version: str = "tlsv1.2"
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    persistence_dir: Path | None = Path("/var/lib/mosquitto")
    allow_plaintext_port: int | None = None
    run_as_user: str | None = None
    log_types: tuple[str, ...] = ("error", "warning", "notice", "information")

    def __post_init__(self) -> None:
        if not self.require_certificate:
            raise ValueError(
                "require_certificate must be True: identities come from client certificates "
                "and there is no password file, so nothing else could authenticate a client"
            )
        for port in (self.port, self.allow_plaintext_port):
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"port {port} must be within 1..65535")
        if self.allow_plaintext_port == self.port:
            raise ValueError(f"allow_plaintext_port {self.port} must differ from the TLS port")
        if self.tls_version not in _TLS_VERSIONS:
            raise ValueError(f"tls_version {self.tls_version!r} must be one of {_TLS_VERSIONS}")
        if not MOSQUITTO_MIN_PACKET_SIZE <= self.max_packet_size <= MQTT_MAX_PACKET_SIZE:
            raise ValueError(
                f"max_packet_size {self.max_packet_size} must be within "
                f"{MOSQUITTO_MIN_PACKET_SIZE}..{MQTT_MAX_PACKET_SIZE} bytes"
            )
        unknown = set(self.log_types) - _LOG_TYPES
        if unknown or not self.log_types:
            raise ValueError(
                f"log_types {self.log_types} must be a non-empty subset of {_LOG_TYPES}"
            )
        for name in ("cafile", "certfile", "keyfile", "crlfile", "persistence_dir"):
            value = getattr(self, name)
            if value is not None:
                _check_value(name, str(value))
        for name in ("bind_address", "run_as_user"):
            value = getattr(self, name)
            if value is not None:
                _check_value(name, value, allow_spaces=False)


def mosquitto_conf(cfg: BrokerConfig, *, acl_path: Path) -> str:
    """The ``mosquitto.conf`` text for ``cfg``, with every security-relevant line commented.

    Order matters in Mosquitto 2.0: options that belong to a listener (``cafile``,
    ``require_certificate``, ``use_username_as_clientid``...) configure the listener declared
    above them. Placed before any ``listener`` line they configure the implicit *default*
    listener instead, and Mosquitto then also opens plaintext port 1883 on all interfaces (seen
    on 2.0.11). So every listener option here follows its ``listener`` line.

    With :attr:`BrokerConfig.allow_plaintext_port`, a second listener on 127.0.0.1 accepts
    connections without TLS. There is no password file, so that listener **trusts the username a
    local client claims** (``allow_anonymous true`` is what lets a username without a password
    in, observed on 2.0.11): any process on the broker's host can act as any device or as the
    fleet service. The ``%u`` ACL still confines each claimed name to its own topics, and the TLS
    listener is unaffected (every client there has a CN as its username, so "anonymous" never
    applies to it). Use it for simulators on a developer machine, never in production.

    Args:
        cfg: The broker settings.
        acl_path: Where the broker will find the text of :func:`acl_file`. Required: without
            an ``acl_file`` Mosquitto lets every authenticated client read and write every topic.

    Returns:
        The configuration text.
    """
    _check_value("acl_path", str(acl_path))
    lines = [
        "# Generated by fleet.broker_config.mosquitto_conf; do not edit by hand.",
        "",
        "# Security settings (acl_file, allow_anonymous) are global: one policy for every",
        "# listener, so adding a listener cannot silently open a second, weaker door.",
        "per_listener_settings false",
    ]
    if cfg.allow_plaintext_port is None:
        lines += [
            "# No client may connect without an identity. TLS clients always have one (the",
            "# certificate CN), so this refuses only clients of a misconfigured listener.",
            "allow_anonymous false",
        ]
    else:
        lines += [
            "# DEVELOPMENT ONLY (allow_plaintext_port is set): with no password file, this is",
            "# what lets plaintext loopback clients in under the username they claim.",
            "allow_anonymous true",
        ]
    lines += [
        "# Topic permissions: each device only under edgefleet/v1/devices/<its CN>/ (see ACL).",
        f"acl_file {acl_path}",
        "# A client sending a larger packet is disconnected as soon as its header announces the",
        "# size, before the broker buffers it: bounds broker memory per client. MQTT v5 clients",
        "# are told the limit in CONNACK.",
        f"max_packet_size {cfg.max_packet_size}",
        "# Send small packets at once (no Nagle delay): request/response round trips and",
        "# chunk requests otherwise wait ~40 ms for delayed ACKs.",
        "set_tcp_nodelay true",
    ]
    if cfg.persistence_dir is not None:
        lines += [
            "# Sessions and queued QoS 1 messages survive a broker restart.",
            "persistence true",
            f"persistence_location {cfg.persistence_dir}",
        ]
    else:
        lines.append("persistence false")
    if cfg.run_as_user is not None:
        lines += [
            "# When started as root, drop to this user (it must read the keys below).",
            f"user {cfg.run_as_user}",
        ]
    lines += [
        "log_dest stderr",
        *(f"log_type {log_type}" for log_type in cfg.log_types),
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "",
        "# The only listener devices use: MQTT over TLS with a client certificate.",
        f"listener {cfg.port}" + (f" {cfg.bind_address}" if cfg.bind_address else ""),
        f"cafile {cfg.cafile}",
        f"certfile {cfg.certfile}",
        f"keyfile {cfg.keyfile}",
    ]
    if cfg.crlfile is not None:
        lines += [
            "# Revoked certificates fail the handshake. Refresh before the CRL's nextUpdate, or",
            "# every client is refused.",
            f"crlfile {cfg.crlfile}",
        ]
    lines += [
        f"tls_version {cfg.tls_version}",
        "# The handshake fails unless the client presents a certificate signed by cafile.",
        "require_certificate true",
        "# The certificate CN becomes the MQTT username: the identity %u in the ACL.",
        "use_identity_as_username true",
        "# The username (so the CN) replaces whatever client id the client sent. Client ids are",
        "# the broker's session keys and a new connection with an id in use disconnects the old",
        "# one: without this line any device could kick any other off by connecting with its",
        "# id. With it, a certificate can only ever replace its own session.",
        "use_username_as_clientid true",
    ]
    if cfg.allow_plaintext_port is not None:
        lines += [
            "",
            "# DEVELOPMENT ONLY: plaintext, loopback only, trusts the username a client claims.",
            f"listener {cfg.allow_plaintext_port} 127.0.0.1",
            "# A client without a username is refused; a client's id is its claimed username.",
            "use_username_as_clientid true",
        ]
    return "\n".join(lines) + "\n"


def acl_file(fleet_identity: str = FLEET_IDENTITY, apps: Mapping[str, str] | None = None) -> str:
    """The ACL text: devices confined by ``%u`` patterns, the fleet service, bound local apps.

    Device permissions are ``pattern`` lines, so one file serves any number of devices: ``%u``
    is replaced by the connecting client's username, which is its certificate CN. A device can
    therefore reach only ``edgefleet/v1/devices/<its own CN>/...``, and adding a device needs no
    broker change (only a certificate). ``%u`` rather than ``%c``: the certificate, not a
    client-chosen id, is the identity (with ``use_username_as_clientid`` they are equal anyway).

    There are no lines for anonymous clients and no grant on ``$SYS/#`` or ``$CONTROL/#``, so no
    one reads broker internals or drives a control plugin (a ``#`` grant never covers ``$``
    topics in Mosquitto).

    Args:
        fleet_identity: The CN of the fleet service's certificate; it may read and write
            everything under ``edgefleet/v1/``.
        apps: Local application identities, ``{"app-<name>": "<device id>"}``: each may publish
            inference requests to that device and read its inference responses, nothing else.

    Returns:
        The ACL text.

    Raises:
        ValueError: An identity or device id does not match
            :data:`shared.protocol.DEVICE_ID_PATTERN`, or an app name lacks the ``app-`` prefix.
    """
    _check_identity("fleet_identity", fleet_identity)
    device = f"{PREFIX}/%u"
    lines = [
        "# Generated by fleet.broker_config.acl_file; do not edit by hand.",
        "# Pattern lines apply to every client; %u is its username = its certificate CN.",
        "",
        "# A device publishes its reports and its answers to local apps...",
        f"pattern write {device}/up/#",
        f"pattern write {device}/infer/response/#",
        "# ...and receives commands, fetch responses and inference requests, for itself only.",
        f"pattern read {device}/down/#",
        f"pattern read {device}/infer/request",
        "",
        "# The fleet service reads every device's up/ and writes every device's down/.",
        f"user {fleet_identity}",
        f"topic readwrite {ROOT_TOPIC}/#",
    ]
    for app, device_id in sorted((apps or {}).items()):
        _check_identity("app identity", app)
        _check_identity("device id", device_id)
        if not app.startswith("app-"):
            raise ValueError(f"app identity {app!r} must start with 'app-'")
        if app == fleet_identity:
            raise ValueError(f"app identity {app!r} must differ from the fleet identity")
        lines += [
            "",
            f"# Local application bound to device {device_id}.",
            f"user {app}",
            "# Not a device: the device patterns above must not apply to its own name.",
            f"topic deny {PREFIX}/{app}/#",
            f"topic write {PREFIX}/{device_id}/infer/request",
            f"topic read {PREFIX}/{device_id}/infer/response/#",
        ]
    return "\n".join(lines) + "\n"


def write_broker_config(
    out_dir: Path,
    cfg: BrokerConfig,
    *,
    fleet_identity: str = FLEET_IDENTITY,
    apps: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``mosquitto.conf`` and ``edgefleet.acl`` into ``out_dir`` (atomically, mode 0644).

    The configuration refers to the ACL by its absolute path. Neither file holds a secret.
    ``cfg.persistence_dir`` is not created here: it belongs to the broker's user.

    Returns:
        ``{"conf": <mosquitto.conf path>, "acl": <ACL path>}``.
    """
    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    acl_path = out_dir / "edgefleet.acl"
    conf_path = out_dir / "mosquitto.conf"
    acl_text = acl_file(fleet_identity, apps)
    conf_text = mosquitto_conf(cfg, acl_path=acl_path)
    _write_atomically(acl_path, acl_text)
    _write_atomically(conf_path, conf_text)
    return {"conf": conf_path, "acl": acl_path}


def _check_identity(what: str, value: str) -> None:
    if not _IDENTITY.match(value):
        raise ValueError(f"{what} {value[:80]!r} must match {DEVICE_ID_PATTERN}")


def _check_value(what: str, value: str, *, allow_spaces: bool = True) -> None:
    """Refuse values that would change the meaning of a config line (injection, truncation)."""
    bad = "\n\r\0" if allow_spaces else "\n\r\0 \t"
    if not value or value != value.strip() or any(c in value for c in bad):
        raise ValueError(
            f"{what} {value[:80]!r} must be non-empty, without surrounding whitespace or "
            "line breaks" + ("" if allow_spaces else " or spaces")
        )


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
