"""The console's JSON and event-stream endpoints, under ``/api/v1/console``.

Every endpoint takes the API's bearer tokens (:func:`fleet.api.require`) except the live stream,
which takes a ticket (see :mod:`fleet.console.live`). Reads need the viewer role. The console
acts on rollouts through the API's own endpoints (``POST /api/v1/rollouts`` and
``POST /api/v1/rollouts/{id}/{action}``), which need the operator role; nothing here changes
the fleet.

====================================  ==========================================================
endpoint                              what
====================================  ==========================================================
``GET  overview``                     devices by state, class, runtime, version; live rollouts
``GET  devices``                      one page of devices, with filters and the total
``GET  devices/{id}``                 a device: timeline, telemetry series, last failure
``GET  releases``                     releases with their signature status, checked now
``GET  rollouts``                     rollout summaries, newest first
``GET  rollouts/{id}``                a rollout page: stages, gates, failures, actions
``POST rollouts/preview``             a dry run of a plan: stages per class, blast radius
``GET  audit``                        audit entries, newest first, with filters
``POST ticket``                       a short-lived ticket for the live stream
``GET  live?topic=...&ticket=...``    server-sent events: the topic's snapshot when it changes
====================================  ==========================================================

A topic is a page: ``overview``, ``rollouts``, ``rollout/<id>``, ``device/<id>``, and the lists
with their filters as the page's endpoint takes them, ``devices?online=false&offset=50`` and
``audit?action=rollout.``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from sqlmodel import Session

from fleet import crud
from fleet.api import RolloutRequest, SessionDep, require, rollout_defaults
from fleet.console import queries
from fleet.console.live import (
    TICKET_TTL_S,
    LiveHub,
    Recent,
    Snapshot,
    check_ticket,
    issue_ticket,
)
from fleet.console.rollout_views import RolloutViews
from fleet.models import ApiToken, RolloutRecord
from shared.bundle import inspect_bundle
from shared.errors import EdgefleetError
from shared.trust import verify_release

__all__ = ["STREAM_LIFETIME_S", "router"]

router = APIRouter(prefix="/api/v1/console")
Viewer = Annotated[ApiToken, Depends(require("viewer"))]
STREAM_LIFETIME_S = 30.0  # a stream ends after this; the page reconnects with a new ticket
KEEPALIVE_S = 10.0
RELEASE_CHECK_TTL_S = 60.0
_TOPIC = re.compile(
    r"^(overview|rollouts|(audit|devices)(\?[\x21-\x7e]{0,400})?|(rollout|device)/[A-Za-z0-9._-]{1,64})$"
)


def _views(request: Request) -> RolloutViews:
    return request.app.state.console_views  # type: ignore[no-any-return]


def _overview(request: Request) -> Recent[dict[str, Any]]:
    return request.app.state.console_overview  # type: ignore[no-any-return]


def _rollout_record(session: Session, rollout_id: str) -> RolloutRecord:
    record = session.get(RolloutRecord, rollout_id)
    if record is None:
        raise queries.NotFound(f"no rollout {rollout_id!r}")
    return record


class DeviceFilters(BaseModel):
    """The devices page's filters and page: the query of ``GET devices`` and of the live topic
    ``devices?...``."""

    search: str | None = Field(default=None, max_length=64)
    online: bool | None = None
    hardware_class: str | None = Field(default=None, max_length=128)
    model: str | None = Field(default=None, max_length=64)
    version: str | None = Field(default=None, max_length=64)
    state: str | None = Field(default=None, pattern="^(active|probation|failed|none)$")
    limit: int = Field(default=50, ge=1, le=500)
    offset: int = Field(default=0, ge=0)


class AuditFilters(BaseModel):
    """The audit page's filters: the query of ``GET audit`` and of the live topic ``audit?...``."""

    action: str | None = Field(default=None, max_length=64)
    actor: str | None = Field(default=None, max_length=64)
    target: str | None = Field(default=None, max_length=256)
    before: int | None = Field(default=None, ge=1)
    limit: int = Field(default=100, ge=1, le=500)


_LIST_FILTERS: dict[str, type[DeviceFilters | AuditFilters]] = {
    "devices": DeviceFilters,
    "audit": AuditFilters,
}


def list_filters(topic: str) -> DeviceFilters | AuditFilters | None:
    """The filters in a ``devices?...`` or ``audit?...`` topic; None for the other topics.

    Raises:
        pydantic.ValidationError: a filter value the page's endpoint would refuse.
    """
    kind, _, query = topic.partition("?")
    if kind not in _LIST_FILTERS:
        return None
    return _LIST_FILTERS[kind].model_validate(dict(parse_qsl(query)))


def topic_snapshot(
    session: Session,
    views: RolloutViews,
    topic: str,
    *,
    overview: Recent[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The document a page shows for ``topic``: what its endpoint returns and its stream sends.

    ``overview`` shares the overview between the viewers and the live feed (see
    :class:`~fleet.console.live.Recent`).

    Raises:
        NotFound: an unknown device or rollout, or an unknown topic.
    """
    filters = list_filters(topic)
    if filters is not None:
        read = queries.devices if isinstance(filters, DeviceFilters) else queries.audit
        return read(session, **filters.model_dump())
    kind, _, name = topic.partition("/")
    if kind == "overview":
        if overview is None:
            return queries.overview(session, views.summaries)
        return overview.get(lambda: queries.overview(session, views.summaries))
    if kind == "rollouts":
        return queries.rollout_list(session, views.summaries)
    if kind == "rollout" and name:
        return views.detail(session, _rollout_record(session, name))
    if kind == "device" and name:
        return queries.device_detail(session, name)
    raise queries.NotFound(f"no live topic {topic!r}")


def _found(call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        return call(*args, **kwargs)  # type: ignore[no-any-return]
    except queries.NotFound as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from e


# -- pages -----------------------------------------------------------------------------------


@router.get("/overview")
def overview(request: Request, session: SessionDep, _: Viewer) -> dict[str, Any]:
    return topic_snapshot(session, _views(request), "overview", overview=_overview(request))


@router.get("/devices")
def devices(
    session: SessionDep, _: Viewer, filters: Annotated[DeviceFilters, Query()]
) -> dict[str, Any]:
    return queries.devices(session, **filters.model_dump())


@router.get("/devices/{device_id}")
def device(device_id: str, session: SessionDep, _: Viewer) -> dict[str, Any]:
    return _found(queries.device_detail, session, device_id)


@router.get("/rollouts")
def rollouts(request: Request, session: SessionDep, _: Viewer) -> dict[str, Any]:
    return topic_snapshot(session, _views(request), "rollouts")


@router.get("/rollouts/{rollout_id}")
def rollout(rollout_id: str, request: Request, session: SessionDep, _: Viewer) -> dict[str, Any]:
    return _found(topic_snapshot, session, _views(request), f"rollout/{rollout_id}")


@router.post("/rollouts/preview")
def preview(
    body: RolloutRequest, request: Request, session: SessionDep, _: Viewer
) -> dict[str, Any]:
    """Stage membership per hardware class and the blast radius of a plan, storing nothing.

    The body is that of ``POST /api/v1/rollouts`` (options left out take the fleet's defaults).
    The answer's ``plan`` can be sent as ``plan`` to ``POST /api/v1/rollouts`` to start exactly
    the previewed cohorts."""
    try:
        return _views(request).dry_run(
            session,
            model=body.model,
            version=body.version,
            target=body.target,
            options=body.options(rollout_defaults(request)),
        )
    except EdgefleetError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e


@router.get("/audit")
def audit(
    session: SessionDep, _: Viewer, filters: Annotated[AuditFilters, Query()]
) -> dict[str, Any]:
    return queries.audit(session, **filters.model_dump())


# -- releases --------------------------------------------------------------------------------


class _ReleaseChecks:
    """Each release bundle verified against the current trust root, remembered for a minute."""

    def __init__(self) -> None:
        self._results: dict[tuple[str, int, int], tuple[float, dict[str, Any]]] = {}

    def check(self, path: Path, trust_root: bytes, *, now: float) -> dict[str, Any]:
        try:
            stat = path.stat()
        except OSError:
            return {"status": "missing", "detail": f"the bundle file {path.name} is gone"}
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        cached = self._results.get(key)
        if cached is not None and now - cached[0] < RELEASE_CHECK_TTL_S:
            return cached[1]
        try:
            info = verify_release(inspect_bundle(path), trust_root)
            expires = f"{info.expires:%Y-%m-%d %H:%M} UTC"
            result = {"status": "verified", "detail": f"signed; the terms expire {expires}"}
        except EdgefleetError as e:
            kind = "expired" if type(e).__name__ == "ExpiredError" else "invalid"
            result = {"status": kind, "detail": str(e)}
        self._results[key] = (now, result)
        return result


_release_checks = _ReleaseChecks()


@router.get("/releases")
def releases(request: Request, session: SessionDep, _: Viewer) -> dict[str, Any]:
    now = datetime.now(UTC)
    rows = []
    for release in crud.releases(session):
        expires = release.expires if release.expires.tzinfo else release.expires.replace(tzinfo=UTC)
        check = _release_checks.check(
            Path(release.path), request.app.state.trust_root, now=time.monotonic()
        )
        rows.append(
            {
                "name": release.name,
                "version": release.version,
                "counter": release.counter,
                "rollback_floor": release.rollback_floor,
                "size": release.size,
                "formats": release.formats,
                "hardware_ids": release.hardware_ids,
                "manifest_sha256": release.manifest_sha256,
                "published_at": release.published_at.isoformat(),
                "published_by": release.published_by,
                "expires": expires.isoformat(),
                "expires_in_s": round((expires - now).total_seconds()),
                "signature": check,
            }
        )
    return {"releases": rows}


# -- live updates ----------------------------------------------------------------------------


@router.post("/ticket")
def ticket(token: Viewer) -> dict[str, Any]:
    """A ticket for ``GET live`` (EventSource cannot send the Authorization header)."""
    return {"ticket": issue_ticket(token, now=time.time()), "expires_in_s": TICKET_TTL_S}


def compute_topics(
    engine: Any,
    views: RolloutViews,
    topics: list[str],
    *,
    overview: Recent[dict[str, Any]] | None = None,
) -> dict[str, Snapshot]:
    """Each topic's snapshot as ``(event, json)``: ``update``, or ``problem`` with a detail."""
    out: dict[str, Snapshot] = {}
    with Session(engine) as session:
        for topic in topics:
            try:
                doc = topic_snapshot(session, views, topic, overview=overview)
                event = "update"
            except queries.NotFound as e:
                doc, event = {"detail": str(e), "status": 404}, "problem"
            out[topic] = (event, json.dumps(doc, default=str, separators=(",", ":")))
            session.rollback()  # the next topic reads a fresh snapshot of the database
    return out


def _hub(request: Request) -> LiveHub:
    state = request.app.state
    if getattr(state, "console_hub", None) is None:
        engine, views, shared = state.engine, state.console_views, state.console_overview
        state.console_hub = LiveHub(
            lambda topics: compute_topics(engine, views, topics, overview=shared)
        )
    return state.console_hub  # type: ignore[no-any-return]


async def _events(hub: LiveHub, topic: str) -> AsyncIterator[str]:
    """The stream: a retry hint, then snapshots as they change, keep-alives, then ``bye``
    (after ``STREAM_LIFETIME_S``, or at once when the server starts to stop)."""
    yield "retry: 1000\n\n"
    loop = asyncio.get_running_loop()
    ends = loop.time() + STREAM_LIFETIME_S
    async with hub.watch(topic) as watcher:
        while (left := ends - loop.time()) > 0:
            try:
                snapshot = await asyncio.wait_for(watcher.next(), min(left, KEEPALIVE_S))
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if snapshot is None:  # the hub closed: the server is stopping
                break
            event, data = snapshot
            yield f"event: {event}\ndata: {data}\n\n"
    yield "event: bye\ndata: {}\n\n"


@router.get("/live")
async def live(
    request: Request,
    topic: Annotated[str, Query(max_length=512)],
    ticket: Annotated[str, Query(max_length=200)],
) -> StreamingResponse:
    """Server-sent events for ``topic``: ``update`` (the snapshot), ``problem`` (e.g. the
    rollout is gone) and ``bye`` (reconnect with a new ticket)."""
    if not _TOPIC.match(topic):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "topic must be overview, rollouts, audit[?filters], devices[?filters], rollout/<id> "
            f"or device/<id>, got {topic!r}",
        )
    try:
        list_filters(topic)
    except ValidationError as e:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"bad filters in topic {topic!r}: {e}"
        ) from e
    engine = request.app.state.engine

    def authenticate() -> ApiToken | None:
        with Session(engine) as session:
            return check_ticket(session, ticket, now=time.time())

    if await asyncio.to_thread(authenticate) is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "unknown, expired or revoked stream ticket; get one from POST /api/v1/console/ticket",
        )
    return StreamingResponse(
        _events(_hub(request), topic),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
