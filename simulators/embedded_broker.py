"""An MQTT broker in Python, for ``edgefleet demo`` on a machine without Mosquitto.

It runs `amqtt <https://github.com/Yakifo/amqtt>`_ (MQTT 3.1.1 on asyncio) in a process of its
own, started and stopped by :func:`simulators.demo.run_broker`::

    python -m simulators.embedded_broker --port 18883 --cafile ca.pem \\
        --certfile server.pem --keyfile server-key.pem

It keeps the rules of :mod:`fleet.broker_config` where amqtt lets it:

1. **One TLS listener, on 127.0.0.1 only**, with a server certificate from the fleet CA.
2. **The handshake fails without a client certificate signed by the fleet CA.** amqtt asks for
   one but lets a client without one through; :class:`_Broker` requires it.
3. **Identity = certificate CN**, which must match the protocol's device id pattern
   (:class:`CertificateIdentity`, at CONNECT).
4. **The client id must be the CN.** Mosquitto replaces the client id with the CN; here a
   different id is refused. The fleet service's replicas connect as ``fleet-svc-<suffix>``: the
   fleet identity may use that prefix.
5. **Each device is confined to its own topics** (:func:`permitted`, the same rules as
   :func:`fleet.broker_config.acl_file`), and so is its last will; the fleet identity reads and
   writes everything under ``edgefleet/v1/``.

What it lacks against Mosquitto: MQTT 5, and with it shared subscriptions (the fleet service
subscribes without ``$share`` when it speaks MQTT 3.1.1); a packet size limit; sessions and queued
messages that survive a restart (they live in memory). And amqtt checks a client's credentials
only after it has taken over the session of the client id it sent: a client refused under
rule 4 still disconnects the device whose id it used (the device reconnects). Only holders of a
fleet CA certificate on this machine can do that. Use it for the demo, not for a fleet.

>>> permitted("dev-001", "edgefleet/v1/devices/dev-001/up/state", "publish")
True
>>> permitted("dev-001", "edgefleet/v1/devices/dev-002/down/#", "subscribe")
False
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import ssl
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin
from amqtt.session import Session

from fleet.broker_config import FLEET_IDENTITY, ROOT_TOPIC
from shared.protocol import DEVICE_ID_PATTERN, PREFIX

__all__ = ["CertificateIdentity", "DeviceTopics", "broker_config", "main", "permitted"]

IDENTITY_ATTRIBUTE = "edgefleet.identity"  # the session attribute holding the certificate CN
_CN = re.compile(DEVICE_ID_PATTERN)
# What a device may do under its own subtree: the patterns of fleet.broker_config.acl_file.
DEVICE_WRITE = ("up/#", "infer/response/#")
DEVICE_READ = ("down/#", "infer/request")
KEEPALIVE_GRACE_S = 15  # beyond a client's keep-alive before the broker drops it (agents: 30 s)
_MODULE = __spec__.name if __spec__ else __name__  # amqtt loads the plugins by dotted path
logger = logging.getLogger(_MODULE)  # one name, also when run as __main__


def permitted(identity: str, topic: str, action: str) -> bool:
    """Whether ``identity`` (a certificate CN) may ``action`` on ``topic`` (a name or filter).

    Args:
        identity: The client's certificate CN.
        topic: A topic name (publish, receive) or filter (subscribe).
        action: ``"publish"``, ``"subscribe"`` or ``"receive"`` (amqtt's ``Action`` values).

    Returns:
        True for the fleet identity under ``edgefleet/v1/``, and for a device writing its
        ``up/`` and ``infer/response/`` topics or reading its ``down/`` and ``infer/request``
        topics; False otherwise.
    """
    if identity == FLEET_IDENTITY:
        return bool(TopicAccessControlListPlugin.topic_ac(topic, f"{ROOT_TOPIC}/#"))
    suffixes = DEVICE_WRITE if action == "publish" else DEVICE_READ
    return any(
        TopicAccessControlListPlugin.topic_ac(topic, f"{PREFIX}/{identity}/{suffix}")
        for suffix in suffixes
    )


def _certificate_cn(ssl_object: ssl.SSLObject | None) -> str | None:
    """The CN of the client's verified certificate, or None if it presented none."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    subject: Any = cert.get("subject", ())  # ((("commonName", "dev-001"),), ...)
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class CertificateIdentity(BaseAuthPlugin):  # type: ignore[misc]  # amqtt has no py.typed
    """Let in only clients with a fleet CA certificate whose CN is their client id."""

    async def authenticate(self, *, session: Session) -> bool | None:
        cn = _certificate_cn(session.ssl_object)
        client_id = session.client_id or ""
        if cn is None or not _CN.match(cn):
            logger.warning("refusing %s: no client certificate with a valid CN", client_id)
            return False
        if client_id != cn and not (
            cn == FLEET_IDENTITY and client_id.startswith(f"{FLEET_IDENTITY}-")
        ):
            logger.warning("refusing client id %r: its certificate names %r", client_id, cn)
            return False
        if session.will_flag and not permitted(cn, session.will_topic or "", "publish"):
            logger.warning("refusing %s: last will on %r is not its topic", cn, session.will_topic)
            return False
        session.attributes[IDENTITY_ATTRIBUTE] = cn
        return True


class DeviceTopics(BaseTopicPlugin):  # type: ignore[misc]
    """Confine each identity to its topics (:func:`permitted`) on every publish and delivery."""

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Any = None,
    ) -> bool | None:
        identity = session.attributes.get(IDENTITY_ATTRIBUTE) if session is not None else None
        if identity is None or topic is None or action is None:
            return False
        allowed = permitted(identity, topic, str(action))
        if not allowed:
            logger.info("%s may not %s %s", identity, action, topic)
        return allowed


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker with client certificates required and checked per connection, and
    session take-over that keeps the session connected.

    The overrides touch amqtt internals (pinned to 0.12 in pyproject.toml).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._superseded: set[Any] = set()  # handlers of connections taken over by a newer one

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        context: ssl.SSLContext = Broker._create_ssl_context(listener)
        context.verify_mode = ssl.CERT_REQUIRED  # amqtt's is CERT_OPTIONAL
        return context

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Session]:
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port
        )
        # A resumed session keeps the TLS object of the connection that opened it: check the
        # certificate of this connection, not that one.
        session.ssl_object = writer.get_ssl_info()
        current = self._sessions.get(session.client_id or "")
        if current is not None and current[0] is session and session.transitions.is_connected():
            # amqtt is about to take the session over from its old connection, whose end would
            # then mark the session disconnected (and queue its messages) under the new one.
            self._superseded.add(current[1])
        return handler, session

    async def _handle_disconnect(
        self, client_session: Session, handler: Any, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        if handler in self._superseded:  # taken over: the session goes on, without a last will
            self._superseded.discard(handler)
            await self._stop_handler(handler)
            return
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)


def broker_config(*, port: int, cafile: Path, certfile: Path, keyfile: Path) -> dict[str, Any]:
    """The amqtt configuration: one TLS listener on 127.0.0.1:``port``, edgefleet's plugins."""
    return {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"127.0.0.1:{port}",
                "ssl": True,
                "cafile": str(cafile),
                "certfile": str(certfile),
                "keyfile": str(keyfile),
            }
        },
        "timeout_disconnect_delay": KEEPALIVE_GRACE_S,
        # Only these: no anonymous access, no $SYS topics, no per-packet logging.
        "plugins": {
            f"{_MODULE}.CertificateIdentity": {},
            f"{_MODULE}.DeviceTopics": {},
        },
    }


async def serve(config: dict[str, Any]) -> None:
    """Run the broker until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    broker = _Broker(config)
    await broker.start()
    logger.info("listening on %s", config["listeners"]["default"]["bind"])
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.embedded_broker",
        description="The demo's MQTT 3.1.1 broker: TLS with client certificates, device ACLs.",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--cafile", type=Path, required=True, help="the fleet CA (PEM)")
    parser.add_argument("--certfile", type=Path, required=True, help="server certificate (PEM)")
    parser.add_argument("--keyfile", type=Path, required=True, help="server key (PEM)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    config = broker_config(
        port=args.port, cafile=args.cafile, certfile=args.certfile, keyfile=args.keyfile
    )
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
