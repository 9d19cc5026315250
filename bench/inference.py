"""Benchmark: inference through the agent over MQTT vs the direct Python API; the idle agent.

One command::

    .venv/bin/python bench/inference.py [--requests 500] [--rounds 5] [--idle-s 20] [--json]

Set-up: the same broker as ``bench/transfer.py`` (one Mosquitto with the production
configuration of :mod:`fleet.broker_config`, mutual TLS, plus its loopback plaintext listener), a
signed bundle of the small example CNN (``shared.example_models``, 32x32x3 input, every format
that can be built here: ONNX, OpenVINO IR, TFLite) and a second bundle with only its ONNX
artifact. Each is deployed with a signed order to a fresh, real, unmodified agent started as the
systemd unit starts it (``python -m agent run``, the daemon without the rest of the CLI;
probation 1 s so it commits quickly, otherwise default settings), which selects its runtime by
measurement (self-test) as in production.

1. Latency. Batch-1 requests with the bundle's first test vector, ``--requests`` sequential
   requests per method, in ``--rounds`` interleaved rounds (method order rotated each round),
   after 20 warm-up requests each. Methods:

   - ``direct`` (the limit): :class:`agent.runtimes.runner.ModelRunner` loaded in a child process
     from the agent's own installed version and its cached runtime decision (the agent's
     in-process path; ``Agent.infer`` adds two counter updates around ``runner.infer``), timed
     around ``runner.infer(feeds)``.
   - ``client``: :class:`agent.client.InferenceClient`, the project's Python API for other
     processes, in its default binary encoding (raw tensors behind a JSON header,
     :mod:`shared.tensors`), timed around ``client.infer(...)``: numpy to bytes, MQTT to the
     agent, the agent's parse / infer / answer, MQTT back, bytes to numpy.
   - ``client-json``: the same client with ``encoding="json"`` (nested lists).
   - ``wire`` and ``wire-json``: a plain paho client publishing the same request bytes
     pre-encoded (binary, JSON), timed from ``publish`` to the response arriving in
     ``on_message`` (no client-side encoding or decoding). Its socket has TCP_NODELAY, as every
     ``shared.mqtt.MqttLink`` has.

   The CPU work of a round trip is also timed in the direct child, step by step, for each
   encoding, by calling the client's and the daemon's own functions (``agent.client``,
   ``agent.messages``, ``ActiveModel.feeds``) on the same request bytes.
2. Idle footprint. After the deployment is committed and 3 s of settling, the agent process is
   sampled for ``--idle-s`` seconds: ``VmRSS`` every 0.5 s from ``/proc/<pid>/status`` and
   ``utime + stime`` from ``/proc/<pid>/stat``. Its resident memory is attributed to files and
   anonymous memory from ``/proc/<pid>/smaps``; the cost of each import (agent modules, the CLI,
   each runtime, a loaded model) is measured in fresh interpreters.

Goals (from the issue): the MQTT round trip (``client``, binary, over TLS, the production
listener) adds <= 2 ms p50 over ``direct``, measured in the same run (``client-json`` is shown
beside it); the idle agent with one small ONNX model
loaded uses <= 80 MB RSS (MB = 10^6 bytes, as the issue writes it; MiB are shown too) and <= 1%
CPU (of one core). The exit status is 0 whether or not the goals are met: this is a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.transfer import (  # noqa: E402 - the repository must be importable first
    APP,
    APP_WIRE,
    DEVICE,
    MB,
    Broker,
    Client,
    Releases,
    Responder,
    cpu_seconds,
    loadavg,
    machine_info,
    proc_status_kib,
    start_agent,
    stop_agent,
    wait_quiet,
)

LATENCY_GOAL_MS = 2.0
ENCODINGS = ("binary", "json")  # binary is the client's default, and what the goal is met with
RSS_GOAL_MB = 80.0
CPU_GOAL_PCT = 1.0
WARMUP = 20
SAMPLE_S = 0.5
SETTLE_S = 3.0
AGENTS: dict[str, dict[str, Any]] = {  # every case is the agent as shipped
    "example-tls": {"bundle": "example", "transport": "tls", "idle": True},
    "example-plain": {"bundle": "example", "transport": "plain", "idle": False},
    "onnx-tls": {"bundle": "onnx", "transport": "tls", "idle": True},
}
AGENT_ENTRY = ("agent", "run")  # python -m agent run: what deploy/edgefleet-agent.service runs
MODEL_NAMES = {"example": "cnn", "onnx": "cnn-onnx"}
VERSIONS = {"example": "1.0.0", "onnx": "2.0.0"}  # the responder keys releases by version


METHOD_LABELS = {
    "direct": "direct: ModelRunner.infer (limit)",
    "client": "MQTT binary: InferenceClient.infer",
    "wire": "MQTT binary: pre-encoded, publish -> on_message",
    "client-json": "MQTT JSON: InferenceClient.infer",
    "wire-json": "MQTT JSON: pre-encoded, publish -> on_message",
}


def _status(pid: int | str) -> dict[str, int]:
    fields = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads")
    return {f: proc_status_kib(pid, f) or 0 for f in fields}


# -- child side ----------------------------------------------------------------------------------


def _load_runner(data_dir: Path, model: str) -> tuple[Any, Any, Path]:
    """The agent's path: its installed version and its cached decision, in a ModelRunner."""
    import hashlib

    from agent.runtimes.cache import DecisionCache
    from agent.runtimes.inventory import scan
    from agent.runtimes.probe import probe_model
    from agent.runtimes.runner import ModelRunner
    from agent.store import ModelStore
    from shared.bundle_format import MANIFEST_NAME

    store = ModelStore(data_dir)
    version = store.current(model)
    assert version is not None, f"{model} is not installed in {data_dir}"
    root = store.version_dir(model, version)
    manifest = store.manifest(model, version)
    report = probe_model(
        root,
        manifest,
        bundle_digest=hashlib.sha256((root / MANIFEST_NAME).read_bytes()).hexdigest(),
        inventory=scan(),
        objective="latency",
        cache=DecisionCache(data_dir / "cache" / "runtime-decisions"),
    )
    if not report.from_cache:
        raise RuntimeError("the agent's runtime decision was not in its cache")
    runner = ModelRunner(root, manifest, report.decision)
    runner.load()
    return runner, manifest, root


def _components(runner: Any, manifest: Any, x: Any, n: int) -> dict[str, dict[str, float]]:
    """Median ms of each step of a round trip's CPU work, per encoding, on the same request.

    Each step calls the function the client (``agent.client``) or the daemon (``Agent._answer``)
    calls; the messages are parsed as they arrive (the client parses its answers with
    ``parse_payload``).
    """
    import json as json_module

    from agent.client import encode_request, response_outputs
    from agent.messages import encode_infer_response, parse_infer_request
    from agent.serving import ActiveModel
    from shared.protocol import InferResponse, parse_payload

    active = ActiveModel(manifest.name, "1", manifest, runner)
    name = manifest.inputs[0].name
    result: dict[str, dict[str, float]] = {}
    for encoding in ENCODINGS:
        steps: dict[str, list[float]] = defaultdict(list)

        def timed(step: str, fn: Any, steps: dict[str, list[float]] = steps) -> Any:
            t = time.perf_counter()
            value = fn()
            steps[step].append((time.perf_counter() - t) * 1000)
            return value

        for _ in range(n):
            payload = timed(
                "client: numpy -> request",
                lambda encoding=encoding: encode_request(
                    correlation_id=uuid.uuid4().hex,
                    model=manifest.name,
                    reply_to=APP,
                    inputs={name: x},
                    encoding=encoding,
                ),
            )
            request = timed("agent: parse_infer_request", lambda p=payload: parse_infer_request(p))
            if encoding == "json":
                timed("  of which json.loads", lambda p=payload: json_module.loads(p))
            feeds = timed(
                "agent: feeds (exact check, or lists -> numpy)",
                lambda r=request: active.feeds(r.inputs, binary=r.binary),
            )
            outputs = timed("agent: runner.infer", lambda f=feeds: runner.infer(f))
            response = timed(
                "agent: outputs -> response",
                lambda r=request, o=outputs: encode_infer_response(
                    correlation_id=r.correlation_id,
                    model=r.model,
                    ok=True,
                    version="1",
                    outputs=o,
                    latency_ms=0.1,
                    binary=r.binary,
                ),
            )
            timed(
                "client: response -> numpy",
                lambda b=response: response_outputs(
                    parse_payload(InferResponse, b, what="inference response")
                ),
            )
        medians = {k: statistics.median(v) for k, v in steps.items()}
        medians["request_bytes"] = float(len(payload))
        medians["response_bytes"] = float(len(response))
        result[encoding] = medians
    return result


def child_direct(spec: dict[str, Any]) -> None:
    """Long-lived: load the runner, then answer ``{"n": N}`` lines with N latencies (ms)."""
    import numpy as np

    runner, manifest, root = _load_runner(Path(spec["data_dir"]), spec["model"])
    x = np.load(root / "vectors" / "input.npy")[:1]
    feeds = {manifest.inputs[0].name: x}
    for _ in range(WARMUP):
        runner.infer(feeds)
    hello = {
        "runtime": runner.active.key if runner.active else None,
        "components_ms": _components(runner, manifest, x, 200),
    }
    sys.stdout.write(json.dumps(hello) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        n = json.loads(line)["n"]
        latencies = []
        for _ in range(n):
            t = time.perf_counter()
            runner.infer(feeds)
            latencies.append((time.perf_counter() - t) * 1000)
        sys.stdout.write(json.dumps(latencies) + "\n")
        sys.stdout.flush()


def child_footprint(spec: dict[str, Any]) -> dict[str, Any]:
    """Import ``modules`` (and load a model on ``load``) in this fresh interpreter; report RSS."""
    import importlib

    before = _status("self")
    for module in spec["modules"]:
        if module == "openvino":
            from shared.openvino_quiet import import_openvino

            import_openvino()
        else:
            importlib.import_module(module)
    after_import = _status("self")
    after_last = None
    if spec.get("last"):
        for module in spec["last"]:
            importlib.import_module(module)
        after_last = _status("self")
    after_load = None
    if spec.get("load"):
        import numpy as np

        root = Path(spec["model_dir"])
        x = np.load(root / "vectors" / "input.npy")[:1]
        if spec["load"] == "onnxruntime":
            import onnxruntime as ort

            session = ort.InferenceSession(str(root / "onnx" / "model.onnx"))
            session.run(None, {session.get_inputs()[0].name: x})
        elif spec["load"] == "openvino":
            from shared.openvino_quiet import import_openvino

            ov = import_openvino()
            compiled = ov.Core().compile_model(str(root / "openvino" / "model.xml"), "CPU")
            compiled.create_infer_request().infer({0: x})
        else:
            from ai_edge_litert import interpreter as litert

            interp = litert.Interpreter(model_path=str(root / "tflite" / "model.tflite"))
            interp.allocate_tensors()
            interp.set_tensor(interp.get_input_details()[0]["index"], x)
            interp.invoke()
        after_load = _status("self")
    packages = sorted({m.split(".")[0] for m in sys.modules if not m.startswith("_")})
    return {
        "before": before,
        "after_import": after_import,
        "after_last": after_last,
        "after_load": after_load,
        "modules": len(sys.modules),
        "packages": packages,
    }


# -- parent side ---------------------------------------------------------------------------------


def run_footprint_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def smaps_breakdown(pid: int) -> dict[str, float]:
    """Resident KiB per source: anonymous memory, each site-packages package, python, system."""
    totals: dict[str, int] = defaultdict(int)
    current = "anonymous"
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping header
                parts = line.split(maxsplit=5)
                current = _source(parts[5].strip() if len(parts) > 5 else "")
            elif first == "Rss:":
                totals[current] += int(line.split()[1])
    return dict(sorted(((k, v / 1024) for k, v in totals.items()), key=lambda kv: -kv[1]))


def _source(path: str) -> str:
    if not path or (path.startswith("[") and path not in ("[vdso]", "[vvar]")):
        return "anonymous: heap, malloc arenas, stacks (no file)"
    if "site-packages/" in path:
        rest = path.split("site-packages/", 1)[1]
        package = rest.split("/", 1)[0]
        for suffix in (".libs",):
            package = package.removesuffix(suffix)
        return f"site-packages/{package.split('-')[0]}"
    if "libpython" in path or "/bin/python" in path or "/lib/python3" in path:
        return "python interpreter and stdlib extensions"
    if path.startswith("/tmp") or path.startswith("/dev/shm"):
        return f"temp file {Path(path).name}"
    return "system libraries (libc, libssl, ...)"


def sample_idle(pid: int, seconds: float) -> dict[str, Any]:
    rss: list[int] = []
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        rss.append(proc_status_kib(pid, "VmRSS") or 0)
        time.sleep(SAMPLE_S)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    return {
        "seconds": t1 - t0,
        "samples": len(rss),
        "rss_kib_median": statistics.median(rss),
        "rss_kib_max": max(rss),
        "rss_kib_min": min(rss),
        "cpu_s": cpu1 - cpu0,
        "cpu_pct_of_one_core": 100 * (cpu1 - cpu0) / (t1 - t0),
    }


class WireClient:
    """Pre-encoded requests (either encoding) over a plain paho client; publish -> on_message."""

    def __init__(self, broker: Broker, transport: str, model: str, x: Any, name: str) -> None:
        from agent.client import encode_request
        from shared.protocol import INFER_REQUEST, INFER_RESPONSE, device_topic

        self.topic = device_topic(DEVICE, INFER_REQUEST)
        self.templates = {  # the correlation id comes first in both: replaced per request
            encoding: encode_request(
                correlation_id="0" * 32,
                model=model,
                reply_to=APP_WIRE,
                inputs={name: x},
                encoding=encoding,
            )
            for encoding in ENCODINGS
        }
        self.client = Client(broker.spec(transport, APP_WIRE))
        # as shared.mqtt.MqttLink (InferenceClient's link) does on connect: without it, each
        # request waits for the broker's delayed ACK (~40 ms) and this would time Nagle, not MQTT
        self.client.paho.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arrived = threading.Event()
        self._expect = b""
        self._hit_at = 0.0

        def on_message(message: Any) -> None:
            if self._expect in message.payload[:200]:
                self._hit_at = time.perf_counter()
                self._arrived.set()

        self.client.on_message_hook = on_message
        self.client.subscribe(device_topic(DEVICE, f"{INFER_RESPONSE}/{APP_WIRE}"))

    def infer(self, encoding: str) -> float:
        correlation = uuid.uuid4().hex.encode()
        payload = self.templates[encoding].replace(b"0" * 32, correlation, 1)
        self._expect = correlation
        self._arrived.clear()
        start = time.perf_counter()
        self.client.publish(self.topic, payload)
        if not self._arrived.wait(10):
            raise TimeoutError("no inference response")
        return (self._hit_at - start) * 1000

    def close(self) -> None:
        self.client.close()


def make_inference_client(broker: Broker, transport: str) -> Any:
    from agent.client import InferenceClient
    from shared.mqtt import MqttSettings

    spec = broker.spec(transport, APP)
    tls = spec["tls"] or [None, None, None]
    settings = MqttSettings(
        url=broker.url(transport),
        client_id=APP,
        username=None if spec["tls"] else APP,
        ca_file=tls[0],
        cert_file=tls[1],
        key_file=tls[2],
    )
    return InferenceClient(settings, device_id=DEVICE, app_id=APP)


def _pcts(values: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.array(values)
    return {
        "n": len(values),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "max": float(a.max()),
    }


def measure_latency(
    broker: Broker,
    transport: str,
    data_dir: Path,
    model: str,
    requests: int,
    rounds: int,
) -> dict[str, Any]:
    import numpy as np

    from agent.store import ModelStore

    store = ModelStore(data_dir)
    version = store.current(model)
    assert version is not None
    root = store.version_dir(model, version)
    x = np.load(root / "vectors" / "input.npy")[:1]
    name = store.manifest(model, version).inputs[0].name
    direct = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            json.dumps({"op": "direct", "data_dir": str(data_dir), "model": model}),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert direct.stdin is not None
    assert direct.stdout is not None
    hello = json.loads(direct.stdout.readline())
    client = make_inference_client(broker, transport)
    wire = WireClient(broker, transport, model, x, name)
    latencies: dict[str, list[float]] = defaultdict(list)
    round_p50: dict[str, list[float]] = defaultdict(list)
    per_round = max(1, requests // rounds)

    def run_direct(n: int) -> list[float]:
        assert direct.stdin is not None
        assert direct.stdout is not None
        direct.stdin.write(json.dumps({"n": n}) + "\n")
        direct.stdin.flush()
        values: list[float] = json.loads(direct.stdout.readline())
        return values

    def run_client(encoding: str) -> Any:
        def run(n: int) -> list[float]:
            client.encoding = encoding
            values = []
            for _ in range(n):
                t = time.perf_counter()
                got_version, _ = client.infer(model, {name: x})
                values.append((time.perf_counter() - t) * 1000)
                assert got_version == version
            return values

        return run

    def run_wire(encoding: str) -> Any:
        return lambda n: [wire.infer(encoding) for _ in range(n)]

    methods = {
        "direct": run_direct,
        "client": run_client("binary"),
        "client-json": run_client("json"),
        "wire": run_wire("binary"),
        "wire-json": run_wire("json"),
    }
    try:
        for fn in methods.values():
            fn(WARMUP)
        order = list(methods)
        for i in range(rounds):
            for method in order[i % len(order) :] + order[: i % len(order)]:
                values = methods[method](per_round)
                latencies[method] += values
                round_p50[method].append(statistics.median(values))
    finally:
        wire.close()
        client.close()
        with contextlib.suppress(Exception):
            direct.stdin.close()
        direct.wait(10)
    stats = {m: _pcts(v) for m, v in latencies.items()}
    direct_p50 = stats["direct"]["p50"]
    return {
        "transport": transport,
        "direct_runtime": hello["runtime"],
        "components_ms": hello["components_ms"],
        "stats_ms": stats,
        "round_p50_ms": {m: [round(v, 3) for v in vs] for m, vs in round_p50.items()},
        # each round's p50 minus the same round's direct p50
        "round_minus_direct_p50_ms": {
            m: [round(v - d, 3) for v, d in zip(vs, round_p50["direct"], strict=True)]
            for m, vs in round_p50.items()
            if m != "direct"
        },
        **{
            f"{m.replace('-', '_')}_minus_direct_p50_ms": stats[m]["p50"] - direct_p50
            for m in methods
            if m != "direct"
        },
    }


def run_agent_case(
    key: str,
    broker: Broker,
    releases: Releases,
    bundles: dict[str, Path],
    tmp: Path,
    sequence: int,
    opts: argparse.Namespace,
    log: Any,
) -> dict[str, Any]:
    case = AGENTS[key]
    bundle_key, transport = case["bundle"], case["transport"]
    model = MODEL_NAMES[bundle_key]
    responder = Responder(broker, transport, releases)
    for path in bundles.values():
        responder.publish_release(path)
    version = VERSIONS[bundle_key]
    data_dir = tmp / f"agent-{len(list(tmp.glob('agent-*')))}" / "data"
    proc = start_agent(
        broker, transport, releases, data_dir, settings={"probation_s": 1.0}, entry=AGENT_ENTRY
    )
    result: dict[str, Any] = {
        "bundle": bundle_key,
        "model": model,
        "transport": transport,
    }
    requests = opts.requests if key == "example-tls" else opts.requests_other
    try:
        responder.wait_for(lambda s, b: s == "up/state", timeout=60, what="first state report")
        result["status_before_deploy"] = _status(proc.pid)
        log(f"{key}: deploying {model} {version}...")
        responder.deploy(DEVICE, version, sequence=sequence)
        activated = responder.wait_phase("activated", version, timeout=180)
        responder.wait_phase("committed", version, timeout=60)
        result["runtime"] = json.loads((data_dir / "runtime.json").read_text()).get(model)
        result["activated_detail"] = activated.get("detail")
        time.sleep(SETTLE_S)
        if case["idle"]:
            log(f"{key}: sampling the idle agent for {opts.idle_s:g} s...")
            result["quiet"] = wait_quiet(opts.max_quiet_wait, log)
            result["idle"] = sample_idle(proc.pid, opts.idle_s)
            result["status_idle"] = _status(proc.pid)
            result["smaps_mib"] = smaps_breakdown(proc.pid)
            with open(f"/proc/{proc.pid}/maps", encoding="utf-8") as f:
                maps = f.read()
            result["runtime_libraries_mapped"] = {
                "onnxruntime": "onnxruntime" in maps,
                "openvino": "libopenvino" in maps,
                "litert": "ai_edge_litert" in maps or "tflite" in maps,
            }
        log(f"{key}: latency, {requests} requests per method in {opts.rounds} rounds...")
        wait_quiet(opts.max_quiet_wait, log)
        result["latency"] = measure_latency(
            broker,
            transport,
            data_dir,
            model,
            requests,
            opts.rounds,
        )
        result["status_after_latency"] = _status(proc.pid)
    finally:
        stop_agent(proc)
        responder.close()
    return result


# What the agent process imports, by dependency (stdlib modules some of them pull in are listed
# so that they are loaded before any group is measured: they are nobody's marginal cost).
STDLIB_FIRST = ["json", "ssl", "hashlib", "asyncio", "email.message", "logging", "sqlite3"]
DEPENDENCIES = {
    "numpy": ["numpy"],
    "pydantic-settings (+ python-dotenv), on top of pydantic": ["pydantic_settings"],
    "pydantic (pydantic-core, BaseModel) + pydantic-settings": [
        "pydantic.main",
        "pydantic_settings",
    ],
    "trust: cryptography, securesystemslib, tuf": [
        "cryptography.x509",
        "securesystemslib.signer",
        "tuf.ngclient",
    ],
    "paho-mqtt": ["paho.mqtt.client"],
    "CLI: typer, rich": ["typer", "rich.console"],
}
AGENT_MODULES = ["agent.service", "agent.daemon"]  # what `python -m agent run` imports


def measure_imports(model_dir: Path, log: Any) -> dict[str, Any]:
    """VmRSS of fresh interpreters after imports (and after loading the small model).

    A dependency's marginal cost is measured by importing every other dependency first, then it
    last: what removing it alone would save (shared libraries such as libcrypto are loaded by
    several and so are nobody's marginal cost)."""
    log("import costs, each in a fresh interpreter...")
    every = [m for modules in DEPENDENCIES.values() for m in modules]
    cases: dict[str, dict[str, Any]] = {
        "python, nothing imported": {"modules": []},
        "the agent's third-party dependencies": {"modules": [*STDLIB_FIRST, *every]},
        "what `python -m agent run` imports": {"modules": AGENT_MODULES},
    }
    for group, modules in DEPENDENCIES.items():
        # everything else first (a group listed with its dependents: pydantic with -settings)
        others = [m for m in every if m not in modules]
        cases[f"marginal: {group}"] = {"modules": [*STDLIB_FIRST, *others], "last": modules}
    cases |= {
        "onnxruntime alone": {"modules": ["onnxruntime"]},
        "openvino alone": {"modules": ["openvino"]},
        "ai_edge_litert.interpreter alone": {"modules": ["ai_edge_litert.interpreter"]},
    }
    for runtime, module in (
        ("onnxruntime", "onnxruntime"),
        ("openvino", "openvino"),
        ("litert", "ai_edge_litert.interpreter"),
    ):
        cases[f"agent ({' + '.join(AGENT_MODULES)}) + {runtime}, small model loaded"] = {
            "modules": [*AGENT_MODULES, module],
            "load": runtime,
        }
    cases["floor: paho + numpy + onnxruntime, small model loaded"] = {
        "modules": ["paho.mqtt.client", "numpy", "onnxruntime"],
        "load": "onnxruntime",
    }
    results = {}
    for label, spec in cases.items():
        results[label] = run_footprint_child(
            {"op": "footprint", "model_dir": str(model_dir), **spec}
        )
    return results


def run_benchmark(opts: argparse.Namespace, log: Any) -> dict[str, Any]:
    from shared.example_models import write_example

    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-inference-") as tmp_name:
        tmp = Path(tmp_name)
        log("writing the small example model (all formats) and an ONNX-only copy...")
        example = tmp / "model-example"
        written = write_example(example, size="small")
        onnx_only = tmp / "model-onnx"
        write_example(onnx_only, size="small", formats=["onnx"])
        releases = Releases(tmp / "releases")
        bundles = {
            "example": releases.build(example, MODEL_NAMES["example"], VERSIONS["example"]),
            "onnx": releases.build(onnx_only, MODEL_NAMES["onnx"], VERSIONS["onnx"]),
        }
        log("starting mosquitto (production config: TLS + loopback plaintext)...")
        broker = Broker(tmp / "broker")
        cases: dict[str, Any] = {}
        try:
            for i, key in enumerate(AGENTS):
                cases[key] = run_agent_case(key, broker, releases, bundles, tmp, i + 1, opts, log)
        finally:
            broker.stop()
        imports = measure_imports(example, log)

    tls = cases["example-tls"]["latency"]
    onnx = cases["onnx-tls"]
    rss_mb = onnx["idle"]["rss_kib_median"] * 1024 / MB
    cpu_pct = onnx["idle"]["cpu_pct_of_one_core"]
    return {
        "benchmark": "inference",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "machine": machine_info(),
        "load_average_1min": {"before": load_before, "after": loadavg()},
        "units": {"latency": "ms", "memory": "MiB unless named MB (10^6 bytes)", "cpu": "%"},
        "settings": {
            "requests_per_method": opts.requests,
            "requests_per_method_other_cases": opts.requests_other,
            "rounds": opts.rounds,
            "warmup_per_method": WARMUP,
            "idle_s": opts.idle_s,
            "formats_written": written.written,
            "formats_skipped": written.skipped,
            "agent": "defaults except probation_s 1.0",
        },
        "cases": cases,
        "imports": imports,
        "goals": {
            "client_minus_direct_p50_ms_max": LATENCY_GOAL_MS,
            "idle_rss_mb_max": RSS_GOAL_MB,
            "idle_cpu_pct_max": CPU_GOAL_PCT,
        },
        "goal_met": {
            "latency": tls["client_minus_direct_p50_ms"] <= LATENCY_GOAL_MS,
            "latency_json_for_comparison": tls["client_json_minus_direct_p50_ms"]
            <= LATENCY_GOAL_MS,
            "idle_rss": rss_mb <= RSS_GOAL_MB,
            "idle_cpu": cpu_pct <= CPU_GOAL_PCT,
        },
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)
    m = report["machine"]
    load = report["load_average_1min"]
    console.print(f"[bold]command:[/] {report['command']}")
    console.print(
        f"[bold]machine:[/] {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"Python {m['python']}, {m['openssl']}, {m['os']}, {m['mosquitto']}, "
        f"paho-mqtt {m['paho_mqtt']}; load average {load['before']:.2f} before, "
        f"{load['after']:.2f} after"
    )
    cases = report["cases"]
    table = Table(title="inference latency, batch 1 (ms; all requests of all rounds)")
    for col in ("agent", "runtime", "method", "n", "p50", "p90", "p99", "max", "p50 - direct"):
        table.add_column(col, justify="left" if col in ("agent", "runtime", "method") else "right")
    for key, case in cases.items():
        lat = case["latency"]
        for method, label in METHOD_LABELS.items():
            s = lat["stats_ms"][method]
            table.add_row(
                key,
                case["runtime"] or "?",
                label,
                str(s["n"]),
                f"{s['p50']:.3f}",
                f"{s['p90']:.3f}",
                f"{s['p99']:.3f}",
                f"{s['max']:.1f}",
                "" if method == "direct" else f"{s['p50'] - lat['stats_ms']['direct']['p50']:+.3f}",
                end_section=method == "wire-json",
            )
    console.print(table)

    comp = Table(title="CPU work of one round trip, step by step (median ms, direct child)")
    comp.add_column("encoding")
    comp.add_column("step")
    plain_cases = list(cases)
    for key in plain_cases:
        comp.add_column(key, justify="right")
    for encoding in ENCODINGS:
        per_case = [cases[k]["latency"]["components_ms"][encoding] for k in plain_cases]
        steps = [k for k in per_case[0] if not k.endswith("bytes")]
        for step in steps:
            comp.add_row(encoding, step, *(f"{c[step]:.3f}" for c in per_case))
        comp.add_row(
            encoding,
            "request / response bytes",
            *(f"{c['request_bytes']:.0f} / {c['response_bytes']:.0f}" for c in per_case),
            end_section=True,
        )
    console.print(comp)

    idle = Table(title="idle agent after deployment (python -m agent run, committed, no requests)")
    for col in (
        "agent",
        "runtime",
        "seconds",
        "VmRSS median MiB",
        "= MB",
        "max MiB",
        "RssAnon MiB",
        "RssFile MiB",
        "VmHWM MiB",
        "CPU % of a core",
        "runtimes mapped",
    ):
        idle.add_column(col, justify="left" if col in ("agent", "runtime") else "right")
    for key, case in cases.items():
        if "idle" not in case:
            continue
        i, st = case["idle"], case["status_idle"]
        idle.add_row(
            key,
            case["runtime"] or "?",
            f"{i['seconds']:.1f}",
            f"{i['rss_kib_median'] / 1024:.1f}",
            f"{i['rss_kib_median'] * 1024 / MB:.1f}",
            f"{i['rss_kib_max'] / 1024:.1f}",
            f"{st['RssAnon'] / 1024:.1f}",
            f"{st['RssFile'] / 1024:.1f}",
            f"{st['VmHWM'] / 1024:.1f}",
            f"{i['cpu_pct_of_one_core']:.2f}",
            ", ".join(k for k, v in case["runtime_libraries_mapped"].items() if v) or "none",
        )
    console.print(idle)

    smaps = Table(title="where the idle agent's resident memory is (MiB, /proc/<pid>/smaps Rss)")
    smaps.add_column("source")
    idle_cases = [k for k in cases if "smaps_mib" in cases[k]]
    for key in idle_cases:
        smaps.add_column(key, justify="right")
    sources: list[str] = []
    for key in idle_cases:
        for source, mib in cases[key]["smaps_mib"].items():
            if mib >= 0.5 and source not in sources:
                sources.append(source)
    for source in sources:
        smaps.add_row(
            source, *(f"{cases[k]['smaps_mib'].get(source, 0.0):.1f}" for k in idle_cases)
        )
    smaps.add_row(
        "all (sum of Rss)",
        *(f"{sum(cases[k]['smaps_mib'].values()):.1f}" for k in idle_cases),
    )
    console.print(smaps)

    imp = Table(title="VmRSS of a fresh interpreter (MiB)")
    for col in ("imported", "VmRSS", "marginal", "after loading the model", "modules"):
        imp.add_column(col, justify="left" if col == "imported" else "right")
    for label, r in report["imports"].items():
        if "error" in r:
            imp.add_row(label, "error: " + " ".join(r["error"]), "", "", "")
            continue
        last = r.get("after_last")
        rss = (last or r["after_import"])["VmRSS"] / 1024
        imp.add_row(
            label,
            f"{rss:.1f}",
            f"{(last['VmRSS'] - r['after_import']['VmRSS']) / 1024:+.1f}" if last else "",
            f"{r['after_load']['VmRSS'] / 1024:.1f}" if r["after_load"] else "",
            str(r["modules"]),
        )
    console.print(imp)

    def verdict(ok: bool) -> str:
        return "[green]MET[/]" if ok else "[red]NOT MET[/]"

    met = report["goal_met"]
    lat = cases["example-tls"]["latency"]
    onnx = cases["onnx-tls"]
    console.print(
        f"MQTT round trip (InferenceClient, binary, TLS) - direct, p50 = "
        f"{lat['client_minus_direct_p50_ms']:+.2f} ms (goal <= {LATENCY_GOAL_MS:g} ms): "
        f"{verdict(met['latency'])}; per round "
        f"{', '.join(f'{v:+.2f}' for v in lat['round_minus_direct_p50_ms']['client'])}"
    )
    console.print(
        f"  for comparison, JSON: {lat['client_json_minus_direct_p50_ms']:+.2f} ms; per round "
        f"{', '.join(f'{v:+.2f}' for v in lat['round_minus_direct_p50_ms']['client-json'])}"
    )
    console.print(
        f"idle agent with the ONNX-only bundle ({onnx['runtime']}): RSS "
        f"{onnx['idle']['rss_kib_median'] * 1024 / MB:.1f} MB "
        f"({onnx['idle']['rss_kib_median'] / 1024:.1f} MiB; goal <= {RSS_GOAL_MB:g} MB): "
        f"{verdict(met['idle_rss'])}; CPU {onnx['idle']['cpu_pct_of_one_core']:.2f}% "
        f"(goal <= {CPU_GOAL_PCT:g}%): {verdict(met['idle_cpu'])}"
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        if spec["op"] == "direct":
            child_direct(spec)
        else:
            sys.stdout.write(json.dumps(child_footprint(spec)) + "\n")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests",
        type=int,
        default=500,
        help="per method, for the goal's case (example-tls; default 500)",
    )
    parser.add_argument(
        "--requests-other",
        type=int,
        default=100,
        help="per method, for the other cases (default 100)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--idle-s", type=float, default=20, help="idle sampling (default 20)")
    parser.add_argument(
        "--max-quiet-wait",
        type=float,
        default=20,
        help="seconds to wait for other processes to go quiet before measuring (default 20)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    opts = parser.parse_args()
    if min(opts.requests, opts.requests_other) < opts.rounds or opts.rounds < 1:
        parser.error("need --requests and --requests-other >= --rounds >= 1")
    if opts.idle_s <= 0:
        parser.error("need --idle-s > 0")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_benchmark(opts, log)
    if opts.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
