"""The Python API for applications on (or near) a device: inference through the agent.

In the agent's own process, call :meth:`agent.daemon.Agent.infer`. From another process, use
:class:`InferenceClient`, which speaks the MQTT request/response protocol with correlation ids
(``infer/request`` -> ``infer/response/<app_id>``) on the fleet broker or one on the device::

    client = InferenceClient(MqttSettings(url="mqtt://127.0.0.1:1883", client_id="app-viewer"),
                             device_id="dev-001", app_id="app-viewer")
    version, outputs = client.infer("cnn", {"input": x})

Tensors travel as raw bytes by default (the binary encoding, :mod:`shared.tensors`): send arrays
of the dtypes and shapes the model declares, which the agent uses as they arrive and checks
exactly. ``encoding="json"`` sends nested lists instead, the form that simple apps and
``mosquitto_pub`` use, which the agent converts to the model's dtypes (slower: decimal text to
build and to parse).
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Mapping
from typing import Literal

import numpy as np

from shared.errors import EdgefleetError
from shared.mqtt import Message, MqttLink, MqttSettings
from shared.protocol import (
    INFER_REQUEST,
    INFER_RESPONSE,
    InferRequest,
    InferResponse,
    ProtocolError,
    device_topic,
    parse_payload,
)
from shared.tensors import encode_tensor_message

__all__ = ["Encoding", "InferenceClient", "InferenceError", "encode_request", "response_outputs"]

Encoding = Literal["binary", "json"]


class InferenceError(EdgefleetError):
    """The agent answered with an error, or did not answer in time."""

    default_check = "inference"


class InferenceClient:
    """Request inference from a device's agent over MQTT. One request at a time per client.

    ``encoding`` is how requests carry their tensors (``binary`` raw bytes, or ``json`` nested
    lists); the agent answers in the same encoding.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        device_id: str,
        app_id: str,
        timeout_s: float = 10.0,
        encoding: Encoding = "binary",
    ) -> None:
        if encoding not in ("binary", "json"):
            raise ValueError(f"encoding must be 'binary' or 'json', got {encoding!r}")
        self.device_id = device_id
        self.app_id = app_id
        self.timeout_s = timeout_s
        self.encoding = encoding
        self._responses = device_topic(device_id, f"{INFER_RESPONSE}/{app_id}")
        self._link = MqttLink(settings, subscriptions=[(self._responses, 1)])
        self._link.start()
        if not self._link.wait_connected(timeout_s):
            self._link.stop()
            raise InferenceError(f"cannot connect to {settings.url} within {timeout_s:g} s")

    def infer(
        self, model: str, inputs: Mapping[str, np.ndarray]
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Run ``model`` on ``inputs`` (one input or a batch); return (version, outputs).

        Outputs are arrays of the dtypes the model produced (binary), or float32 (JSON).

        Raises:
            InferenceError: the agent refused (the message says why) or timed out.
            ValueError: (binary) an input of a dtype that cannot travel as bytes, or a request
                over the payload limit.
        """
        correlation = uuid.uuid4().hex
        topic = device_topic(self.device_id, INFER_REQUEST)
        payload = encode_request(
            correlation_id=correlation,
            model=model,
            reply_to=self.app_id,
            inputs=inputs,
            encoding=self.encoding,
        )
        if not self._link.publish(topic, payload):
            raise InferenceError("not connected to the broker")
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._link.events.get(timeout=left)
            except queue.Empty:
                break
            if not isinstance(event, Message) or event.topic != self._responses:
                continue
            try:
                response = parse_payload(InferResponse, event.payload, what="inference response")
            except ProtocolError:
                continue
            if response.correlation_id != correlation:
                continue  # a late answer to an earlier request
            if not response.ok:
                raise InferenceError(f"{model}: {response.error}")
            return response.version or "?", response_outputs(response)
        raise InferenceError(
            f"{model}: no answer from {self.device_id} within {self.timeout_s:g} s"
        )

    def close(self) -> None:
        self._link.stop()


def encode_request(
    *,
    correlation_id: str,
    model: str,
    reply_to: str,
    inputs: Mapping[str, np.ndarray],
    encoding: Encoding = "binary",
) -> bytes:
    """An ``infer/request`` payload: raw tensors behind a JSON header, or JSON nested lists.

    The fields are checked by the protocol's model (:class:`shared.protocol.InferRequest`).
    """
    if encoding == "binary":
        request = InferRequest(
            correlation_id=correlation_id, model=model, reply_to=reply_to, inputs=dict(inputs)
        )
        fields = request.model_dump(exclude={"inputs"}, exclude_none=True)
        return encode_tensor_message(fields, "inputs", request.inputs)
    request = InferRequest(
        correlation_id=correlation_id,
        model=model,
        reply_to=reply_to,
        inputs={k: np.asarray(v).tolist() for k, v in inputs.items()},
    )
    return request.model_dump_json().encode()


def response_outputs(response: InferResponse) -> dict[str, np.ndarray]:
    """A response's outputs as arrays: as sent (binary), or nested lists as float32 (JSON)."""
    return {
        k: v if isinstance(v, np.ndarray) else np.asarray(v, dtype=np.float32)
        for k, v in (response.outputs or {}).items()
    }
