"""The chunked transfer state machine, driven against an in-memory fetch server.

Pure pair tests (mqttproto / h11 style): the agent's :class:`Transfer` and a tiny server that
answers each ``RequestChunks`` with real ``down/fetch`` frames (``shared.protocol``), with seeded
fault injection and a discrete-event network on a fake clock. Nothing sleeps, nothing touches
a socket or the disk. The driver checks on every step that nothing already verified is asked
for again, that every written chunk is byte-exact and written once, and that memory stays
within the window.
"""

from __future__ import annotations

import doctest
import hashlib
import heapq
import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass, field

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.transfer
from agent.transfer import (
    FAILURE_CLASSES,
    ChunkKey,
    ChunkSpec,
    Completed,
    ErrorReceived,
    Event,
    Failed,
    PartReceived,
    Progress,
    Reconnected,
    RequestChunks,
    Start,
    Tick,
    Transfer,
    TransferLimits,
    TransferState,
    TransferUsageError,
    WriteChunk,
    describe_transitions,
    plan_chunks,
    plan_local_copies,
)
from shared.manifest import Manifest
from shared.protocol import ChunkRef, FetchRequest, FetchResponse, decode_frame, encode_frame

CHUNK = 4096  # the smallest chunk_size a manifest allows
PART = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def manifest_for(files: dict[str, bytes], *, chunk_size: int | None = CHUNK) -> Manifest:
    entries = []
    for path, data in files.items():
        entry: dict[str, object] = {"path": path, "size": len(data), "sha256": sha(data)}
        if chunk_size is not None:
            entry["chunks"] = [
                sha(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size)
            ]
        entries.append(entry)
    doc: dict[str, object] = {
        "format": "edgefleet-bundle",
        "format_version": "1.0" if chunk_size is None else "1.1",
        "name": "cnn",
        "version": "2.0.0",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}],
        "artifacts": [{"format": "onnx", "files": [next(iter(files))]}],
        "files": entries,
    }
    if chunk_size is not None:
        doc["chunk_size"] = chunk_size
    return Manifest.model_validate(doc)


# --- the in-memory fetch server -----------------------------------------------------------------


@dataclass
class Faults:
    drop: float = 0.0  # probability that a part is lost
    duplicate: float = 0.0  # probability that a part is delivered a second time, later
    reorder: bool = False  # random delivery delays (0-2 s) instead of in order
    corrupt_rate: float = 0.0  # probability that a part has one byte flipped
    corrupt: dict[ChunkKey, int] = field(default_factory=dict)  # key -> answers to corrupt
    errors: dict[ChunkKey, int] = field(default_factory=dict)  # key -> answers with status 500
    not_found: frozenset[str] = frozenset()  # files answered with status 404
    unsolicited: int = 0  # parts per request for chunks not asked for (or not in the bundle)
    beyond: int = 0  # parts per request that reach past the chunk's end or lie about its size
    only_bogus: int = 0  # a malicious server: this many bogus parts per request, no data
    drip_s: float = 0.0  # slow drip: one part every drip_s seconds, whatever was asked
    silent: bool = False  # the link is down: requests and answers are lost


class Server:
    """Answers chunk requests from ``files`` with real ``down/fetch`` frames."""

    LATENCY_S = 0.05

    def __init__(
        self,
        files: dict[str, bytes],
        *,
        chunk_size: int = CHUNK,
        part_size: int = PART,
        faults: Faults | None = None,
        seed: int = 0,
    ) -> None:
        self.files = files
        self.chunk_size = chunk_size
        self.part_size = part_size
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.requests: list[FetchRequest] = []
        self.dropped: set[ChunkKey] = set()  # chunks that lost at least one part
        self.max_frame = 0
        self._next_drip = 0.0

    def chunk(self, file: str, index: int) -> bytes:
        start = index * self.chunk_size
        return self.files[file][start : start + self.chunk_size]

    def answer(self, action: RequestChunks, now: float) -> list[tuple[float, bytes]]:
        """The frames answering one request, each with its delivery time."""
        request = FetchRequest(
            request_id=action.request_id,
            kind="chunks",
            chunks=[ChunkRef(file=f, index=i) for f, i in action.chunks],
        )
        self.requests.append(request)
        faults = self.faults
        if faults.silent:
            return []
        frames: list[tuple[float, bytes]] = []
        if faults.only_bogus:
            for _ in range(faults.only_bogus):
                junk = b"\xee" * PART  # runs past the end of chunk 0
                frames.append((now, self._frame(request, "m.bin", 0, CHUNK - 10, CHUNK, junk)))
            return frames
        for ref in request.chunks:
            key = (ref.file, ref.index)
            if ref.file in faults.not_found:
                frames.append((now, self._error(request, ref, 404, "no such target")))
                continue
            if faults.errors.get(key, 0) > 0:
                faults.errors[key] -= 1
                frames.append((now, self._error(request, ref, 500, "store busy")))
                continue
            data = self.chunk(ref.file, ref.index)
            corrupt_part = -1
            if faults.corrupt.get(key, 0) > 0:
                faults.corrupt[key] -= 1
                corrupt_part = self.rng.randrange(-(-len(data) // self.part_size))
            for n, offset in enumerate(range(0, len(data), self.part_size)):
                part = bytearray(data[offset : offset + self.part_size])
                if n == corrupt_part or self.rng.random() < faults.corrupt_rate:
                    part[self.rng.randrange(len(part))] ^= 0x01
                if self.rng.random() < faults.drop:
                    self.dropped.add(key)
                    continue
                frame = self._frame(request, ref.file, ref.index, offset, len(data), bytes(part))
                frames.append((self._when(now), frame))
                if self.rng.random() < faults.duplicate:
                    frames.append((self._when(now) + 1.0, frame))
        frames.extend((self._when(now), f) for f in self._bogus(request))
        return frames

    def _bogus(self, request: FetchRequest) -> list[bytes]:
        faults = self.faults
        asked = {(r.file, r.index) for r in request.chunks}
        others = [
            (f, i)
            for f, data in self.files.items()
            for i in range(-(-len(data) // self.chunk_size))
            if (f, i) not in asked
        ]
        frames = []
        for n in range(faults.unsolicited):
            if n % 2 or not others:
                frames.append(self._frame(request, "evil.py", 0, 0, 16, b"import os" * 2))
            else:
                f, i = self.rng.choice(others)
                data = self.chunk(f, i)
                frames.append(self._frame(request, f, i, 0, len(data), data[: self.part_size]))
        for n in range(faults.beyond):
            ref = request.chunks[n % len(request.chunks)]
            size = len(self.chunk(ref.file, ref.index))
            junk = b"\xee" * self.part_size
            if n % 2:  # claims the chunk is twice its signed size
                frames.append(self._frame(request, ref.file, ref.index, size, 2 * size, junk))
            else:  # the right total, but the bytes run past the chunk's end
                frames.append(self._frame(request, ref.file, ref.index, size - 10, size, junk))
        return frames

    def _when(self, now: float) -> float:
        if self.faults.drip_s:
            self._next_drip = max(self._next_drip, now) + self.faults.drip_s
            return self._next_drip
        if self.faults.reorder:
            return now + self.rng.uniform(0.0, 2.0)
        return now + self.LATENCY_S

    def _frame(
        self, request: FetchRequest, file: str, index: int, offset: int, total: int, data: bytes
    ) -> bytes:
        header = FetchResponse(
            request_id=request.request_id,
            kind="chunk",
            file=file,
            index=index,
            offset=offset,
            total=total,
        )
        frame = encode_frame(header, data)
        self.max_frame = max(self.max_frame, len(frame))
        return frame

    def _error(self, request: FetchRequest, ref: ChunkRef, status: int, message: str) -> bytes:
        header = FetchResponse(
            request_id=request.request_id,
            kind="error",
            file=ref.file,
            index=ref.index,
            error=message,
            status=status,
        )
        return encode_frame(header)


# --- the driver: a fake clock, a network queue, a disk of bytearrays ----------------------------


def event_for(frame: bytes, now: float) -> Event:
    header, data = decode_frame(frame)
    file = header.file or ""
    index = -1 if header.index is None else header.index
    if header.kind == "error":
        return ErrorReceived(now, header.error or "", header.status, header.file, header.index)
    total = -1 if header.total is None else header.total
    return PartReceived(now, file, index, header.offset, total, data)


@dataclass
class Run:
    """Everything one drive observed."""

    result: Completed | Failed | None = None
    disk: dict[str, bytearray] = field(default_factory=dict)
    requested: Counter[ChunkKey] = field(default_factory=Counter)
    request_times: dict[ChunkKey, list[float]] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)
    written: list[ChunkKey] = field(default_factory=list)
    progress: list[Progress] = field(default_factory=list)
    max_buffered: int = 0
    now: float = 0.0

    @property
    def failure(self) -> Failed:
        assert isinstance(self.result, Failed), self.result
        return self.result


def drive(
    transfer: Transfer,
    server: Server,
    *,
    expected: dict[str, bytes],
    disk: dict[str, bytearray] | None = None,
    now: float = 0.0,
    tick_s: float = 1.0,
    limits: TransferLimits | None = None,
    stop_after_writes: int | None = None,
    outage: tuple[float, float] | None = None,
    max_steps: int = 200_000,
) -> Run:
    """Run ``transfer`` against ``server`` until it completes or fails (or ``stop_after_writes``
    chunks are written: a simulated crash), checking the invariants on every step.

    During ``outage`` (down, up) every request and frame is lost; the first step at or after
    ``up`` hands the transfer ``Reconnected``.
    """

    def link_up(at: float) -> bool:
        return outage is None or not outage[0] <= at < outage[1]

    limits = limits or TransferLimits()
    largest = max((len(server.chunk(f, 0)) for f in expected if expected[f]), default=0)
    run = Run(
        disk=disk if disk is not None else {f: bytearray(len(d)) for f, d in expected.items()}
    )
    verified: set[ChunkKey] = set()
    network: list[tuple[float, int, bytes]] = []
    order = itertools.count()
    fed = 0

    def execute(actions: list[agent.transfer.Action]) -> None:
        for action in actions:
            assert run.result is None, f"{action} after {run.result}"
            match action:
                case RequestChunks(request_id=rid, chunks=keys):
                    assert not verified & set(keys), f"verified chunks asked again: {keys}"
                    assert 1 <= len(keys) <= limits.chunks_per_request
                    run.request_ids.append(rid)
                    run.requested.update(keys)
                    for key in keys:
                        run.request_times.setdefault(key, []).append(run.now)
                    answers = server.answer(action, run.now) if link_up(run.now) else []
                    for at, frame in answers:
                        heapq.heappush(network, (at, next(order), frame))
                case WriteChunk(chunk=spec, data=data):
                    assert spec.key in run.requested, f"{spec.key} written but never asked for"
                    assert spec.key not in verified, f"{spec.key} written twice"
                    end = spec.offset + spec.size
                    assert data == expected[spec.file][spec.offset : end], "wrong bytes written"
                    verified.add(spec.key)
                    run.written.append(spec.key)
                    run.disk[spec.file][spec.offset : end] = data
                case Progress():
                    run.progress.append(action)
                case Completed() | Failed():
                    run.result = action

    run.now = now
    execute(transfer.handle(Start(now)))
    next_tick = now + tick_s
    down = outage is not None
    for _ in range(max_steps):
        if run.result is not None:
            return run
        if stop_after_writes is not None and len(run.written) >= stop_after_writes:
            return run
        if down and outage is not None and run.now >= outage[1]:
            down = False
            event: Event = Reconnected(run.now)
        elif network and network[0][0] <= next_tick:
            at, _, frame = heapq.heappop(network)
            run.now = max(run.now, at)
            if not link_up(at):
                continue
            event = event_for(frame, run.now)
            if isinstance(event, PartReceived):
                fed += len(event.data)
        else:
            run.now = next_tick
            next_tick += tick_s
            event = Tick(run.now)
        execute(transfer.handle(event))
        run.max_buffered = max(run.max_buffered, transfer.buffered_bytes)
        assert transfer.buffered_bytes <= limits.window_chunks * largest
        assert len(transfer.outstanding) <= limits.window_chunks
        assert transfer.received_bytes + transfer.wasted_bytes == fed
    raise AssertionError(f"no outcome after {max_steps} steps (state {transfer.state})")


def setup(
    sizes: dict[str, int], *, seed: int = 1, chunk_size: int = CHUNK
) -> tuple[dict[str, bytes], list[ChunkSpec]]:
    files = {path: payload(seed + n, size) for n, (path, size) in enumerate(sizes.items())}
    return files, plan_chunks(manifest_for(files, chunk_size=chunk_size))


def assert_complete(run: Run, files: dict[str, bytes]) -> None:
    assert isinstance(run.result, Completed), run.result
    assert {f: bytes(b) for f, b in run.disk.items()} == files


# --- the happy path, the window, the wire -------------------------------------------------------


def test_clean_transfer_completes_byte_exact_with_progress():
    files, plan = setup({"m.bin": 10 * CHUNK + 123, "labels.txt": 100})
    transfer = Transfer(plan)
    run = drive(transfer, Server(files), expected=files)
    assert_complete(run, files)
    assert set(run.requested.values()) == {1}  # every chunk asked for exactly once
    assert transfer.received_bytes == transfer.total_bytes == sum(map(len, files.values()))
    assert transfer.wasted_bytes == 0
    assert run.progress[-1] == Progress(transfer.total_bytes, transfer.total_bytes)
    assert [p.done_bytes for p in run.progress] == sorted(p.done_bytes for p in run.progress)
    assert transfer.state is TransferState.COMPLETE
    assert not transfer.missing


def test_parts_fit_under_the_broker_message_limit():
    # 64 KiB chunks sent as 16 KiB parts: every MQTT message stays under a 20 KiB broker limit,
    # which a whole chunk in one message would exceed.
    broker_max_packet = 20 * 1024
    chunk = 64 * 1024
    files, plan = setup({"model.onnx": 1024 * 1024 + 5000}, chunk_size=chunk)
    server = Server(files, chunk_size=chunk, part_size=16 * 1024)
    run = drive(Transfer(plan), server, expected=files)
    assert_complete(run, files)
    assert server.max_frame < broker_max_packet < chunk
    assert all(len(r.chunks) <= 4 for r in server.requests)


def test_start_fills_the_window_in_groups_and_refills_per_request_worth():
    files, plan = setup({"m.bin": 20 * CHUNK})
    transfer = Transfer(plan, limits=TransferLimits(window_chunks=8, chunks_per_request=4))
    first = transfer.handle(Start(0.0))
    assert first == [
        RequestChunks("t-1", tuple(("m.bin", i) for i in range(4))),
        RequestChunks("t-2", tuple(("m.bin", i) for i in range(4, 8))),
    ]
    data = files["m.bin"]

    def deliver(index: int) -> list[agent.transfer.Action]:
        chunk = data[index * CHUNK : (index + 1) * CHUNK]
        return transfer.handle(PartReceived(1.0, "m.bin", index, 0, CHUNK, chunk))

    for index in range(3):  # three free slots: less than a request's worth, nothing asked
        assert [type(a) for a in deliver(index)] == [WriteChunk, Progress]
    refill = deliver(3)
    assert refill[-1] == RequestChunks("t-3", tuple(("m.bin", i) for i in range(8, 12)))
    assert transfer.outstanding == {("m.bin", i) for i in range(4, 12)}


def test_nothing_missing_completes_at_start():
    _files, plan = setup({"m.bin": 3 * CHUNK})
    transfer = Transfer(plan, have=[c.key for c in plan])
    assert transfer.handle(Start(0.0)) == [Completed()]
    assert transfer.total_bytes == 0
    assert Transfer([]).handle(Start(0.0)) == [Completed()]


# --- faults: loss, duplicates, reordering, corruption, bogus data -------------------------------


def test_lost_parts_only_missing_chunks_are_asked_again():
    # Row 24: 10% of parts dropped; only chunks that lost a part are asked for again.
    files, plan = setup({"m.bin": 40 * CHUNK + 77})
    server = Server(files, faults=Faults(drop=0.1), seed=7)
    transfer = Transfer(plan)
    run = drive(transfer, server, expected=files)
    assert_complete(run, files)
    asked_again = {key for key, n in run.requested.items() if n > 1}
    assert asked_again, "the seed should lose some parts"
    assert asked_again <= server.dropped
    assert len(asked_again) < len(plan)


def test_duplicates_and_reordering_do_no_harm():
    # Row 23: QoS 1 redelivery and shuffled order; offset-addressed, written once, exact.
    files, plan = setup({"m.bin": 30 * CHUNK, "b.bin": 5 * CHUNK + 1})
    server = Server(files, faults=Faults(duplicate=0.5, reorder=True), seed=3)
    transfer = Transfer(plan)
    run = drive(transfer, server, expected=files)
    assert_complete(run, files)
    assert set(run.requested.values()) == {1}
    assert len(run.written) == len(set(run.written)) == len(plan)
    assert transfer.wasted_bytes > 0  # the duplicates, counted and dropped


def test_overlapping_parts_fill_gaps_and_count_only_the_overlap_as_waste():
    data = payload(5, CHUNK)
    transfer = Transfer([ChunkSpec("m.bin", 0, 0, CHUNK, sha(data))])
    transfer.handle(Start(0.0))
    for start, end in [(1000, 3000), (0, 1500), (2500, 2600), (2999, 4096)]:
        actions = transfer.handle(PartReceived(1.0, "m.bin", 0, start, CHUNK, data[start:end]))
    assert [type(a) for a in actions] == [WriteChunk, Progress, Completed]
    assert actions[0] == WriteChunk(ChunkSpec("m.bin", 0, 0, CHUNK, sha(data)), data)
    assert transfer.received_bytes == CHUNK
    assert transfer.wasted_bytes == 2000 + 1500 + 100 + 1097 - CHUNK


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_covering_set_of_parts_reassembles_the_chunk(data: st.DataObject):
    size = data.draw(st.integers(1, 300))
    chunk = payload(size, size)
    cuts = sorted(data.draw(st.lists(st.integers(0, size), max_size=8)))
    edges = [0, *cuts, size]
    pieces = [(a, b) for a, b in itertools.pairwise(edges) if a < b]  # covers the chunk exactly
    extra = data.draw(
        st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 50)), max_size=20)
    )
    parts = pieces + [(a, min(size, a + n)) for a, n in extra]
    order = data.draw(st.permutations(parts))
    # Another chunk keeps the transfer open (and the endless-data cap high) after "f" is done.
    other = ChunkSpec("g", 0, 0, CHUNK, "0" * 64)
    transfer = Transfer([ChunkSpec("f", 0, 0, size, sha(chunk)), other])
    transfer.handle(Start(0.0))
    written = []
    for a, b in order:
        for action in transfer.handle(PartReceived(0.0, "f", 0, a, size, chunk[a:b])):
            if isinstance(action, WriteChunk):
                written.append(action.data)
    assert written == [chunk]
    assert transfer.received_bytes == size
    assert transfer.wasted_bytes == sum(b - a for a, b in parts) - size


def test_one_corrupted_part_costs_one_request_then_succeeds():
    files, plan = setup({"m.bin": 12 * CHUNK})
    server = Server(files, faults=Faults(corrupt={("m.bin", 5): 1}), seed=1)
    transfer = Transfer(plan)
    run = drive(transfer, server, expected=files)
    assert_complete(run, files)
    assert run.requested[("m.bin", 5)] == 2
    assert {n for key, n in run.requested.items() if key != ("m.bin", 5)} == {1}


def test_persistent_corruption_fails_integrity_with_both_digests():
    files, plan = setup({"m.bin": 12 * CHUNK})
    server = Server(files, faults=Faults(corrupt={("m.bin", 5): 1000}), seed=1)
    transfer = Transfer(plan)
    run = drive(transfer, server, expected=files)
    expected = plan[5].sha256[:12]
    assert run.failure.failure_class == "integrity"
    assert re.fullmatch(
        rf"m\.bin chunk 5: sha256 mismatch 5 times \(expected {expected}\.\.\., "
        r"got [0-9a-f]{12}\.\.\.\)",
        run.failure.reason,
    )
    assert run.requested[("m.bin", 5)] == TransferLimits().max_attempts
    assert ("m.bin", 5) not in run.written
    assert transfer.buffered_bytes == 0
    assert not transfer.outstanding
    assert transfer.state is TransferState.FAILED


def test_parts_never_asked_for_or_past_the_chunk_end_are_never_written():
    files, plan = setup({"m.bin": 16 * CHUNK})
    server = Server(files, faults=Faults(unsolicited=2, beyond=2), seed=2)
    transfer = Transfer(plan)
    run = drive(transfer, server, expected=files)  # asserts every write was asked and exact
    assert_complete(run, files)
    assert transfer.wasted_bytes > 0
    assert set(run.requested.values()) == {1}


def test_endless_data_fails_at_the_signed_size_with_bounded_memory():
    # Row 21: a malicious server floods parts that fit no chunk; abort once they outweigh the
    # signed size (plus one chunk), never buffering any of it.
    files, plan = setup({"m.bin": 4 * CHUNK})
    server = Server(files, faults=Faults(only_bogus=1000), seed=0)
    transfer = Transfer(plan)
    run = drive(transfer, server, expected=files)
    assert run.failure.failure_class == "endless-data"
    cap = 5 * CHUNK
    assert cap < transfer.wasted_bytes <= cap + PART
    assert run.max_buffered == 0
    assert not run.written
    assert f"more than the {4 * CHUNK} bytes to fetch plus one chunk (limit {cap})" in (
        run.failure.reason
    )
    assert "'m.bin' chunk 0 at offset 4086 of 4096 (outside the chunk's 4096 bytes)" in (
        run.failure.reason
    )


# --- time: timeouts, slow retrieval, deadline ---------------------------------------------------


def test_slow_drip_fails_slow_retrieval_with_the_numbers():
    # Row 22: one part every (timeout - 1 s): never a timeout, but far below the floor.
    files, plan = setup({"m.bin": 16 * CHUNK})
    server = Server(files, faults=Faults(drip_s=9.0))
    run = drive(Transfer(plan), server, expected=files)
    assert run.failure.failure_class == "slow-retrieval"
    assert 30.0 <= run.now <= 31.0
    match = re.match(
        r"(\d+) B/s over the last 30 s, below the minimum 1024 B/s", run.failure.reason
    )
    assert match
    assert int(match[1]) < 1024


def test_deadline_bounds_the_whole_transfer():
    files, plan = setup({"m.bin": 16 * CHUNK})
    limits = TransferLimits(min_bytes_per_s=0, deadline_s=120, max_attempts=1000)
    server = Server(files, faults=Faults(drip_s=9.0))
    transfer = Transfer(plan, limits=limits)
    run = drive(transfer, server, expected=files, limits=limits)
    assert run.failure.failure_class == "deadline"
    assert 120 < run.now <= 121
    assert re.match(
        r"not complete 121\.0 s after start \(deadline 120 s\): \d+ of 65536 bytes",
        run.failure.reason,
    )


def test_silent_server_exhausts_retries_after_max_attempts():
    files, plan = setup({"m.bin": 2 * CHUNK})
    limits = TransferLimits(min_bytes_per_s=0)
    run = drive(
        Transfer(plan, limits=limits),
        Server(files, faults=Faults(silent=True)),
        expected=files,
        limits=limits,
    )
    assert run.failure.failure_class == "retries-exhausted"
    assert run.failure.reason == (
        "m.bin chunk 0: incomplete after 5 requests (0 of 4096 bytes received; last: no request "
        "or part for 10 s)"
    )
    assert run.requested == {("m.bin", 0): 5, ("m.bin", 1): 5}
    times = run.request_times[("m.bin", 0)]
    assert [b - a for a, b in itertools.pairwise(times)] == [11.0] * 4


def test_not_found_fails_at_once():
    files, plan = setup({"m.bin": 2 * CHUNK})
    server = Server(files, faults=Faults(not_found=frozenset({"m.bin"})))
    run = drive(Transfer(plan), server, expected=files)
    assert run.failure == Failed(
        "not-found", "the fleet answered 404 for 'm.bin' chunk 0: no such target"
    )


def test_other_errors_are_asked_again_on_the_next_tick():
    files, plan = setup({"m.bin": 6 * CHUNK})
    server = Server(files, faults=Faults(errors={("m.bin", 2): 2}))
    run = drive(Transfer(plan), server, expected=files)
    assert_complete(run, files)
    assert run.request_times[("m.bin", 2)] == [0.0, 1.0, 2.0]  # each tick, not after 10 s


def test_errors_without_a_chunk_mark_every_outstanding_chunk():
    _files, plan = setup({"m.bin": 3 * CHUNK})
    transfer = Transfer(plan)
    transfer.handle(Start(0.0))
    assert transfer.handle(ErrorReceived(0.5, "overloaded", 503)) == []
    assert transfer.handle(Tick(1.0)) == [
        RequestChunks("t-2", (("m.bin", 0), ("m.bin", 1), ("m.bin", 2)))
    ]


# --- reconnect and restart ----------------------------------------------------------------------


def asked(actions: list[agent.transfer.Action]) -> list[ChunkKey]:
    return [key for a in actions if isinstance(a, RequestChunks) for key in a.chunks]


def test_reconnected_asks_again_for_everything_outstanding_without_counting_attempts():
    _files, plan = setup({"m.bin": 10 * CHUNK})
    transfer = Transfer(plan)
    outstanding = set(asked(transfer.handle(Start(0.0))))
    assert outstanding == transfer.outstanding == {("m.bin", i) for i in range(8)}
    for n in range(10):  # more reconnects than max_attempts: none of them counts
        again = transfer.handle(Reconnected(1.0 + n))
        assert set(asked(again)) == outstanding
    assert again == [
        RequestChunks("t-21", tuple(("m.bin", i) for i in range(4))),
        RequestChunks("t-22", tuple(("m.bin", i) for i in range(4, 8))),
    ]
    assert [type(a) for a in transfer.handle(Tick(11.0))] == []  # nothing timed out yet


def test_broker_restart_mid_transfer_recovers_and_completes():
    # Row 25: requests and answers in flight are lost while the broker restarts.
    files, plan = setup({"m.bin": 40 * CHUNK})
    server = Server(files, faults=Faults(reorder=True), seed=4)
    run = drive(Transfer(plan), server, expected=files, outage=(1.0, 8.0))
    assert_complete(run, files)
    reconnect_asks = [k for k, times in run.request_times.items() if 8.0 in times]
    assert reconnect_asks, "the outstanding chunks are asked for again at reconnect"
    assert all(t < 1.0 or t >= 8.0 for times in run.request_times.values() for t in times)


def test_reconnect_restarts_the_throughput_window():
    _files, plan = setup({"m.bin": 10 * CHUNK})
    transfer = Transfer(plan)
    transfer.handle(Start(0.0))
    transfer.handle(Reconnected(25.0))
    assert not any(isinstance(a, Failed) for a in transfer.handle(Tick(40.0)))
    assert [type(a) for a in transfer.handle(Tick(55.0))] == [Failed]
    without_reconnect = Transfer(plan)
    without_reconnect.handle(Start(0.0))
    [failed] = without_reconnect.handle(Tick(30.0))
    assert failed == Failed(
        "slow-retrieval",
        "0 B/s over the last 30 s, below the minimum 1024 B/s (0 useful bytes; 0 of 40960 bytes "
        "verified)",
    )


def test_restart_halfway_resumes_from_the_durable_record():
    # Row 26: the agent dies at 50%; the new transfer asks only for unverified chunks.
    files, plan = setup({"m.bin": 20 * CHUNK, "b.bin": 3 * CHUNK + 5})
    faults = Faults(drop=0.05, duplicate=0.2, reorder=True)
    first = drive(
        Transfer(plan),
        Server(files, faults=faults, seed=11),
        expected=files,
        stop_after_writes=len(plan) // 2,
    )
    assert first.result is None
    durable = set(first.written)  # what WriteChunk recorded before the crash

    transfer = Transfer(plan, have=durable, request_id_prefix="t2")
    second = drive(
        transfer, Server(files, faults=faults, seed=12), expected=files, disk=first.disk, now=500.0
    )
    assert_complete(second, files)
    assert not durable & set(second.requested)
    assert set(second.written) == {c.key for c in plan} - durable
    assert transfer.total_bytes == sum(c.size for c in plan if c.key not in durable)
    assert all(rid.startswith("t2-") for rid in second.request_ids)


# --- the state table and API misuse -------------------------------------------------------------


def test_state_table_in_the_docstring_is_generated_from_transitions():
    doc_lines = {line.strip() for line in (agent.transfer.__doc__ or "").splitlines()}
    for line in describe_transitions().splitlines():
        assert line.strip() in doc_lines, line


def test_docstring_example_runs():
    assert doctest.testmod(agent.transfer).failed == 0


def test_start_twice_is_a_usage_error_even_when_finished():
    transfer = Transfer([])
    transfer.handle(Start(0.0))
    with pytest.raises(TransferUsageError, match=r"Start is not allowed in state COMPLETE"):
        transfer.handle(Start(1.0))


def test_events_before_start_are_a_usage_error():
    with pytest.raises(
        TransferUsageError,
        match=r"Tick is not allowed in state IDLE \(allowed: "
        r"Start\)",
    ):
        Transfer([]).handle(Tick(0.0))


def test_terminal_states_ignore_late_events():
    files, plan = setup({"m.bin": 2 * CHUNK})
    transfer = Transfer(plan)
    transfer.handle(Start(0.0))
    assert transfer.handle(ErrorReceived(0.1, "gone", 404)) == [
        Failed("not-found", "the fleet answered 404 for the request: gone")
    ]
    data = files["m.bin"][:CHUNK]
    for event in (
        PartReceived(1.0, "m.bin", 0, 0, CHUNK, data),
        Tick(99.0),
        Reconnected(99.0),
        ErrorReceived(99.0, "x", 500),
    ):
        assert transfer.handle(event) == []
    assert transfer.state is TransferState.FAILED
    assert transfer.missing == {("m.bin", 0), ("m.bin", 1)}


def test_bad_values_are_refused_with_the_facts():
    with pytest.raises(ValueError, match=r"window_chunks must be >= 1, got 0; max_attempts"):
        TransferLimits(window_chunks=0, max_attempts=0)
    with pytest.raises(ValueError, match=r"chunks_per_request must be in 1\.\.256, got 300"):
        TransferLimits(chunks_per_request=300)
    with pytest.raises(ValueError, match=r"deadline_s must be a positive number of seconds"):
        TransferLimits(deadline_s=float("inf"))
    with pytest.raises(ValueError, match=r"'m' chunk 0: sha256 must be 64 lowercase hex"):
        ChunkSpec("m", 0, 0, 1, "ABC")
    with pytest.raises(ValueError, match=r"size must be >= 1 byte, got 0"):
        ChunkSpec("m", 0, 0, 0, "a" * 64)
    spec = ChunkSpec("m", 0, 0, 1, "a" * 64)
    with pytest.raises(ValueError, match=r"'m' chunk 0 is listed twice"):
        Transfer([spec, spec])
    with pytest.raises(ValueError, match=r"have names 1 chunks that are not in the plan"):
        Transfer([spec], have=[("m", 1)])
    with pytest.raises(ValueError, match=r"request_id_prefix must be 1-32 characters"):
        Transfer([spec], request_id_prefix="")


# --- random fault schedules ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 6 * CHUNK), min_size=1, max_size=3),
    drop=st.sampled_from([0.0, 0.05, 0.2, 0.4]),
    duplicate=st.sampled_from([0.0, 0.1, 0.5]),
    reorder=st.booleans(),
    corrupt_rate=st.sampled_from([0.0, 0.0, 0.05]),
    extras=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    part_size=st.sampled_from([512, 1000, 4096, 5000]),
    seed=st.integers(0, 2**32),
)
def test_random_fault_schedules_end_exact_or_in_an_expected_failure(
    sizes, drop, duplicate, reorder, corrupt_rate, extras, part_size, seed
):
    files = {f"f{n}.bin": payload(seed + n, size) for n, size in enumerate(sizes)}
    plan = plan_chunks(manifest_for(files))
    faults = Faults(
        drop=drop,
        duplicate=duplicate,
        reorder=reorder,
        corrupt_rate=corrupt_rate,
        unsolicited=extras[0],
        beyond=extras[1],
    )
    server = Server(files, part_size=part_size, faults=faults, seed=seed)
    limits = TransferLimits(window_chunks=4, chunks_per_request=2)
    transfer = Transfer(plan, limits=limits)
    run = drive(transfer, server, expected=files, limits=limits)  # never a wrong byte written

    expected: set[str] = set()
    if drop:
        expected |= {"retries-exhausted", "slow-retrieval", "endless-data"}
    if corrupt_rate:
        expected |= {"integrity", "retries-exhausted", "slow-retrieval", "endless-data"}
    if extras != (0, 0) or duplicate:  # bogus bytes may outweigh a small payload
        expected |= {"endless-data"}
    hypothesis.event(run.result.failure_class if isinstance(run.result, Failed) else "completed")
    if isinstance(run.result, Failed):
        assert run.result.failure_class in expected, run.result
        assert run.result.failure_class in FAILURE_CLASSES
    else:
        assert_complete(run, files)
        assert transfer.verified_bytes == transfer.total_bytes


# --- planning -----------------------------------------------------------------------------------


def test_plan_chunks_covers_every_file_with_a_short_last_chunk():
    files = {"m.bin": payload(1, 2 * CHUNK + 10), "empty.txt": b"", "one.txt": b"x"}
    plan = plan_chunks(manifest_for(files))
    assert [(c.file, c.index, c.offset, c.size) for c in plan] == [
        ("m.bin", 0, 0, CHUNK),
        ("m.bin", 1, CHUNK, CHUNK),
        ("m.bin", 2, 2 * CHUNK, 10),
        ("one.txt", 0, 0, 1),
    ]
    for c in plan:
        assert c.sha256 == sha(files[c.file][c.offset : c.offset + c.size])


def test_plan_chunks_refuses_a_manifest_without_chunk_hashes():
    with pytest.raises(ValueError, match=r"manifest cnn 2\.0\.0 \(format 1\.0\) has no chunk_size"):
        plan_chunks(manifest_for({"m.bin": b"abc"}, chunk_size=None))


def test_a_new_version_reuses_the_unchanged_chunks_of_the_installed_one():
    # v2 differs from v1 in 10% contiguous bytes: ~90% of its chunks are copied locally.
    v1 = payload(42, 1024 * 1024)
    start = 400_000
    v2 = v1[:start] + payload(43, len(v1) // 10) + v1[start + len(v1) // 10 :]
    installed = plan_chunks(manifest_for({"model.bin": v1}))
    local = {c.sha256: (f"v1/{c.file}", c.offset, c.size) for c in installed}
    needed = plan_chunks(manifest_for({"model.bin": v2}))

    copies, fetch = plan_local_copies(needed, local)
    assert len(copies) + len(fetch) == len(needed) == 256
    assert 0.88 <= len(copies) / len(needed) <= 0.91
    changed = range(start, start + len(v1) // 10)
    for spec in fetch:
        assert spec.offset < changed.stop
        assert spec.offset + spec.size > changed.start

    # The caller copies and re-hashes (the local index is only a hint), then fetches the rest.
    disk = {"model.bin": bytearray(len(v2))}
    have = []
    for spec, (_, offset, size) in copies:
        data = v1[offset : offset + size]
        if sha(data) == spec.sha256:
            disk["model.bin"][spec.offset : spec.offset + size] = data
            have.append(spec.key)
    transfer = Transfer(needed, have=have)
    run = drive(transfer, Server({"model.bin": v2}), expected={"model.bin": v2}, disk=disk)
    assert_complete(run, {"model.bin": v2})
    assert set(run.requested) == {c.key for c in fetch}
    assert transfer.total_bytes == sum(c.size for c in fetch)


def test_local_copies_need_the_same_size_not_only_the_same_hash():
    spec = ChunkSpec("m.bin", 0, 0, 100, "b" * 64)
    copies, fetch = plan_local_copies([spec], {"b" * 64: ("old/m.bin", 0, 99)})
    assert (copies, fetch) == ([], [spec])
    copies, fetch = plan_local_copies([spec], {"b" * 64: ("old/m.bin", 4096, 100)})
    assert (copies, fetch) == ([(spec, ("old/m.bin", 4096, 100))], [])


def test_a_peer_message_is_cut_to_one_short_line():
    transfer = Transfer([ChunkSpec("m.bin", 0, 0, 1, sha(b"x"))])
    transfer.handle(Start(0.0))
    [failed] = transfer.handle(ErrorReceived(1.0, "x" * 100_000, 404, "m.bin", 0))
    assert isinstance(failed, Failed)
    assert failed.reason.endswith("x... (100000 characters)")
    assert len(failed.reason) < 300
