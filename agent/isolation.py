"""Deployments in a child process, so that the idle daemon never holds their memory.

A deployment (steps 1-6 of :mod:`agent.updater`: TUF refresh, order and release checks, download,
verification, install, self-test) needs python-tuf, securesystemslib and cryptography, and
allocates as it goes. Run in the daemon, all of that would stay resident for as long as the
daemon runs. So on a real device (:attr:`DevicePlatform.isolate_deployments`) the worker thread
starts ``python -m agent.isolation`` for each deployment and waits for it; the daemon imports
none of the trust stack, and the memory is returned when the child exits.

What does not change:

- **One writer.** Only the worker thread starts a deployment process, one at a time, and waits
  for it; meanwhile nothing else in the agent changes the store. The daemon re-reads
  ``state.json`` afterwards. Activation, probation, commit and rollback stay in the daemon.
- **The network.** The child has no MQTT connection of its own (the broker knows one client per
  device). It talks to the daemon over its stdin and stdout: the daemon forwards ``down/fetch``
  frames and the connection state; the child asks the daemon to publish its fetch requests and
  its deployment events, which the daemon journals and sends as its own.
- **Power loss.** The child writes to the store exactly as the in-process pipeline does. A test
  that asks for a power cut at a fault point inside the child kills the daemon too
  (:func:`agent.store.kill_point`); the child is killed when the daemon dies
  (``PR_SET_PDEATHSIG``), so a killed agent never leaves a deployment running behind it.
- **Failures.** A :class:`DeploymentError` in the child comes back as the same error. A child
  that dies without an answer is an internal error, reported as such by the worker.

Messages are pickled tuples on the pipes, between two processes of the same program.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Any

from agent.config import AgentSettings
from agent.platform import DevicePlatform
from agent.serving import DeploymentError, Ready, Runtimes
from agent.store import DEPLOYMENT_PROCESS_ENV, ModelStore

__all__ = ["IsolatedDeployer"]

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


class IsolatedDeployer:
    """The daemon's side: run each deployment in a child process; same interface as Deployer.

    :meth:`deploy` is called by the worker thread only; :meth:`deliver` and
    :meth:`set_connected` by the dispatcher; :meth:`kill` when the agent stops.
    """

    def __init__(
        self,
        settings: AgentSettings,
        store: ModelStore,
        platform: DevicePlatform,
        *,
        runtimes: Runtimes,
        publish: Callable[[str, bytes], bool],
        connected: threading.Event,
        emit: Callable[..., None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.platform = replace(platform, isolate_deployments=False)  # the child's own view
        self.runtimes = runtimes
        self.publish = publish
        self.connected = connected
        self.emit = emit
        self._child: subprocess.Popen[bytes] | None = None
        self._write_lock = threading.Lock()

    def deploy(self, order_text: str) -> Ready:
        """Run one deployment in a child process and wait for it.

        Raises:
            DeploymentError: the deployment failed; nothing active has changed.
            RuntimeError: the child process died without an answer.
        """
        child = subprocess.Popen(
            [sys.executable, "-m", "agent.isolation"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, DEPLOYMENT_PROCESS_ENV: str(os.getpid())},
        )
        assert child.stdin is not None
        assert child.stdout is not None
        self._child = child
        answer = None
        try:
            self._send((self.settings, self.platform, order_text))
            self._send(("connected", self.connected.is_set()))
            answer = self._serve(child.stdout)
        finally:
            self._child = None
            if answer is None:
                child.kill()
            with contextlib.suppress(OSError):
                child.stdin.close()
            child.wait()
            child.stdout.close()
            self.store.reload_state()  # the child changed it on disk
        if answer is None:
            raise RuntimeError(f"the deployment process exited ({child.returncode}) mid-way")
        if answer[0] == "failed":
            _, failure_class, message, model, version = answer
            raise DeploymentError(failure_class, message, model=model, version=version)
        _, name, version, rollback_floor = answer
        manifest = self.store.installed(name, version)
        return Ready(manifest, self.runtimes.decision_for(name, version), rollback_floor)

    def _serve(self, stream: IO[bytes]) -> tuple[Any, ...] | None:
        """Carry out the child's requests until its answer (None if it died first)."""
        while True:
            try:
                message = pickle.load(stream)  # noqa: S301 - our own child
            except (EOFError, pickle.UnpicklingError):
                return None
            kind = message[0]
            if kind == "publish":
                self.publish(message[1], message[2])
            elif kind == "emit":
                _, phase, model, version, fields = message
                self.emit(phase, model, version, **fields)
            else:  # "done" or "failed"
                return tuple(message)

    def deliver(self, payload: bytes) -> None:
        """A ``down/fetch`` frame for the running deployment (dropped when none runs)."""
        self._send(("frame", payload))

    def set_connected(self, connected: bool) -> None:
        self._send(("connected", connected))

    def kill(self) -> None:
        child = self._child
        if child is not None:
            with contextlib.suppress(OSError):
                child.kill()

    def _send(self, message: Any) -> None:
        child = self._child
        if child is None or child.stdin is None:
            return
        with self._write_lock, contextlib.suppress(OSError, ValueError):
            pickle.dump(message, child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            child.stdin.flush()


# -- the child process ---------------------------------------------------------------------------


class _PipeLink:
    """What :class:`agent.fetch.FetchClient` needs of a link, carried over the daemon's pipe."""

    def __init__(self, out: IO[bytes]) -> None:
        self.connected = threading.Event()
        self._out = out
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            pickle.dump(message, self._out, protocol=pickle.HIGHEST_PROTOCOL)
            self._out.flush()

    def publish(self, topic: str, payload: bytes) -> bool:
        if not self.connected.is_set():
            return False
        self.send(("publish", topic, payload))
        return True

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected.wait(timeout_s)

    def emit(self, phase: str, model: str, version: str, **fields: Any) -> None:
        self.send(("emit", phase, model, version, fields))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the daemon dies (a killed agent leaves nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if str(os.getppid()) != os.environ.get(DEPLOYMENT_PROCESS_ENV):
        os._exit(1)  # the daemon died before the request took effect


def _child_main() -> None:
    from agent.fetch import FetchClient
    from agent.updater import Deployer  # the trust stack, in this process only

    _die_with_parent()
    inbox = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")  # the protocol keeps the real stdout...
    os.dup2(2, 1)  # ...and anything a library prints goes to stderr (journald)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings, platform, order_text = pickle.load(inbox)  # noqa: S301 - the daemon
    link = _PipeLink(out)
    client = FetchClient(link, settings.device_id, timeout_s=settings.request_timeout_s)

    def read_daemon() -> None:
        while True:
            try:
                message = pickle.load(inbox)  # noqa: S301 - the daemon
            except (EOFError, pickle.UnpicklingError):
                os._exit(1)  # the daemon is gone or stopping: stop where we are
            if message[0] == "frame":
                client.deliver(message[1])
            elif message[0] == "connected":
                (link.connected.set if message[1] else link.connected.clear)()

    threading.Thread(target=read_daemon, name="edgefleet-deployment-pipe", daemon=True).start()
    store = ModelStore(settings.data_dir)
    deployer = Deployer(settings, store, client, platform, link.emit)
    try:
        ready = deployer.deploy(order_text)
    except DeploymentError as e:
        link.send(("failed", e.failure_class, str(e), e.model, e.version))
    else:
        manifest = ready.manifest
        link.send(("done", manifest.name, manifest.version, ready.rollback_floor))
    os._exit(0)  # the daemon closes the pipe now; nothing is left to clean up


if __name__ == "__main__":
    _child_main()
