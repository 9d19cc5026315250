"""HTTP API routers: validate, call crud/releases, return. Authorisation by token role.

Roles: ``viewer`` reads; ``operator`` also publishes releases and acts on rollouts; ``admin``
also enrolls devices and manages tokens. Tokens arrive as ``Authorization: Bearer <token>``.
A token found in the database is remembered for ``TOKEN_CACHE_S`` seconds, so that a request
costs no token query. A token revoked through this service (``DELETE /api/v1/tokens/{name}``)
is refused from the next request on; one revoked elsewhere (another replica, the database
itself) keeps working that long at most in each running service.

The device list is paged: ``limit`` (default ``DEFAULT_PAGE``, at most ``MAX_PAGE``) and
``after``, the last device id of the previous page. A full page carries the URL of the next one
in a ``Link: <...>; rel="next"`` header; the last page has none. An answer is reused for the same
query for ``device_list_cache_s`` seconds (setting; 1 s by default): the list may be that much
behind device reports and other replicas, never behind this service's own enrolments and group
changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import anyio
import anyio.to_thread
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    status,
)
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from fleet import crud
from fleet.models import (
    ApiToken,
    AuditEntry,
    Device,
    DeviceEvent,
    DeviceModel,
    GroupPin,
    Release,
    RolloutRecord,
)
from fleet.releases import ReleaseConflictError, publish_release
from fleet.rollout_options import RolloutOptions
from fleet.ttl_cache import TtlCache
from shared.errors import EdgefleetError
from shared.manifest import NAME_PATTERN, VERSION_PATTERN
from shared.protocol import DEVICE_ID_PATTERN

__all__ = ["router"]

logger = logging.getLogger(__name__)


class Problem(BaseModel):
    """An error answer. ``detail`` is one sentence when the service refuses a request, and a
    list of problems (FastAPI's format) when the request does not match its declared shape."""

    detail: str | list[dict[str, Any]]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem} for code in codes}


# Every endpoint needs a token (401, 403) and may refuse input (422).
router = APIRouter(prefix="/api/v1", responses=_errors(401, 403, 422))
ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
TOKEN_CACHE_S = 5.0
DEFAULT_PAGE = 100
MAX_PAGE = 1000
PAGE_READERS = 8  # threads that read device pages from PostgreSQL at once (its pool has 20)
PAGES_CACHED = 64  # device-list answers remembered at most (a page of 1,000 is about 150 kB)
PageKey = tuple[str, bytes]  # root path, query string
Page = tuple[bytes, dict[str, str]]  # body, headers
MAX_OFFSET = 10**9  # beyond any fleet, and within every database's integers
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f]*$"  # PostgreSQL refuses NUL in text outright
DeviceId = Annotated[str, Path(pattern=DEVICE_ID_PATTERN)]
RolloutId = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
GroupName = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
ModelName = Annotated[str, Path(pattern=NAME_PATTERN)]


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _token_cache(app: FastAPI) -> TtlCache[str, ApiToken]:
    """Live tokens found in the database in the last ``TOKEN_CACHE_S`` seconds, by the stored
    digest of their secret. A hit is the token found then: one object, detached from its
    session and shared by the requests that present it, so read it and never change it."""
    if not hasattr(app.state, "token_cache"):
        app.state.token_cache = TtlCache[str, ApiToken](TOKEN_CACHE_S)
    cache: TtlCache[str, ApiToken] = app.state.token_cache
    return cache


def _authenticate(engine: Engine, secret: str) -> ApiToken | None:
    with Session(engine) as session:
        token = crud.authenticate(session, secret)
        if token is not None:
            session.expunge(token)
        return token


def require(role: str) -> Callable[..., Awaitable[ApiToken]]:
    """A dependency that admits tokens of ``role`` or a higher one.

    It runs on the event loop; only a token not seen in the last ``TOKEN_CACHE_S`` seconds
    costs a database query (in the thread pool).
    """

    async def check(request: Request) -> ApiToken:
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "expected 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        cache = _token_cache(request.app)
        digest = crud.secret_digest(secret)
        token = cache.get(digest)
        if token is None:
            generation = cache.generation  # a revocation meanwhile must win: see TtlCache
            token = await run_in_threadpool(_authenticate, request.app.state.engine, secret)
            if token is not None:
                cache.put(digest, token, generation=generation)
        if token is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "unknown or revoked token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if ROLE_RANK[token.role] < ROLE_RANK[role]:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this action needs the {role} role; the token has {token.role}",
            )
        return token

    return check


Viewer = Annotated[ApiToken, Depends(require("viewer"))]
Operator = Annotated[ApiToken, Depends(require("operator"))]
Admin = Annotated[ApiToken, Depends(require("admin"))]


class DeviceOut(crud.ListedDevice):  # the same TypedDict, under the API's name for it
    pass


DEVICE = TypeAdapter(DeviceOut)
DEVICE_LIST = TypeAdapter(list[DeviceOut])


class ReleaseOut(BaseModel):
    name: str
    version: str
    counter: int
    rollback_floor: int
    expires: datetime
    manifest_sha256: str
    size: int
    formats: list[str]
    hardware_ids: list[str]
    published_at: datetime
    published_by: str


def _device_out(device: Device, models: dict[str, Any]) -> dict[str, Any]:
    listed = DeviceOut(
        id=device.id,
        online=device.online,
        hardware_class=device.hardware_class,
        group=device.group,
        last_seen=device.last_seen,
        models=models,
    )
    return dict(DEVICE.dump_python(listed, mode="json"))


@router.get("/whoami")
def whoami(token: Viewer) -> dict[str, str]:
    return {"name": token.name, "role": token.role}


def _read_device_page(engine: Engine, **query: Any) -> list[crud.ListedDevice]:
    """One page of the device list, read on its own connection.

    SQLite runs it on the event loop: the work is the process's own CPU whatever thread does
    it, and a thread would add two hand-overs between threads per request, which cost more
    than the query on a busy machine; with WAL a read never waits for a writer. PostgreSQL runs
    it in at most ``PAGE_READERS`` threads, which overlap the round trips; fewer threads than
    the pool has connections, so that busy lists never make the pool open and close its
    overflow connections.
    """
    with crud.reading(engine) as connection:
        return crud.device_page(connection, **query)


def _page_cache(app: FastAPI) -> TtlCache[PageKey, Page]:
    """Device-list answers (body, headers) by query, for ``device_list_cache_s`` seconds."""
    if not hasattr(app.state, "page_cache"):
        ttl_s = app.state.settings.device_list_cache_s
        app.state.page_cache = TtlCache[PageKey, Page](ttl_s, max_entries=PAGES_CACHED)
    cache: TtlCache[PageKey, Page] = app.state.page_cache
    return cache


@contextlib.asynccontextmanager
async def _one_reader(app: FastAPI, key: PageKey) -> AsyncIterator[None]:
    """Let one request at a time read the page ``key``, so that when a remembered answer
    expires the requests that come for it meanwhile wait for one read (on PostgreSQL, where the
    read awaits a thread) instead of all reading it at once."""
    if not hasattr(app.state, "page_locks"):
        app.state.page_locks = {}
    locks: dict[PageKey, tuple[asyncio.Lock, int]] = app.state.page_locks
    lock, users = locks.get(key, (asyncio.Lock(), 0))
    locks[key] = (lock, users + 1)
    try:
        async with lock:
            yield
    finally:
        lock, users = locks[key]
        if users == 1:
            del locks[key]
        else:
            locks[key] = (lock, users - 1)


def _page_readers(app: FastAPI) -> anyio.CapacityLimiter:
    if not hasattr(app.state, "page_readers"):
        app.state.page_readers = anyio.CapacityLimiter(PAGE_READERS)
    limiter: anyio.CapacityLimiter = app.state.page_readers
    return limiter


NEXT_PAGE_HEADER = {
    "Link": {
        "description": 'On a full page: `<URL of the next page>; rel="next"`.',
        "schema": {"type": "string"},
    }
}


@router.get(
    "/devices", response_model=list[DeviceOut], responses={200: {"headers": NEXT_PAGE_HEADER}}
)
async def list_devices(
    request: Request,
    _: Viewer,
    online: bool | None = None,
    hardware_class: Annotated[
        str | None, Query(max_length=128, pattern=NO_CONTROL_CHARACTERS)
    ] = None,
    search: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    after: Annotated[
        str | None,
        Query(pattern=DEVICE_ID_PATTERN, description="the last device id of the previous page"),
    ] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Response:
    """Devices ordered by id, one page at a time (see the ``Link`` header for the next).

    The same page is answered from memory for ``device_list_cache_s`` (1 s by default), so it
    may be that much behind device reports and other replicas; this service's own changes to
    what the list shows (enrolment, groups) are in the next answer.
    """
    pages = _page_cache(request.app)
    key = (request.scope.get("root_path", ""), request.scope["query_string"])
    query = {
        "limit": limit,
        "after": after,
        "offset": offset,
        "online": online,
        "hardware_class": hardware_class,
        "search": search,
    }
    page = pages.get(key)
    if page is None and pages.ttl_s <= 0:
        page = await _answer_device_page(request, query)
    elif page is None:
        async with _one_reader(request.app, key):  # the others wait, then find its answer
            page = pages.get(key)
            if page is None:
                generation = pages.generation  # a change meanwhile must win: see TtlCache
                page = await _answer_device_page(request, query)
                pages.put(key, page, generation=generation)
    body, headers = page
    return Response(body, media_type="application/json", headers=headers)


async def _answer_device_page(request: Request, query: dict[str, Any]) -> Page:
    """The body and headers of a device-list answer, read from the database."""
    engine = request.app.state.engine
    read = functools.partial(_read_device_page, engine, **query)
    if engine.dialect.name == "sqlite":
        devices = read()
    else:
        devices = await anyio.to_thread.run_sync(read, limiter=_page_readers(request.app))
    headers = {}
    if len(devices) == query["limit"]:
        headers["Link"] = _next_page_link(request, after=devices[-1]["id"])
    return DEVICE_LIST.dump_json(devices), headers


def _next_page_link(request: Request, *, after: str) -> str:
    """``<this URL without offset and after, then after=...>; rel="next"``."""
    query = [(k, v) for k, v in request.query_params.multi_items() if k not in ("offset", "after")]
    return f'<{request.url.path}?{urlencode([*query, ("after", after)])}>; rel="next"'


@router.get("/devices/{device_id}", responses=_errors(404))
def show_device(device_id: DeviceId, session: SessionDep, _: Viewer) -> dict[str, Any]:
    device = _device(session, device_id)
    models = session.exec(select(DeviceModel).where(DeviceModel.device_id == device_id))
    events = session.exec(
        select(DeviceEvent)
        .where(DeviceEvent.device_id == device_id)
        .order_by(col(DeviceEvent.seq).desc())
        .limit(100)
    )
    return {
        **_device_out(device, {m.model: m.version for m in models}),
        "inventory": device.inventory,
        "model_details": [
            m.model_dump(mode="json")
            for m in session.exec(select(DeviceModel).where(DeviceModel.device_id == device_id))
        ],
        "events": [e.model_dump(mode="json", exclude={"id"}) for e in events],
    }


@router.get("/releases", response_model=list[ReleaseOut])
def list_releases(session: SessionDep, _: Viewer) -> list[Release]:
    return crud.releases(session)


@router.post(
    "/releases",
    response_model=ReleaseOut,
    status_code=status.HTTP_201_CREATED,
    responses=_errors(409, 413),
)
async def upload_release(request: Request, token: Operator) -> Release:
    """Upload a signed bundle (the raw file as the request body)."""
    settings = request.app.state.settings
    declared = int(request.headers.get("content-length") or 0)
    if declared > settings.max_upload_bytes:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"bundle of {declared} bytes exceeds the limit of {settings.max_upload_bytes}",
        )
    with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > settings.max_upload_bytes:
                raise HTTPException(
                    status.HTTP_413_CONTENT_TOO_LARGE,
                    f"upload exceeds the limit of {settings.max_upload_bytes}",
                )
            spool.write(chunk)
        spool.seek(0)
        with Session(request.app.state.engine) as session:
            try:
                release = publish_release(
                    session,
                    spool,  # type: ignore[arg-type]
                    bundles_dir=settings.bundles_dir,
                    trust_root=request.app.state.trust_root,
                    actor=token.name,
                    max_bytes=settings.max_upload_bytes,
                )
            except ReleaseConflictError as e:
                raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from e
            except EdgefleetError as e:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT, f"bundle refused: {e}"
                ) from e
            session.commit()
            session.refresh(release)
            request.app.state.on_release(release)
            return release


@router.get("/audit")
def audit_log(
    session: SessionDep, _: Viewer, limit: Annotated[int, Query(ge=1, le=10_000)] = 200
) -> dict[str, Any]:
    entries = session.exec(select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit))
    return {
        "chain_ok": crud.verify_audit_chain(session) is None,
        "entries": [e.model_dump(mode="json") for e in entries],
    }


class TokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=NO_CONTROL_CHARACTERS)
    role: str


@router.post("/tokens", status_code=status.HTTP_201_CREATED, responses=_errors(409))
def create_token(body: TokenIn, session: SessionDep, token: Admin) -> dict[str, str]:
    if body.role not in crud.ROLES:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"role must be one of {', '.join(crud.ROLES)}, got {body.role!r}",
        )
    if session.exec(select(ApiToken).where(ApiToken.name == body.name)).first():
        raise HTTPException(status.HTTP_409_CONFLICT, f"a token named {body.name!r} exists")
    secret = crud.create_token(session, name=body.name, role=body.role)
    crud.append_audit(
        session,
        actor=token.name,
        action="token.create",
        target=body.name,
        details={"role": body.role},
    )
    session.commit()
    return {"name": body.name, "role": body.role, "token": secret}


TokenName = Annotated[str, Path(max_length=64, pattern=NO_CONTROL_CHARACTERS)]


@router.delete("/tokens/{name}", responses=_errors(404, 409))
def revoke_token(
    name: TokenName, request: Request, session: SessionDep, token: Admin
) -> dict[str, Any]:
    """Revoke a token. This service refuses it from the next request on; another replica of
    the service may still take it for ``TOKEN_CACHE_S`` seconds (the time it remembers a
    token)."""
    if name == token.name:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "a token cannot revoke itself; use another admin token"
        )
    revoked = crud.revoke_token(session, name=name)
    if revoked is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no live token named {name!r}")
    crud.append_audit(session, actor=token.name, action="token.revoke", target=name)
    session.commit()
    _token_cache(request.app).forget(revoked.secret_sha256)
    return {"name": name, "role": revoked.role, "revoked": True}


@router.post("/devices/{device_id}/enroll", status_code=status.HTTP_201_CREATED)
def enroll_device(
    device_id: DeviceId, request: Request, session: SessionDep, token: Admin
) -> dict[str, Any]:
    """Register a device and issue its mutual-TLS credentials (returned once)."""
    from fleet.pki import DeviceCA

    try:
        credentials = DeviceCA(request.app.state.settings.data_dir / "pki").issue(device_id)
    except EdgefleetError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
    device = session.get(Device, device_id) or Device(id=device_id)
    device.enrolled_at = crud.now_utc()
    session.add(device)
    crud.append_audit(session, actor=token.name, action="device.enroll", target=device_id)
    session.commit()
    _page_cache(request.app).clear()
    return {
        "device_id": device_id,
        "cert_pem": credentials.cert_pem.decode(),
        "key_pem": credentials.key_pem.decode(),
        "ca_pem": credentials.ca_pem.decode(),
        "trust_root": request.app.state.trust_root.decode(),
    }


# -- pins and groups -----------------------------------------------------------------------------
# A pin keeps a device (or every device of a group) on one version of a model: rollouts skip it
# until the pin goes. A device's own pin wins over its group's.


class PinIn(BaseModel):
    version: str = Field(pattern=VERSION_PATTERN)


class GroupIn(BaseModel):
    group: str | None = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")


def _found(session: Session, table: type[Any], key: str, what: str) -> Any:
    """The row of ``table`` with primary key ``key``, or a 404 naming what was asked for."""
    row = session.get(table, key)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {what} {key!r}")
    return row


def _device(session: Session, device_id: str) -> Device:
    device: Device = _found(session, Device, device_id, "device")
    return device


@router.put("/devices/{device_id}/pins/{model}", responses=_errors(404))
def pin_device(
    device_id: DeviceId, model: ModelName, body: PinIn, session: SessionDep, token: Operator
) -> dict[str, Any]:
    """Keep this device on ``version`` of ``model`` whatever rollouts say."""
    device = _device(session, device_id)
    device.pinned = {**(device.pinned or {}), model: body.version}
    session.add(device)
    crud.append_audit(
        session,
        actor=token.name,
        action="device.pin",
        target=device_id,
        details={"model": model, "version": body.version},
    )
    session.commit()
    return {"device_id": device_id, "pinned": device.pinned}


@router.delete("/devices/{device_id}/pins/{model}", responses=_errors(404))
def unpin_device(
    device_id: DeviceId, model: ModelName, session: SessionDep, token: Operator
) -> dict[str, Any]:
    device = _device(session, device_id)
    if model not in (device.pinned or {}):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{device_id} has no pin for {model}")
    device.pinned = {k: v for k, v in device.pinned.items() if k != model}
    session.add(device)
    crud.append_audit(
        session, actor=token.name, action="device.unpin", target=device_id, details={"model": model}
    )
    session.commit()
    return {"device_id": device_id, "pinned": device.pinned}


@router.put("/devices/{device_id}/group", responses=_errors(404))
def set_group(
    device_id: DeviceId, body: GroupIn, request: Request, session: SessionDep, token: Operator
) -> dict[str, Any]:
    """Put the device in a group (rollout targets ``group=NAME``, group pins), or none."""
    device = _device(session, device_id)
    device.group = body.group
    session.add(device)
    crud.append_audit(
        session,
        actor=token.name,
        action="device.group",
        target=device_id,
        details={"group": body.group},
    )
    session.commit()
    _page_cache(request.app).clear()
    return {"device_id": device_id, "group": device.group}


@router.get("/groups/{group}/pins")
def group_pins(group: GroupName, session: SessionDep, _: Viewer) -> dict[str, str]:
    return {
        p.model: p.version for p in session.exec(select(GroupPin).where(GroupPin.group == group))
    }


@router.put("/groups/{group}/pins/{model}")
def pin_group(
    group: GroupName, model: ModelName, body: PinIn, session: SessionDep, token: Operator
) -> dict[str, str]:
    """Keep every device of ``group`` (now and later) on ``version`` of ``model``."""
    pin = session.exec(
        select(GroupPin).where(GroupPin.group == group, GroupPin.model == model)
    ).first() or GroupPin(
        group=group, model=model, version=body.version, set_by=token.name, set_at=crud.now_utc()
    )
    pin.version, pin.set_by, pin.set_at = body.version, token.name, crud.now_utc()
    session.add(pin)
    crud.append_audit(
        session,
        actor=token.name,
        action="group.pin",
        target=group,
        details={"model": model, "version": body.version},
    )
    session.commit()
    return group_pins(group, session, token)


@router.delete("/groups/{group}/pins/{model}", responses=_errors(404))
def unpin_group(
    group: GroupName, model: ModelName, session: SessionDep, token: Operator
) -> dict[str, str]:
    pin = session.exec(
        select(GroupPin).where(GroupPin.group == group, GroupPin.model == model)
    ).first()
    if pin is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"group {group} has no pin for {model}")
    session.delete(pin)
    crud.append_audit(
        session, actor=token.name, action="group.unpin", target=group, details={"model": model}
    )
    session.commit()
    return group_pins(group, session, token)


# -- rollouts ------------------------------------------------------------------------------------


class RolloutRequest(RolloutOptions):
    """A release, a target, and the rollout options that differ from the fleet's defaults.

    An option left out takes the fleet's default (``GET /api/v1/rollout-defaults``; the defaults
    this schema shows are the built-in ones), and ``gates`` changes only the thresholds it names.
    ``null`` for ``stages`` or ``gates``, and ``[]`` for ``stages``, mean the default, as they
    always have. A field the API does not know is refused (a misspelt option must not quietly
    become the fleet's default).
    """

    model_config = ConfigDict(extra="forbid")
    model: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    target: str = Field(default="", max_length=512, pattern=NO_CONTROL_CHARACTERS)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # what a request may send to mean "the default"
            defaults: dict[str, tuple[Any, ...]] = {"stages": (None, []), "gates": (None,)}
            return {k: v for k, v in data.items() if not any(v == d for d in defaults.get(k, ()))}
        return data

    def options(self, defaults: RolloutOptions) -> RolloutOptions:
        """The options this request gives, laid over ``defaults``."""
        given = self.model_dump(exclude_unset=True, include=set(RolloutOptions.model_fields))
        return defaults.merged(given)


class RolloutIn(RolloutRequest):
    plan: dict[str, Any] | None = Field(
        default=None, description="a plan from the console's preview: wins over the options"
    )


def rollout_defaults(request: Request) -> RolloutOptions:
    """The fleet's rollout options for what a request leaves out (``FleetSettings``)."""
    defaults: RolloutOptions = request.app.state.settings.rollout_defaults
    return defaults


def _service(request: Request) -> Any:
    return request.app.state.rollouts


@router.post("/rollouts", status_code=status.HTTP_201_CREATED)
def create_rollout(
    body: RolloutIn, request: Request, session: SessionDep, token: Operator
) -> dict[str, Any]:
    service = _service(request)
    try:
        record = service.create(
            session,
            model=body.model,
            version=body.version,
            actor=token.name,
            target=body.target,
            options=body.options(rollout_defaults(request)),
            plan=body.plan,
        )
    except EdgefleetError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
    session.commit()
    try:
        service.tick()  # start it now rather than at the scheduler's next tick
    except OperationalError as e:  # e.g. a deadlock the database broke: the scheduler retries
        logger.warning("rollout %s: its first step is left to the scheduler: %s", record.id, e)
    session.refresh(record)
    return dict(service.status(session, record))


@router.get("/rollout-defaults", response_model=RolloutOptions)
def get_rollout_defaults(request: Request, _: Viewer) -> RolloutOptions:
    """The options a new rollout gets for what its request leaves out: the fleet's policy."""
    return rollout_defaults(request)


@router.get("/rollouts")
def list_rollouts(request: Request, session: SessionDep, _: Viewer) -> list[dict[str, Any]]:
    records = session.exec(select(RolloutRecord).order_by(col(RolloutRecord.created_at).desc()))
    return [_service(request).status(session, r) for r in records]


def _rollout(session: Session, rollout_id: str) -> Any:
    return _found(session, RolloutRecord, rollout_id, "rollout")


@router.get("/rollouts/{rollout_id}", responses=_errors(404))
def rollout_status(
    rollout_id: RolloutId, request: Request, session: SessionDep, _: Viewer
) -> dict[str, Any]:
    return dict(_service(request).status(session, _rollout(session, rollout_id)))


@router.get("/rollouts/{rollout_id}/preview", responses=_errors(404))
def rollout_preview(
    rollout_id: RolloutId, request: Request, session: SessionDep, _: Viewer
) -> dict[str, Any]:
    return dict(_service(request).preview(session, _rollout(session, rollout_id)))


@router.post("/rollouts/{rollout_id}/{action}", responses=_errors(404, 409))
def rollout_action(
    rollout_id: RolloutId,
    action: str,
    request: Request,
    session: SessionDep,
    token: Operator,
    revert: bool = False,
) -> dict[str, Any]:
    if action not in ("pause", "resume", "promote", "abort", "retry-failed"):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no rollout action {action!r}")
    _rollout(session, rollout_id)
    service = _service(request)
    with service.stepping:  # the scheduler must not step this rollout until we commit
        try:
            record = service.act(session, rollout_id, action, actor=token.name, revert=revert)
        except EdgefleetError as e:
            raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from e
        session.commit()
    return dict(service.status(session, record))
