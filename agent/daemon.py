"""The agent daemon: wires the MQTT link, the deployer, the model store and inference together.

Threads, and what each may touch:

- paho's network thread (inside :class:`~shared.mqtt.MqttLink`): only enqueues events, and the
  payloads of fetch frames straight onto the in-process fetch client's queue;
- the **dispatcher** reads link events and routes them: fetch frames to an isolated deployment,
  commands to the worker queue, inference requests to the inference queue; on (re)connect it
  announces presence, reports state and drains the outbox;
- the **worker** runs one deployment at a time (single flight: queued orders for the same model
  are coalesced, the newest wins), then probation, commit or rollback. On a real device each
  deployment runs in a child process the worker waits for (:mod:`agent.isolation`), so that the
  idle daemon does not keep the trust stack and the deployment's memory;
- the **inference** thread answers ``infer/request`` with the active model of each name.

A deployment interrupted by a restart (a power cut, a crash) resumes at the next start: its order
is kept in ``pending-order.json`` until the deployment ends, and the chunks already verified are
not fetched again.

Active models live in a dict replaced as a whole, so a request sees either the old model or the
new one, never a gap: the new model is loaded before it is swapped in, and the old one is closed
after.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.config import AgentSettings
from agent.health import Health, HealthSampler
from agent.isolation import IsolatedDeployer
from agent.messages import (
    Command,
    InferRequest,
    InferRequestError,
    ModelState,
    Phase,
    encode_event,
    encode_infer_response,
    encode_presence,
    encode_state,
    encode_telemetry,
    parse_command,
    parse_infer_request,
)
from agent.outbox import Outbox
from agent.platform import DevicePlatform
from agent.serving import ActiveModel, DeploymentError, Runtimes
from agent.store import ModelStore, write_atomic
from agent.trim import release_free_memory
from shared.errors import EdgefleetError
from shared.mqtt import Connected, Disconnected, Message, MqttLink, MqttSettings
from shared.topics import (
    DOWN_CMD,
    DOWN_FETCH,
    INFER_REQUEST,
    INFER_RESPONSE,
    UP_EVENTS,
    UP_PRESENCE,
    UP_STATE,
    UP_TELEMETRY,
    ProtocolError,
    device_topic,
)

if TYPE_CHECKING:
    from agent.fetch import FetchClient
    from agent.updater import Deployer

__all__ = ["Agent"]

logger = logging.getLogger(__name__)
AGENT_VERSION = "0.1.0"
IDLE_WAKE_S = 30.0  # with no probation to watch, the worker wakes this often if nothing comes


PERCENTILES = (50, 95, 99)  # latency percentiles reported per model


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """The ``qs`` percentiles of ``values`` (not empty), interpolated linearly between the two
    nearest ranks like ``numpy.percentile``'s default; one sort for all of them, without that
    function's per-call overhead (a report every few seconds, a thousand agents per simulation).
    """
    ordered = np.sort(np.fromiter(values, float, count=len(values)))
    position = np.asarray(qs, dtype=float) / 100.0 * (len(ordered) - 1)
    below = position.astype(np.intp)  # positions are >= 0: truncation is floor
    above = np.minimum(below + 1, len(ordered) - 1)
    low = ordered[below]
    return [float(v) for v in low + (ordered[above] - low) * (position - below)]


class _Metrics:
    """One model version's request counters and a bounded window of latencies for percentiles.

    Started afresh when another version becomes active, so that a report never mixes the
    latencies of two versions (the fleet's latency gate compares versions).
    """

    def __init__(self, version: str) -> None:
        self.version = version
        self.requests = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=2048)

    def summary(self) -> dict[str, Any]:
        pct = {}
        if self.latencies:  # one pass over the window for the three percentiles
            values = percentiles(self.latencies, PERCENTILES)
            pct = {f"p{q}": v for q, v in zip(PERCENTILES, values, strict=True)}
        return {
            "version": self.version,
            "requests": self.requests,
            "errors": self.errors,
            "latency_ms": pct,
        }


class Agent:
    """One device's agent. :meth:`run` blocks until :meth:`stop`."""

    def __init__(self, settings: AgentSettings, platform: DevicePlatform | None = None) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.store = ModelStore(settings.data_dir)
        for note in self.store.recover():
            logger.warning("%s: recovered after an interrupted run: %s", self.device_id, note)
        self.platform = platform or DevicePlatform.detect()
        self.inventory = self.platform.inventory
        self.health = self._make_health(settings)
        self.outbox = Outbox(settings.data_dir / "outbox", max_records=settings.outbox_max_records)
        self.link = self._make_link(settings)
        self.client: FetchClient | None = None  # deployments on the worker thread only
        self.hardware_class = settings.hardware_id or self.inventory.hardware_class()
        self.runtimes = Runtimes(settings, self.store, self.platform)
        self.deployer = self._make_deployer()
        self.models: dict[str, ActiveModel] = {}
        self.metrics: dict[str, _Metrics] = {}
        # None in a queue wakes its thread to stop (the threads block: an idle agent never polls).
        self.commands: queue.Queue[Command | None] = queue.Queue()
        self.inference: queue.Queue[Message | None] = queue.Queue()
        self._stop = threading.Event()
        self._seq = int(time.time() * 1000)
        self._seq_lock = threading.Lock()
        self._probation_path = settings.data_dir / "probation.json"
        self._pending_path = settings.data_dir / "pending-order.json"
        write_atomic(
            settings.data_dir / "identity.json",
            json.dumps(
                {
                    "device_id": self.device_id,
                    "hardware_class": self.hardware_class,
                }
            ).encode(),
        )

    def _make_health(self, settings: AgentSettings) -> Health:
        return HealthSampler(settings.data_dir, self.platform.health_root)

    def _make_link(self, settings: AgentSettings) -> MqttLink:
        """The device's MQTT connection (simulators override this to inject network faults)."""
        presence = device_topic(self.device_id, UP_PRESENCE)
        return MqttLink(
            MqttSettings(
                url=settings.broker,
                client_id=self.device_id,
                username=settings.username,
                password=settings.password,
                ca_file=str(settings.ca_file) if settings.ca_file else None,
                cert_file=str(settings.cert_file) if settings.cert_file else None,
                key_file=str(settings.key_file) if settings.key_file else None,
                protocol=settings.mqtt_protocol,
                will_topic=presence,
                will_payload=encode_presence(online=False),
            ),
            subscriptions=[
                (device_topic(self.device_id, "down/#"), 1),
                (device_topic(self.device_id, INFER_REQUEST), 1),
            ],
        )

    def _make_deployer(self) -> IsolatedDeployer | Deployer:
        """Deployments in a child process on a real device, else on the worker thread."""
        if self.platform.isolate_deployments:
            return IsolatedDeployer(
                self.settings,
                self.store,
                self.platform,
                runtimes=self.runtimes,
                publish=self.link.publish,
                connected=self.link.connected,
                emit=self._emit,
            )
        from agent.fetch import FetchClient  # the protocol's pydantic models
        from agent.updater import Deployer  # the trust stack

        self.client = FetchClient(
            self.link, self.device_id, timeout_s=self.settings.request_timeout_s
        )
        # Chunk frames go from paho's thread straight to the deployment's queue.
        self.link.route(device_topic(self.device_id, DOWN_FETCH), self.client.frames)
        return Deployer(self.settings, self.store, self.client, self.platform, self._emit)

    def _set_models(self, models: dict[str, ActiveModel]) -> None:
        """Swap the served models in one assignment and record their runtimes for ``status``."""
        self.models = models
        runtimes = {
            n: (m.runner.active.key if m.runner.active else None) for n, m in models.items()
        }
        write_atomic(self.settings.data_dir / "runtime.json", json.dumps(runtimes).encode())

    # -- reporting -----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        with self._seq_lock:
            self._seq = max(self._seq + 1, int(time.time() * 1000))
            return self._seq

    def _report(self, suffix: str, payload: bytes) -> None:
        """Journal first, then try to send everything journalled (nothing is lost offline)."""
        self.outbox.put(device_topic(self.device_id, suffix), payload)
        self.outbox.drain(self.link.publish_confirmed)

    def _emit(self, phase: Phase, model: str, version: str, **fields: Any) -> None:
        event = encode_event(
            device_id=self.device_id,
            seq=self._next_seq(),
            time=datetime.now(UTC),
            model=model,
            version=version,
            phase=phase,
            **fields,
        )
        logger.info("%s %s %s %s", model, version, phase, fields.get("detail", ""))
        self._report(UP_EVENTS, event)

    def state(self) -> bytes:
        """The ``up/state`` payload: every installed model, its version, runtime and state."""
        models = {}
        for name in self.store.models():
            active = self.models.get(name)
            runner = active.runner.active if active else None
            version = self.store.current(name)
            models[name] = ModelState(
                version=version,
                runtime=runner.key if runner else None,
                previous_version=self.store.previous(name),
                state="probation"
                if self._probation().get("model") == name
                else ("active" if version else "none"),
                counter=self.store.state.counters.get(name, {}).get(version or "", None),
                rollback_floor=self.store.floor(name),
            )
        return encode_state(
            device_id=self.device_id,
            seq=self._next_seq(),
            time=datetime.now(UTC),
            hardware_class=self.hardware_class,
            models=models,
            inventory=self.inventory.to_dict(),
        )

    def report_state(self) -> None:
        self._report(UP_STATE, self.state())

    def report_telemetry(self) -> None:
        telemetry = encode_telemetry(
            device_id=self.device_id,
            seq=self._next_seq(),
            time=datetime.now(UTC),
            health=self.health.sample(),
            dropped=self.outbox.dropped,
            models={n: m.summary() for n, m in list(self.metrics.items())},
        )
        # Sent at once when the journal is empty (Outbox.offer: what that can lose, and why).
        self.outbox.offer(
            device_topic(self.device_id, UP_TELEMETRY), telemetry, self.link.publish_confirmed
        )

    # -- start-up ------------------------------------------------------------------------------

    def _probation(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._probation_path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def _load_installed(self) -> None:
        """Serve every model's current version; count a restart during probation."""
        probation = self._probation()
        if probation and self.store.current(probation["model"]) != probation["version"]:
            self._probation_path.unlink(missing_ok=True)  # the switch was undone by recovery
            probation = {}
        if probation:
            probation["boots"] = int(probation.get("boots", 0)) + 1
            write_atomic(self._probation_path, json.dumps(probation).encode())
            if probation["boots"] > self.settings.max_crash_restarts:
                self._rollback(
                    probation["model"],
                    f"crash loop: {probation['boots']} restarts during probation",
                    failure_class="crash_loop",
                )
        for name in self.store.models():
            version = self.store.current(name)
            if version is None:
                continue
            problem = self.store.check_integrity(name, version)
            if problem is not None:  # on-disk corruption: fall back to the previous version
                self._rollback(
                    name, f"installed files damaged: {problem}", failure_class="corruption"
                )
                version = self.store.current(name)
                if version is None:
                    continue
            try:
                manifest = self.store.installed(name, version)
                decision = self.runtimes.decision_for(name, version)
                self._set_models({**self.models, name: self.runtimes.load(manifest, decision)})
            except EdgefleetError as e:
                logger.error("cannot serve %s %s: %s", name, version, e)

    # -- threads -------------------------------------------------------------------------------

    def run(self, heartbeat: Callable[[], None] | None = None) -> None:
        """Start everything and block until :meth:`stop` (SIGTERM in the CLI).

        ``heartbeat`` is called from the main loop every half second (systemd's watchdog).
        """
        self._load_installed()
        self._resume_interrupted_deployment()
        self.link.start()
        workers = [
            threading.Thread(target=f, name=n, daemon=True)
            for f, n in (
                (self._dispatch, f"edgefleet-dispatch-{self.device_id}"),
                (self._work, f"edgefleet-worker-{self.device_id}"),
                (self._serve_inference, f"edgefleet-infer-{self.device_id}"),
            )
        ]
        for worker in workers:
            worker.start()
        next_telemetry = time.monotonic() + self.settings.telemetry_interval_s
        while not self._stop.wait(
            0.5 if heartbeat is not None else max(0.0, next_telemetry - time.monotonic())
        ):
            if heartbeat is not None:
                heartbeat()
            if time.monotonic() >= next_telemetry:
                self.report_telemetry()
                next_telemetry = time.monotonic() + self.settings.telemetry_interval_s
        # A clean disconnect suppresses the last will: say we are going offline ourselves.
        self.link.publish_confirmed(
            device_topic(self.device_id, UP_PRESENCE),
            encode_presence(online=False),
            timeout_s=2.0,
        )
        self.link.stop()
        if isinstance(self.deployer, IsolatedDeployer):
            self.deployer.kill()
        for active in self.models.values():
            active.runner.close()

    def stop(self) -> None:
        self._stop.set()
        self.commands.put(None)
        self.inference.put(None)
        self.link.events.put(Disconnected(reason="the agent is stopping", retry_in_s=0.0))

    def _dispatch(self) -> None:
        fetch = device_topic(self.device_id, DOWN_FETCH)
        cmd = device_topic(self.device_id, DOWN_CMD)
        infer = device_topic(self.device_id, INFER_REQUEST)
        while True:
            event = self.link.events.get()
            if self._stop.is_set():
                return
            if isinstance(self.deployer, IsolatedDeployer) and not isinstance(event, Message):
                self.deployer.set_connected(isinstance(event, Connected))
            if isinstance(event, Connected):
                self.link.publish(
                    device_topic(self.device_id, UP_PRESENCE),
                    encode_presence(online=True, agent_version=AGENT_VERSION),
                )
                self.report_state()
            elif isinstance(event, Disconnected):
                logger.info("broker connection lost (%s)", event.reason)
            elif event.topic == fetch:
                if isinstance(self.deployer, IsolatedDeployer):
                    self.deployer.deliver(event.payload)
                elif self.client is not None:
                    self.client.deliver(event.payload)
            elif event.topic == cmd:
                try:
                    self.commands.put(parse_command(event.payload))
                except ProtocolError as e:
                    logger.warning("ignoring a malformed command: %s", e)
            elif event.topic == infer:
                self.inference.put(event)

    def _work(self) -> None:
        """The only thread that changes the model store: deployments, commits, rollbacks."""
        while not self._stop.is_set():
            self._check_probation()
            watching = self._probation_path.exists()  # probation ends by time: wake to check
            try:
                command = self.commands.get(timeout=0.5 if watching else IDLE_WAKE_S)
            except queue.Empty:
                continue
            # Single flight: take everything queued and keep the newest deploy order.
            batch = [command]
            while not self.commands.empty():
                batch.append(self.commands.get_nowait())
            if None in batch:
                return
            received = [c for c in batch if c is not None]
            deploys = [c for c in received if c.type == "deploy" and c.order]
            if deploys:
                order = deploys[-1].order or ""
                # Kept until the deployment ends, however it ends: a restart (power cut) resumes it.
                write_atomic(
                    self._pending_path,
                    json.dumps(
                        {"order": order, "sequence_before": self.store.state.order_sequence}
                    ).encode(),
                )
                try:
                    self._deploy(order)
                except Exception:  # the worker must outlive any bug: report, keep serving
                    logger.exception("deployment crashed")
                    self._emit(
                        "failed",
                        "?",
                        "?",
                        failure_class="internal",
                        detail="the agent hit an internal error; see its log",
                    )
                self._pending_path.unlink(missing_ok=True)
            if any(c.type in ("check", "report") for c in received):
                self.report_state()
            if deploys and isinstance(self.deployer, IsolatedDeployer):
                release_free_memory()  # a device's own process: return the freed heap

    def _resume_interrupted_deployment(self) -> None:
        """Queue again the order whose deployment a restart interrupted (before any thread runs).

        Its sequence number was recorded when it was accepted, so the record goes back to what
        it was before: the same signed order is verified again (signature, expiry, device) and
        resumes from the chunks already downloaded and verified.
        """
        try:
            pending = json.loads(self._pending_path.read_text())
            order, before = str(pending["order"]), int(pending["sequence_before"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        logger.warning("%s: resuming the deployment a restart interrupted", self.device_id)
        if self.store.state.order_sequence > before:
            self.store.state.order_sequence = before
            self.store.save_state()
        self.commands.put(
            Command(id="resume", type="deploy", issued_at=datetime.now(UTC), order=order)
        )

    def _deploy(self, order: str) -> None:
        try:
            ready = self.deployer.deploy(order)
        except DeploymentError as e:
            if e.failure_class == "self_test" and e.model != "?":
                self.store.mark_failed(e.model, e.version)
            self._emit_failure(e.model, e.version, e)
            self.report_state()
            return
        manifest, decision = ready.manifest, ready.decision
        name, version = manifest.name, manifest.version
        if self.store.current(name) == version:
            self._emit("activated", name, version, detail="already active")
            self.report_state()
            return
        try:
            new = self.runtimes.load(manifest, decision)
        except DeploymentError as e:
            self._emit_failure(name, version, e)
            return
        old = self.models.get(name)
        # Probation is recorded before the switch: a crash in between still ends in probation
        # for whatever version recovery leaves current (see _load_installed).
        write_atomic(
            self._probation_path,
            json.dumps(
                {
                    "model": name,
                    "version": version,
                    "started": time.time(),
                    "boots": 0,
                    "rollback_floor": ready.rollback_floor,
                }
            ).encode(),
        )
        self.store.activate(name, version)
        self._set_models({**self.models, name: new})
        if old is not None:
            old.runner.close()
        self._emit(
            "activated",
            name,
            version,
            detail=f"runtime {decision.selected.candidate.key}",
            metrics={"p50_ms": decision.selected.measurement.p50_ms or 0.0},
        )
        self.report_state()

    def _emit_failure(self, model: str, version: str, error: DeploymentError) -> None:
        self._emit(
            "failed", model, version, failure_class=error.failure_class, detail=str(error)[:4000]
        )

    def _check_probation(self) -> None:
        probation = self._probation()
        if not probation:
            return
        name, version = probation["model"], probation["version"]
        active = self.models.get(name)
        if active is not None and active.version == version and active.runner.failures:
            self._rollback(
                name,
                "errors during probation: " + active.runner.failures[-1],
                failure_class="probation",
            )
            return
        if time.time() - float(probation["started"]) >= self.settings.probation_s:
            self.store.commit(name, version, rollback_floor=int(probation["rollback_floor"]))
            self._probation_path.unlink(missing_ok=True)
            self._emit("committed", name, version)
            self.report_state()

    def _rollback(self, name: str, reason: str, *, failure_class: str) -> None:
        bad = self.store.current(name) or "?"
        back = self.store.rollback(name, reason=reason)
        self._probation_path.unlink(missing_ok=True)
        old = self.models.get(name)
        if back is not None:
            try:
                manifest = self.store.installed(name, back)
                loaded = self.runtimes.load(manifest, self.runtimes.decision_for(name, back))
                self._set_models({**self.models, name: loaded})
            except EdgefleetError as e:
                logger.error("cannot serve %s %s after rollback: %s", name, back, e)
        else:
            self._set_models({k: v for k, v in self.models.items() if k != name})
        if old is not None and old.version == bad:
            old.runner.close()
        self._emit("rolled_back", name, bad, failure_class=failure_class, detail=reason)
        self.report_state()

    # -- inference -----------------------------------------------------------------------------

    def infer(self, name: str, inputs: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
        """The Python API: run the active version of ``name``; returns (version, outputs)."""
        active = self.models.get(name)
        if active is None:
            raise EdgefleetError(f"no model {name!r} is active on this device", check="no-model")
        metrics = self.metrics.get(name)
        if metrics is None or metrics.version != active.version:
            metrics = self.metrics[name] = _Metrics(active.version)
        metrics.requests += 1
        started = time.perf_counter()
        try:
            outputs = active.runner.infer(inputs)
        except Exception:
            metrics.errors += 1
            raise
        metrics.latencies.append((time.perf_counter() - started) * 1000)
        return active.version, outputs

    def _serve_inference(self) -> None:
        while True:
            message = self.inference.get()
            if message is None or self._stop.is_set():
                return
            try:
                self._answer(message)
            except Exception:  # the inference thread must outlive any bug: log, keep serving
                logger.exception("inference request on %s failed unanswered", message.topic)

    def _answer(self, message: Message) -> None:
        """Answer one ``infer/request`` in its encoding: the outputs, or an error response."""
        try:
            request: InferRequest = parse_infer_request(message.payload)
        except InferRequestError as e:  # identified, so answerable: its tensors are refused
            self._reply(e.request, self._error_response(e.request, e))
            return
        except ProtocolError as e:
            logger.warning("ignoring a malformed inference request: %s", e)
            return
        started = time.perf_counter()
        response: bytes | None
        try:
            active = self.models.get(request.model)
            if active is None:
                raise EdgefleetError(f"no model {request.model!r} is active on this device")
            feeds = active.feeds(request.inputs, binary=request.binary)
            version, outputs = self.infer(request.model, feeds)
            response = encode_infer_response(
                correlation_id=request.correlation_id,
                model=request.model,
                ok=True,
                version=version,
                outputs=outputs,
                latency_ms=(time.perf_counter() - started) * 1000,
                binary=request.binary,
            )
        except Exception as e:  # every failure becomes an error response, never silence
            response = self._error_response(request, e)
        self._reply(request, response)

    def _error_response(self, request: InferRequest, error: Exception) -> bytes | None:
        """The error response to ``request``; None if even that cannot be written."""
        try:
            return encode_infer_response(
                correlation_id=request.correlation_id,
                model=request.model,
                ok=False,
                error=str(error)[:1000],
                binary=request.binary,
            )
        except ValueError as e:  # e.g. a model name too long for a binary answer's header
            logger.warning("cannot answer inference request %.128s: %s", request.correlation_id, e)
            return None

    def _reply(self, request: InferRequest, response: bytes | None) -> None:
        if response is None:
            return
        app = request.reply_to or "default"
        self.link.publish(device_topic(self.device_id, f"{INFER_RESPONSE}/{app}"), response)
