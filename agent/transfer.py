"""Pull a bundle's payload chunk by chunk over request/response: a pure state machine.

The agent asks the fleet for payload chunks (:class:`~shared.protocol.FetchRequest` with
``kind="chunks"``) and receives each chunk as one or more parts: ``down/fetch`` frames whose
header names ``file`` and ``index``, the ``offset`` of the part inside the chunk and ``total``,
the chunk's size. :class:`Transfer` decides what to ask for, where each part goes, when a chunk
is complete and correct, when to ask again and when to give up. It does no I/O: it never reads
the clock, opens a socket, touches a file or starts a thread. The caller feeds it events that
carry ``now`` (seconds of a monotonic clock) and executes the actions it returns, in order
(the h11 / mqttproto style). What the caller must do, and this module will NOT do: publish the
requests, decode frames, write and fsync chunks, keep the durable record of verified chunks,
check the whole-file sha256 at the end, and remove the staging area after a failure.

Rules
-----
Rule 1 (window). ``Start`` asks for up to ``window_chunks`` of the missing chunks, in plan order,
``chunks_per_request`` per :class:`RequestChunks`, with request ids ``<prefix>-1``,
``<prefix>-2``... A verified chunk frees its slot; the window is refilled once a whole request's
worth of slots is free (or the plan's tail is shorter, or nothing is outstanding). If nothing is
missing, ``Start`` completes at once. Memory is bounded by ``window_chunks`` chunk buffers.

Rule 2 (parts). Parts arrive in any order, duplicated or not. A part is placed by offset into
its chunk's buffer only if the chunk is outstanding, ``total`` equals the chunk's signed size and
``offset + len(data) <= size``; bytes already covered keep their first value. Anything else (an
unknown chunk, a chunk not asked for or already verified, a wrong ``total``, bytes past the
chunk's end, the overlap of a duplicate) is counted in ``wasted_bytes`` and never written. Once
``wasted_bytes`` exceeds the bytes to fetch plus one chunk, the transfer fails with
``"endless-data"``. A fully covered chunk is hashed: a match gives :class:`WriteChunk` and
:class:`Progress`; a mismatch discards the buffer and asks for the chunk again (one more
attempt), and fails with ``"integrity"`` when that would exceed ``max_attempts``.

Rule 3 (time, on ``Tick`` only). Past ``deadline_s`` since ``Start``: ``"deadline"``. Once a
whole ``throughput_window_s`` has passed since ``Start`` (or the last ``Reconnected``), fewer than
``min_bytes_per_s * throughput_window_s`` useful bytes in the last ``throughput_window_s``:
``"slow-retrieval"``. An outstanding chunk with no request and no part for more than
``request_timeout_s``, or whose last answer was an error, is asked for again (one more attempt;
parts already received are kept); ``"retries-exhausted"`` when that would exceed
``max_attempts``. Ticks go on while the link is down, so an outage longer than the throughput
window fails with ``"slow-retrieval"``; the caller retries later, resuming from its record.

Rule 4 (errors). An error with status 404 fails with ``"not-found"``. Any other error marks its
chunk (or, without a chunk, every outstanding chunk) to be asked for again on the next ``Tick``.

Rule 5 (reconnect). ``Reconnected`` asks again, at once, for every outstanding chunk, without
counting an attempt (the broker may have lost requests and answers while the link was down).

Rule 6 (states). ``handle`` checks the event against :data:`TRANSITIONS` first. In ``COMPLETE`` and
``FAILED`` every event but ``Start`` is ignored; ``Start`` twice, or any other event before
``Start``, raises :class:`TransferUsageError` (we misused the API, the peer did nothing wrong).

State table (:func:`describe_transitions` renders it from :data:`TRANSITIONS`)::

    IDLE      Start         -> FETCHING | COMPLETE
    FETCHING  PartReceived  -> FETCHING | COMPLETE | FAILED
    FETCHING  ErrorReceived -> FETCHING | FAILED
    FETCHING  Tick          -> FETCHING | FAILED
    FETCHING  Reconnected   -> FETCHING
    COMPLETE  PartReceived  -> COMPLETE
    COMPLETE  ErrorReceived -> COMPLETE
    COMPLETE  Tick          -> COMPLETE
    COMPLETE  Reconnected   -> COMPLETE
    FAILED    PartReceived  -> FAILED
    FAILED    ErrorReceived -> FAILED
    FAILED    Tick          -> FAILED
    FAILED    Reconnected   -> FAILED

Example, one chunk of three bytes sent in two parts:

>>> from hashlib import sha256
>>> chunk = ChunkSpec("m.bin", index=0, offset=0, size=3, sha256=sha256(b"abc").hexdigest())
>>> t = Transfer([chunk])
>>> t.handle(Start(now=0.0))
[RequestChunks(request_id='t-1', chunks=(('m.bin', 0),))]
>>> t.handle(PartReceived(0.1, "m.bin", 0, offset=1, total=3, data=b"bc"))
[]
>>> actions = t.handle(PartReceived(0.2, "m.bin", 0, offset=0, total=3, data=b"a"))
>>> [type(a).__name__ for a in actions]
['WriteChunk', 'Progress', 'Completed']
>>> t.state.name, t.received_bytes, t.wasted_bytes
('COMPLETE', 3, 0)

A caller's loop, in outline::

    transfer = Transfer(plan, have=record.verified_keys(), limits=limits)
    execute(transfer.handle(Start(monotonic())))  # publish, write + record, report, stop
    next_tick = monotonic() + 1.0
    while transfer.state is TransferState.FETCHING:
        event = link.next_event(timeout=1.0)  # PartReceived, ErrorReceived, Reconnected or None
        if event is not None:
            execute(transfer.handle(event))
        if monotonic() >= next_tick:  # about once a second, however busy the link is
            execute(transfer.handle(Tick(monotonic())))
            next_tick += 1.0
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

if TYPE_CHECKING:
    from shared.manifest import Manifest

__all__ = [
    "DEFAULT_LIMITS",
    "FAILURE_CLASSES",
    "TRANSITIONS",
    "Action",
    "ChunkKey",
    "ChunkSpec",
    "Completed",
    "ErrorReceived",
    "Event",
    "Failed",
    "FailureClass",
    "PartReceived",
    "Progress",
    "Reconnected",
    "RequestChunks",
    "Start",
    "Tick",
    "Transfer",
    "TransferLimits",
    "TransferState",
    "TransferUsageError",
    "WriteChunk",
    "describe_transitions",
    "plan_chunks",
    "plan_local_copies",
]

logger = logging.getLogger(__name__)

ChunkKey: TypeAlias = tuple[str, int]
"""``(file, index)``: a chunk's name in requests, frames and the durable record."""

FailureClass: TypeAlias = Literal[
    "slow-retrieval", "deadline", "endless-data", "integrity", "not-found", "retries-exhausted"
]
FAILURE_CLASSES: Final[tuple[FailureClass, ...]] = (
    "slow-retrieval",
    "deadline",
    "endless-data",
    "integrity",
    "not-found",
    "retries-exhausted",
)
MAX_CHUNKS_PER_REQUEST: Final = 256  # FetchRequest.chunks holds at most this many
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RATE_BUCKETS = 16  # the throughput window is kept as this many byte counters


class TransferUsageError(RuntimeError):
    """The caller misused the API (an event out of order); the peer did nothing wrong."""


# --- values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkSpec:
    """One chunk to fetch, as the signed manifest describes it."""

    file: str  # payload path inside the bundle
    index: int  # position of the chunk in its file, from 0
    offset: int  # bytes from the start of the file to the chunk's first byte
    size: int  # bytes in the chunk (the signed size; the last chunk of a file may be shorter)
    sha256: str  # lowercase hex digest of the chunk's bytes

    def __post_init__(self) -> None:
        where = f"{self.file!r} chunk {self.index}"
        if not self.file:
            raise ValueError(f"chunk {self.index}: file must be a non-empty path")
        if self.index < 0 or self.offset < 0:
            raise ValueError(
                f"{where}: index and offset must be >= 0, got {self.index} and {self.offset}"
            )
        if self.size < 1:
            raise ValueError(f"{where}: size must be >= 1 byte, got {self.size}")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(
                f"{where}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}"
            )

    @property
    def key(self) -> ChunkKey:
        """``(file, index)``."""
        return (self.file, self.index)


@dataclass(frozen=True, slots=True)
class TransferLimits:
    """How hard to try and when to give up. Every field is validated on construction."""

    window_chunks: int = 8  # chunks requested and not yet verified, at most (memory bound)
    chunks_per_request: int = 4  # chunks named in one RequestChunks, at most (1-256)
    request_timeout_s: float = 10.0  # seconds without a request or part before asking again
    max_attempts: int = 5  # requests per chunk (timeouts, errors, mismatches), at most
    min_bytes_per_s: float = 1024.0  # useful bytes per second over the window; 0 disables
    throughput_window_s: float = 30.0  # seconds over which min_bytes_per_s is measured
    deadline_s: float = 3600.0  # seconds from Start to the last chunk, at most

    def __post_init__(self) -> None:
        problems = []
        if self.window_chunks < 1:
            problems.append(f"window_chunks must be >= 1, got {self.window_chunks}")
        if not 1 <= self.chunks_per_request <= MAX_CHUNKS_PER_REQUEST:
            problems.append(
                f"chunks_per_request must be in 1..{MAX_CHUNKS_PER_REQUEST}, "
                f"got {self.chunks_per_request}"
            )
        if self.max_attempts < 1:
            problems.append(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not self.min_bytes_per_s >= 0:
            problems.append(f"min_bytes_per_s must be >= 0, got {self.min_bytes_per_s}")
        for name in ("request_timeout_s", "throughput_window_s", "deadline_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                problems.append(f"{name} must be a positive number of seconds, got {value}")
        if problems:
            raise ValueError("invalid transfer limits: " + "; ".join(problems))


DEFAULT_LIMITS: Final = TransferLimits()


# --- events (in) --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """Begin: ask for the first window of chunks."""

    now: float


@dataclass(frozen=True, slots=True)
class PartReceived:
    """A ``down/fetch`` frame of kind ``chunk``: ``data`` goes at ``offset`` in the chunk."""

    now: float
    file: str
    index: int
    offset: int  # bytes from the start of the chunk
    total: int  # the chunk's full size, as the sender claims it
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """A ``down/fetch`` frame of kind ``error``, for one chunk or (no file/index) a request."""

    now: float
    message: str
    status: int
    file: str | None = None
    index: int | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: check timeouts, throughput and the deadline. Send about once a second."""

    now: float


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The link came back: everything outstanding is asked for again at once."""

    now: float


Event: TypeAlias = Start | PartReceived | ErrorReceived | Tick | Reconnected


# --- actions (out) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestChunks:
    """Publish ``FetchRequest(request_id=..., kind="chunks", chunks=[ChunkRef...])``."""

    request_id: str
    chunks: tuple[ChunkKey, ...]


@dataclass(frozen=True, slots=True)
class WriteChunk:
    """A chunk whose sha256 matched: write ``data`` at ``chunk.offset`` of ``chunk.file``, then
    durably record ``chunk.key`` as verified (it is never offered again by this transfer)."""

    chunk: ChunkSpec
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Progress:
    """Bytes verified so far out of the bytes to fetch; emitted only when a chunk completes."""

    done_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class Completed:
    """Every chunk is verified (the caller still checks each whole file's sha256)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The transfer gave up; ``reason`` is one line with the numbers."""

    failure_class: FailureClass
    reason: str


Action: TypeAlias = RequestChunks | WriteChunk | Progress | Completed | Failed


# --- states and transitions ---------------------------------------------------------------------


class TransferState(Enum):
    IDLE = "idle"
    FETCHING = "fetching"
    COMPLETE = "complete"
    FAILED = "failed"


_IDLE = TransferState.IDLE
_FETCHING = TransferState.FETCHING
_COMPLETE = TransferState.COMPLETE
_FAILED = TransferState.FAILED

TRANSITIONS: Final[dict[TransferState, dict[type[Event], frozenset[TransferState]]]] = {
    _IDLE: {Start: frozenset({_FETCHING, _COMPLETE})},
    _FETCHING: {
        PartReceived: frozenset({_FETCHING, _COMPLETE, _FAILED}),
        ErrorReceived: frozenset({_FETCHING, _FAILED}),
        Tick: frozenset({_FETCHING, _FAILED}),
        Reconnected: frozenset({_FETCHING}),
    },
    # Terminal: late parts, errors and ticks are ignored; a second Start is a usage error.
    _COMPLETE: {
        e: frozenset({_COMPLETE}) for e in (PartReceived, ErrorReceived, Tick, Reconnected)
    },
    _FAILED: {e: frozenset({_FAILED}) for e in (PartReceived, ErrorReceived, Tick, Reconnected)},
}
"""state -> event type -> the states ``handle`` may leave the machine in. Absent: usage error."""

_TERMINAL = frozenset({_COMPLETE, _FAILED})
_ORDER = {s: i for i, s in enumerate(TransferState)}


def describe_transitions() -> str:
    """The state table as text, one ``STATE  Event -> NEXT | NEXT`` line per allowed event."""
    lines = []
    for state, events in TRANSITIONS.items():
        for event, targets in events.items():
            nexts = " | ".join(s.name for s in sorted(targets, key=_ORDER.__getitem__))
            lines.append(f"{state.name:<9} {event.__name__:<13} -> {nexts}")
    return "\n".join(lines)


# --- the machine --------------------------------------------------------------------------------


def _short(digest: str) -> str:
    return f"{digest[:12]}..."


def _peer_text(text: str, limit: int = 200) -> str:
    """A peer's free text, cut to ``limit`` characters for one-line reasons."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(slots=True, eq=False)
class _Slot:
    """An outstanding chunk: its buffer, which byte ranges are filled, and its request history."""

    spec: ChunkSpec
    requested_at: float
    attempts: int = 1  # requests sent that count toward max_attempts
    mismatches: int = 0
    last_part_at: float = -math.inf
    error: str | None = None  # the last error answer, if it is still to be acted on
    buffer: bytearray = field(default_factory=bytearray)  # sized at the first placed part
    starts: list[int] = field(default_factory=list)  # filled ranges [start, end): disjoint,
    ends: list[int] = field(default_factory=list)  # sorted, never touching
    covered: int = 0  # bytes filled

    def place(self, offset: int, data: bytes) -> int:
        """Copy the parts of ``data`` that fill gaps; return how many bytes were new."""
        end = offset + len(data)
        if not self.buffer:
            self.buffer = bytearray(self.spec.size)
        view = memoryview(data)
        lo = bisect_left(self.ends, offset)  # first range ending at or after offset
        hi = bisect_right(self.starts, end)  # ranges starting at or before end
        cursor, new = offset, 0
        for start, stop in zip(self.starts[lo:hi], self.ends[lo:hi], strict=True):
            if start > cursor:
                self.buffer[cursor:start] = view[cursor - offset : start - offset]
                new += start - cursor
            cursor = max(cursor, stop)
        if cursor < end:
            self.buffer[cursor:end] = view[cursor - offset :]
            new += end - cursor
        first = min(offset, self.starts[lo]) if lo < hi else offset
        last = max(end, self.ends[hi - 1]) if lo < hi else end
        self.starts[lo:hi] = [first]
        self.ends[lo:hi] = [last]
        self.covered += new
        return new

    def clear(self) -> None:
        self.buffer = bytearray()
        self.starts.clear()
        self.ends.clear()
        self.covered = 0


class Transfer:
    """Fetch ``chunks`` (minus ``have``) and verify each against its sha256. See the module rules.

    Args:
        chunks: every chunk of the payload, in the order to fetch them (see :func:`plan_chunks`).
        have: keys of chunks already verified: from the durable record after a restart, or
            copied from content the device already holds (see :func:`plan_local_copies`).
        limits: window, timeouts, attempts, throughput floor and deadline.
        request_id_prefix: request ids are ``f"{prefix}-{n}"``, n = 1, 2, ...

    Raises:
        ValueError: two chunks share a key, ``have`` names a chunk not in ``chunks``, or the
            prefix is empty or longer than 32 characters.
    """

    def __init__(
        self,
        chunks: Sequence[ChunkSpec],
        *,
        have: Collection[ChunkKey] = (),
        limits: TransferLimits = DEFAULT_LIMITS,
        request_id_prefix: str = "t",
    ) -> None:
        if not 1 <= len(request_id_prefix) <= 32:
            raise ValueError(
                f"request_id_prefix must be 1-32 characters, got {request_id_prefix!r}"
            )
        specs: dict[ChunkKey, ChunkSpec] = {}
        for spec in chunks:
            if spec.key in specs:
                raise ValueError(f"{spec.file!r} chunk {spec.index} is listed twice")
            specs[spec.key] = spec
        unknown = [k for k in have if k not in specs]
        if unknown:
            raise ValueError(
                f"have names {len(unknown)} chunks that are not in the plan, e.g. {unknown[:3]}"
            )
        verified = set(have)
        self._limits = limits
        self._prefix = request_id_prefix
        self._specs = specs
        self._missing: dict[ChunkKey, None] = {k: None for k in specs if k not in verified}
        self._queue: dict[ChunkKey, None] = dict(self._missing)  # missing, not yet asked for
        self._outstanding: dict[ChunkKey, _Slot] = {}
        self._state = _IDLE
        self._request_numbers = itertools.count(1)
        self._total = sum(specs[k].size for k in self._missing)
        largest = max((specs[k].size for k in self._missing), default=0)
        self._waste_cap = self._total + largest
        self._received = 0
        self._wasted = 0
        self._verified = 0
        self._started_at = 0.0
        self._rate_since = 0.0  # the throughput check waits a whole window after this
        self._samples: deque[tuple[int, int]] = deque(maxlen=_RATE_BUCKETS + 2)

    # read-only views

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def missing(self) -> frozenset[ChunkKey]:
        """Keys of the chunks still needed (asked for or not)."""
        return frozenset(self._missing)

    @property
    def outstanding(self) -> frozenset[ChunkKey]:
        """Keys of the chunks asked for and not yet verified."""
        return frozenset(self._outstanding)

    @property
    def received_bytes(self) -> int:
        """Useful bytes: bytes that filled a gap of an outstanding chunk (including chunks later
        discarded on a sha256 mismatch, at most ``max_attempts`` times each)."""
        return self._received

    @property
    def wasted_bytes(self) -> int:
        """Bytes of parts that were not placed: duplicates, unknown or unrequested chunks, bytes
        past a chunk's end. ``received_bytes + wasted_bytes`` is every byte handed in."""
        return self._wasted

    @property
    def verified_bytes(self) -> int:
        """Bytes of the chunks verified (and handed out in :class:`WriteChunk`) so far."""
        return self._verified

    @property
    def total_bytes(self) -> int:
        """Bytes still to fetch when the transfer was created (the chunks not in ``have``)."""
        return self._total

    @property
    def buffered_bytes(self) -> int:
        """Bytes of chunk buffers held now; at most ``window_chunks`` chunk sizes."""
        return sum(len(s.buffer) for s in self._outstanding.values())

    # the one entry point

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return the actions to execute, in order.

        Raises:
            TransferUsageError: the event is not allowed in the current state (see
                :data:`TRANSITIONS`): ``Start`` twice, or another event before ``Start``.
        """
        allowed = TRANSITIONS[self._state].get(type(event))
        if allowed is None:
            raise TransferUsageError(
                f"{type(event).__name__} is not allowed in state {self._state.name} (allowed: "
                f"{', '.join(e.__name__ for e in TRANSITIONS[self._state]) or 'nothing'})"
            )
        if self._state in _TERMINAL:
            return []
        before = self._state
        match event:
            case Start(now=now):
                actions = self._start(now)
            case PartReceived():
                actions = self._part(event)
            case ErrorReceived():
                actions = self._error(event)
            case Tick(now=now):
                actions = self._tick(now)
            case Reconnected(now=now):
                actions = self._reconnected(now)
        if self._state not in allowed:  # pragma: no cover - a bug in this module
            raise RuntimeError(f"bug: {before.name} --{type(event).__name__}--> {self._state.name}")
        if self._state is not before:
            logger.debug(
                "transfer %s: %s -> %s on %s",
                self._prefix,
                before.name,
                self._state.name,
                type(event).__name__,
            )
        return actions

    # handlers

    def _start(self, now: float) -> list[Action]:
        self._started_at = self._rate_since = now
        if not self._missing:
            self._state = _COMPLETE
            return [Completed()]
        self._state = _FETCHING
        return self._refill(now)

    def _part(self, event: PartReceived) -> list[Action]:
        slot = self._outstanding.get((event.file, event.index))
        why = self._misfit(event, slot)
        if why is not None:
            return self._waste(event, why)
        if slot is None or not event.data:
            return []
        size = len(event.data)
        slot.last_part_at = event.now
        new = slot.place(event.offset, event.data)
        self._received += new
        self._count_rate(event.now, new)
        if new < size and (failed := self._waste(event, "duplicate bytes", size - new)):
            return failed
        if slot.covered < slot.spec.size:
            return []
        return self._verify(slot, event.now)

    def _misfit(self, event: PartReceived, slot: _Slot | None) -> str | None:
        """Why a part cannot be placed, or None if it can."""
        key = (event.file, event.index)
        spec = self._specs.get(key)
        if spec is None:
            return "not a chunk of this transfer"
        if event.total != spec.size:
            return f"the signed chunk size is {spec.size}"
        if event.offset < 0 or event.offset + len(event.data) > spec.size:
            return f"outside the chunk's {spec.size} bytes"
        if slot is None:
            return "not asked for" if key in self._missing else "already verified"
        return None

    def _waste(self, event: PartReceived, why: str, size: int | None = None) -> list[Action]:
        self._wasted += len(event.data) if size is None else size
        if self._wasted <= self._waste_cap:
            return []
        return self._fail(
            "endless-data",
            f"{self._wasted} bytes received that fit no outstanding chunk, more than the "
            f"{self._total} bytes to fetch plus one chunk (limit {self._waste_cap}); the last: "
            f"{len(event.data)} bytes for {event.file!r} chunk {event.index} at offset "
            f"{event.offset} of {event.total} ({why})",
        )

    def _verify(self, slot: _Slot, now: float) -> list[Action]:
        spec = slot.spec
        digest = hashlib.sha256(slot.buffer).hexdigest()
        if digest != spec.sha256:
            slot.mismatches += 1
            slot.clear()
            if slot.attempts >= self._limits.max_attempts:
                return self._fail(
                    "integrity",
                    f"{spec.file} chunk {spec.index}: sha256 mismatch {slot.mismatches} times "
                    f"(expected {_short(spec.sha256)}, got {_short(digest)})",
                )
            slot.attempts += 1
            return self._request([spec.key], now)
        data = bytes(slot.buffer)
        del self._outstanding[spec.key]
        del self._missing[spec.key]
        self._verified += spec.size
        actions: list[Action] = [WriteChunk(spec, data), Progress(self._verified, self._total)]
        if not self._missing:
            self._state = _COMPLETE
            actions.append(Completed())
        else:
            actions.extend(self._refill(now))
        return actions

    def _error(self, event: ErrorReceived) -> list[Action]:
        chunk = None if event.file is None or event.index is None else (event.file, event.index)
        message = _peer_text(event.message)
        if event.status == 404:
            what = "the request" if chunk is None else f"{chunk[0]!r} chunk {chunk[1]}"
            return self._fail("not-found", f"the fleet answered 404 for {what}: {message}")
        if chunk is None:
            slots = list(self._outstanding.values())
        else:
            found = self._outstanding.get(chunk)
            slots = [] if found is None else [found]
        for slot in slots:
            slot.error = f"status {event.status}: {message}"
        return []

    def _tick(self, now: float) -> list[Action]:
        limits = self._limits
        elapsed = now - self._started_at
        if elapsed > limits.deadline_s:
            return self._fail(
                "deadline",
                f"not complete {elapsed:.1f} s after start (deadline {limits.deadline_s:g} s): "
                f"{self._verified} of {self._total} bytes verified, {len(self._missing)} chunks "
                "missing",
            )
        window = limits.throughput_window_s
        if limits.min_bytes_per_s > 0 and now - self._rate_since >= window:
            got = self._bytes_in_window(now)
            if got < limits.min_bytes_per_s * window:
                return self._fail(
                    "slow-retrieval",
                    f"{got / window:.0f} B/s over the last {window:g} s, below the minimum "
                    f"{limits.min_bytes_per_s:g} B/s ({got} useful bytes; {self._verified} of "
                    f"{self._total} bytes verified)",
                )
        due = [
            slot
            for slot in self._outstanding.values()
            if slot.error is not None
            or now - max(slot.requested_at, slot.last_part_at) > limits.request_timeout_s
        ]
        for slot in due:
            if slot.attempts >= limits.max_attempts:
                spec = slot.spec
                last = slot.error or f"no request or part for {limits.request_timeout_s:g} s"
                return self._fail(
                    "retries-exhausted",
                    f"{spec.file} chunk {spec.index}: incomplete after {slot.attempts} requests "
                    f"({slot.covered} of {spec.size} bytes received; last: {last})",
                )
        for slot in due:
            slot.attempts += 1
        return self._request([s.spec.key for s in due], now)

    def _reconnected(self, now: float) -> list[Action]:
        self._rate_since = now
        actions = self._request(list(self._outstanding), now)
        actions.extend(self._refill(now))
        return actions

    # helpers

    def _refill(self, now: float) -> list[Action]:
        """Ask for more missing chunks if a request's worth of window slots is free."""
        limits = self._limits
        free = limits.window_chunks - len(self._outstanding)
        count = min(free, len(self._queue))
        worth = min(limits.chunks_per_request, limits.window_chunks, len(self._queue))
        if count <= 0 or (count < worth and self._outstanding):
            return []
        keys = list(itertools.islice(self._queue, count))
        for key in keys:
            del self._queue[key]
            self._outstanding[key] = _Slot(self._specs[key], requested_at=now)
        return self._request(keys, now)

    def _request(self, keys: list[ChunkKey], now: float) -> list[Action]:
        """Request ``keys`` (all outstanding), ``chunks_per_request`` per request."""
        step = self._limits.chunks_per_request
        actions: list[Action] = []
        for i in range(0, len(keys), step):
            group = tuple(keys[i : i + step])
            for key in group:
                slot = self._outstanding[key]
                slot.requested_at = now
                slot.error = None
            actions.append(RequestChunks(f"{self._prefix}-{next(self._request_numbers)}", group))
        return actions

    def _fail(self, failure_class: FailureClass, reason: str) -> list[Action]:
        self._state = _FAILED
        for slot in self._outstanding.values():
            slot.clear()
        self._outstanding.clear()
        return [Failed(failure_class, reason)]

    def _count_rate(self, now: float, size: int) -> None:
        bucket = int((now - self._started_at) // self._bucket_s)
        if self._samples and self._samples[-1][0] == bucket:
            self._samples[-1] = (bucket, self._samples[-1][1] + size)
        else:
            self._samples.append((bucket, size))

    def _bytes_in_window(self, now: float) -> int:
        """Useful bytes in the last window, counting the bucket that straddles its start."""
        since = now - self._started_at - self._limits.throughput_window_s
        return sum(n for b, n in self._samples if (b + 1) * self._bucket_s > since)

    @property
    def _bucket_s(self) -> float:
        return self._limits.throughput_window_s / _RATE_BUCKETS


# --- planning -----------------------------------------------------------------------------------


def plan_chunks(manifest: Manifest) -> list[ChunkSpec]:
    """Every chunk of every payload file, in manifest order.

    Raises:
        ValueError: the manifest has no chunk hashes (format 1.0), or a non-empty file has none.
    """
    chunk_size = manifest.chunk_size
    if chunk_size is None:
        raise ValueError(
            f"manifest {manifest.name} {manifest.version} (format {manifest.format_version}) has "
            "no chunk_size and no chunk hashes; chunked transfer needs format 1.1 or later"
        )
    plan: list[ChunkSpec] = []
    for entry in manifest.files:
        if entry.chunks is None:
            if entry.size == 0:
                continue
            raise ValueError(
                f"manifest {manifest.name} {manifest.version}: {entry.path} ({entry.size} bytes) "
                "has no chunk hashes"
            )
        for index, digest in enumerate(entry.chunks):
            offset = index * chunk_size
            size = min(chunk_size, entry.size - offset)
            plan.append(ChunkSpec(entry.path, index, offset, size, digest))
    return plan


def plan_local_copies(
    needed: Sequence[ChunkSpec], local: Mapping[str, tuple[str, int, int]]
) -> tuple[list[tuple[ChunkSpec, tuple[str, int, int]]], list[ChunkSpec]]:
    """Split ``needed`` into chunks the device already holds and chunks to fetch.

    Content addressing: ``local`` maps a sha256 to ``(path, offset, size)`` of a chunk the
    device holds (e.g. in the installed version). A needed chunk with the same sha256 and size
    can be copied instead of fetched. The index is only a hint: the caller hashes the bytes it
    copies and passes the keys of those that match as ``have`` (the others are fetched).

    Returns:
        ``(copies, fetch)``: ``[(chunk, (path, offset, size)), ...]`` and the chunks to fetch,
        both in the order of ``needed``.
    """
    copies: list[tuple[ChunkSpec, tuple[str, int, int]]] = []
    fetch: list[ChunkSpec] = []
    for spec in needed:
        source = local.get(spec.sha256)
        if source is not None and source[2] == spec.size:
            copies.append((spec, source))
        else:
            fetch.append(spec)
    return copies, fetch
