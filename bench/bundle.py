"""Benchmark: build, sign and verify a bundle, against a plain streaming SHA-256 of the same bytes.

One command::

    .venv/bin/python bench/bundle.py [--size-mb 200] [--json]

It makes a model directory of ``--size-mb`` MB (random weights, written 1 MiB at a time), then
runs every operation in its own child process so that each one's peak memory (``VmHWM``) is its
own:

- ``sha256``: a plain streaming SHA-256 of the signed bundle file (1 MiB reads, hashlib). This is
  the limit: verify cannot read and hash the bytes faster than this.
- ``build``: :func:`shared.bundle.build_bundle`.
- ``sign``: what ``edgefleet bundle sign`` does (:func:`shared.trust.sign_release` then
  :func:`shared.bundle.write_signed_copy`), with a key directory created beforehand.
- ``verify``: what ``edgefleet bundle verify`` does (``open_bundle``, ``verify_release``,
  ``check_payload``).

Every operation runs ``--repeat`` times (default 3) and the median is reported. ``sha256`` and
``verify`` run alternately, after one untimed warm-up read, so both read the bundle from the warm
page cache. Each timing covers the operation only, not interpreter start-up and imports (reported
separately as the process wall time). Build and sign include their ``fsync`` of the output.

To show that memory does not grow with the bundle, build, sign and verify are also run on a
bundle a quarter of the size, and the peak memory of both runs is compared.

Goals (from the issue): verify throughput >= 70% of the plain SHA-256, and verify's peak memory
grows by less than 16 MiB between the small and the full bundle. The exit status is 0 whether or
not the goals are met: this is a measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
MB = 1_000_000
CHUNK = MIB
RATIO_GOAL = 0.70
GROWTH_GOAL_MIB = 16.0
MODEL_SPEC = {
    "name": "bench",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}],
    "artifacts": [
        {"format": "onnx", "precision": "fp32", "files": ["onnx/model.onnx", "weights/model.bin"]}
    ],
}


# -- child side: one operation per process -------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_rss_kib() -> int:
    peak = _proc_status_kib("VmHWM")
    if peak is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            peak //= 1024
    return peak


def _op_sha256(args: dict[str, Any]) -> int:
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(args["path"], "rb", buffering=0) as f:
        while got := f.readinto(buffer):
            digest.update(view[:got])
            size += got
    return size


def _op_build(args: dict[str, Any]) -> int:
    from shared.bundle import build_bundle

    manifest = build_bundle(
        Path(args["model_dir"]), name=args["name"], version="1.0.0", out=Path(args["out"])
    )
    return manifest.total_size


def _op_sign(args: dict[str, Any]) -> int:
    from datetime import UTC, datetime, timedelta

    from shared.bundle import inspect_bundle, write_signed_copy
    from shared.keystore import KeyStore
    from shared.trust import sign_release

    bundle = Path(args["bundle"])
    store = KeyStore.open(Path(args["keys"]))
    header = inspect_bundle(bundle)
    _, files = sign_release(store, header, expires_in=timedelta(days=30), now=datetime.now(UTC))
    write_signed_copy(bundle, files)
    return header.manifest.total_size


def _op_verify(args: dict[str, Any]) -> int:
    from shared.bundle import check_payload, open_bundle
    from shared.trust import verify_release

    trusted_root = Path(args["trust"]).read_bytes()
    stream, reader, header, first = open_bundle(Path(args["bundle"]))
    with stream:
        verify_release(header, trusted_root)
        check_payload(reader, header.manifest, first)
    return header.manifest.total_size


def _op_keys(args: dict[str, Any]) -> int:
    from datetime import UTC, datetime

    from shared.keystore import KeyStore

    KeyStore.create(Path(args["keys"]), now=datetime.now(UTC))
    return 0


OPS = {
    "sha256": _op_sha256,
    "build": _op_build,
    "sign": _op_sign,
    "verify": _op_verify,
    "keys": _op_keys,
}


def _preload(op: str) -> None:
    """Import what an operation needs before timing it (imports are start-up, not work)."""
    if op == "sha256":
        return
    sys.path.insert(0, str(REPO))
    import shared.bundle
    import shared.keystore
    import shared.trust  # noqa: F401


def child_main(spec: str) -> None:
    args = json.loads(spec)
    op = args["op"]
    _preload(op)
    rss_before = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    nbytes = OPS[op](args)
    seconds = time.perf_counter() - start
    result = {
        "op": op,
        "bytes": nbytes,
        "seconds": seconds,
        "peak_rss_kib": _peak_rss_kib(),
        "rss_before_kib": rss_before,
    }
    sys.stdout.write(json.dumps(result) + "\n")


# -- parent side ---------------------------------------------------------------------------------


def run_child(op: str, **args: Any) -> dict[str, Any]:
    """Run one operation in a fresh interpreter; return its figures plus the process wall time."""
    spec = json.dumps({"op": op, **{k: str(v) for k, v in args.items()}})
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", spec],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{op} failed (exit {proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = wall
    return result


def make_model_dir(root: Path, size_bytes: int) -> Path:
    """A model directory with ``size_bytes`` of random weights, written 1 MiB at a time."""
    root.mkdir(parents=True)
    (root / "model.json").write_text(json.dumps(MODEL_SPEC, indent=2) + "\n")
    (root / "onnx").mkdir()
    (root / "onnx" / "model.onnx").write_bytes(os.urandom(4096))
    (root / "weights").mkdir()
    with (root / "weights" / "model.bin").open("wb") as f:
        remaining = size_bytes
        while remaining > 0:
            n = min(remaining, CHUNK)
            f.write(os.urandom(n))
            remaining -= n
    return root


def machine_info() -> dict[str, Any]:
    import ssl

    sys.path.insert(0, str(REPO))
    from bench import common  # imported here: the measured children must not load it

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return common.machine_info(sha_extensions=" sha_ni" in flags, openssl=ssl.OPENSSL_VERSION)


def _mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else float("inf")


def _mib(kib: int) -> float:
    return kib / 1024


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    speeds = [_mb_s(r["bytes"], r["seconds"]) for r in runs]
    return {
        "runs": len(runs),
        "bytes": runs[0]["bytes"],
        "seconds_median": statistics.median(r["seconds"] for r in runs),
        "mb_per_s_median": statistics.median(speeds),
        "mb_per_s_all": [round(s, 1) for s in speeds],
        "process_seconds_median": statistics.median(r["process_seconds"] for r in runs),
        "peak_rss_mib": round(_mib(max(r["peak_rss_kib"] for r in runs)), 1),
        "rss_before_mib": round(_mib(max(r["rss_before_kib"] or 0 for r in runs)), 1),
    }


def run_benchmark(size_mb: float, repeat: int, log: Any) -> dict[str, Any]:
    size = int(size_mb * MB)
    small = size // 4
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp_name:
        tmp = Path(tmp_name)
        keys = tmp / "keys"
        log(f"writing model directories ({size / MB:.0f} MB and {small / MB:.0f} MB)...")
        model = make_model_dir(tmp / "model", size)
        model_small = make_model_dir(tmp / "model-small", small)
        bundle = tmp / "bench.bundle"
        bundle_small = tmp / "bench-small.bundle"
        log("creating a key directory...")
        run_child("keys", keys=keys)

        results: dict[str, Any] = {}
        for label, model_dir, out, name in (
            ("full", model, bundle, "bench"),
            ("quarter", model_small, bundle_small, "bench-small"),
        ):
            log(f"build + sign ({label})...")
            results[f"build_{label}"] = _summary(
                [run_child("build", model_dir=model_dir, out=out, name=name) for _ in range(repeat)]
            )
            # Signing the same release again is allowed (same manifest): it keeps the counter.
            results[f"sign_{label}"] = _summary(
                [run_child("sign", bundle=out, keys=keys) for _ in range(repeat)]
            )

        trust = keys / "root.json"
        bundle_bytes = bundle.stat().st_size
        run_child("sha256", path=bundle)  # warm-up: the bundle is in the page cache for both
        sha_runs, verify_runs = [], []
        for i in range(repeat):
            log(f"sha256 / verify, round {i + 1} of {repeat}...")
            sha_runs.append(run_child("sha256", path=bundle))
            verify_runs.append(run_child("verify", bundle=bundle, trust=trust))
        results["sha256_full"] = _summary(sha_runs)
        results["verify_full"] = _summary(verify_runs)
        log("verify (quarter size)...")
        results["verify_quarter"] = _summary(
            [run_child("verify", bundle=bundle_small, trust=trust) for _ in range(repeat)]
        )

    ratio = results["verify_full"]["mb_per_s_median"] / results["sha256_full"]["mb_per_s_median"]
    growth = {
        op: round(
            results[f"{op}_full"]["peak_rss_mib"] - results[f"{op}_quarter"]["peak_rss_mib"], 1
        )
        for op in ("build", "sign", "verify")
    }
    return {
        "benchmark": "bundle",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "machine": machine_info(),
        "units": {"throughput": "MB/s (10^6 bytes)", "memory": "MiB (peak RSS, VmHWM)"},
        "size_bytes": {"payload_full": size + 4096, "payload_quarter": small + 4096},
        "bundle_bytes": bundle_bytes,
        "results": results,
        "verify_vs_sha256": round(ratio, 3),
        "verify_peak_growth_mib": growth["verify"],
        "peak_growth_mib": growth,
        "goals": {
            "verify_vs_sha256_min": RATIO_GOAL,
            "verify_peak_growth_max_mib": GROWTH_GOAL_MIB,
        },
        "goal_met": {
            "throughput": ratio >= RATIO_GOAL,
            "memory": growth["verify"] < GROWTH_GOAL_MIB,
        },
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 130)  # do not wrap the table in logs and pipes
    m = report["machine"]
    console.print(f"[bold]command:[/] {report['command']}")
    console.print(
        f"[bold]machine:[/] {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"SHA extensions: {'yes' if m['sha_extensions'] else 'no'}, Python {m['python']}, "
        f"{m['openssl']}, {m['os']}"
    )
    r = report["results"]
    sizes = report["size_bytes"]
    table = Table(title="bundle benchmark (throughput in MB/s of payload bytes, median)")
    columns = (
        "operation",
        "payload MB",
        "runs",
        "seconds",
        "MB/s",
        "MB/s min-max",
        "process s",
        "RSS before MiB",
        "peak RSS MiB",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "operation" else "right")
    rows = (
        ("sha256 (limit)", "sha256_full", "full"),
        ("build", "build_full", "full"),
        ("sign", "sign_full", "full"),
        ("verify", "verify_full", "full"),
        ("build, 1/4 size", "build_quarter", "quarter"),
        ("sign, 1/4 size", "sign_quarter", "quarter"),
        ("verify, 1/4 size", "verify_quarter", "quarter"),
    )
    for label, key, which in rows:
        s = r[key]
        table.add_row(
            label,
            f"{sizes['payload_' + which] / MB:.1f}",
            str(s["runs"]),
            f"{s['seconds_median']:.3f}",
            f"{s['mb_per_s_median']:.0f}",
            f"{min(s['mb_per_s_all']):.0f}-{max(s['mb_per_s_all']):.0f}",
            f"{s['process_seconds_median']:.2f}",
            f"{s['rss_before_mib']:.1f}",
            f"{s['peak_rss_mib']:.1f}",
        )
    console.print(table)
    met = report["goal_met"]

    def verdict(ok: bool) -> str:
        return "[green]MET[/]" if ok else "[red]NOT MET[/]"

    console.print(
        f"verify / sha256 = {report['verify_vs_sha256']:.2f} (goal >= {RATIO_GOAL:.2f}): "
        f"{verdict(met['throughput'])}"
    )
    growth = report["peak_growth_mib"]
    console.print(
        f"verify peak RSS growth, 1/4 size -> full size = {growth['verify']:+.1f} MiB "
        f"(goal < {GROWTH_GOAL_MIB:.0f} MiB): {verdict(met['memory'])}"
        f"  [dim](build {growth['build']:+.1f}, sign {growth['sign']:+.1f})[/]"
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=200, help="payload size (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each operation (default 3)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    opts = parser.parse_args()
    if opts.size_mb <= 0 or opts.repeat < 1:
        parser.error("--size-mb must be > 0 and --repeat >= 1")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_benchmark(opts.size_mb, opts.repeat, log)
    if opts.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
