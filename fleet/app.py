"""``create_app(settings)``: the fleet service as a FastAPI application.

Start-up (in the lifespan): open the database and apply migrations, make sure an admin token
exists (``EDGEFLEET_ADMIN_TOKEN``, or a generated one saved to ``<data_dir>/admin-token`` with
mode 0600), index the published bundles, and start the MQTT bridge when a broker is configured.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from sqlmodel import Session, select

from fleet import crud
from fleet.api import router
from fleet.config import FleetSettings
from fleet.console import install as install_console
from fleet.db import make_engine, migrate
from fleet.distribution import BundleRepository
from fleet.models import ApiToken, Release
from fleet.mqtt_bridge import MqttBridge
from fleet.rollout_service import RolloutService
from shared.errors import UsageError
from shared.keystore import KeyStore

__all__ = ["bootstrap_admin_token", "create_app"]

logger = logging.getLogger(__name__)
DEVICES = Gauge("edgefleet_devices", "Devices known to the fleet")


def bootstrap_admin_token(settings: FleetSettings, session: Session) -> Path | None:
    """Ensure an admin token exists; return where a generated one was saved (else None)."""
    given = os.environ.get("EDGEFLEET_ADMIN_TOKEN")
    if given:
        if crud.authenticate(session, given) is None:
            if session.exec(select(ApiToken).where(ApiToken.name == "admin")).first():
                raise UsageError("EDGEFLEET_ADMIN_TOKEN differs from the stored admin token")
            crud.create_token(session, name="admin", role="admin", secret=given)
            session.commit()
        return None
    if session.exec(select(ApiToken).where(ApiToken.role == "admin")).first():
        return None
    secret = crud.create_token(session, name="admin", role="admin")
    session.commit()
    path = settings.data_dir / "admin-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


def _trust_root(settings: FleetSettings) -> bytes:
    if settings.keys is None:
        raise UsageError("the fleet needs --keys KEYS_DIR (its root.json verifies releases)")
    path = settings.keys / "root.json"
    if not path.is_file():
        raise UsageError(f"{path}: no trust root there (create keys with 'edgefleet keys init')")
    return path.read_bytes()


def _schedule(rollouts: RolloutService, stop: threading.Event, settings: FleetSettings) -> None:
    """Step the active rollouts every ``rollout_tick_s`` until ``stop``."""
    while not stop.wait(settings.rollout_tick_s):
        try:
            rollouts.tick()
        except Exception:  # a bad tick must not stop the scheduler; the next one retries
            logger.exception("rollout tick failed")


def create_app(settings: FleetSettings) -> FastAPI:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    trust_root = _trust_root(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate(engine)
        with Session(engine) as session:
            saved = bootstrap_admin_token(settings, session)
            if saved is not None:
                logger.warning("created an admin token; it is saved in %s", saved)
            for release in session.exec(select(Release)):
                if Path(release.path).is_file():
                    repo.add(Path(release.path))
        bridge = MqttBridge(settings, engine, repo) if settings.broker else None
        app.state.bridge = bridge
        rollouts.send = bridge.send_command if bridge is not None else None
        if bridge is not None:
            bridge.start()
        stop = threading.Event()
        scheduler = threading.Thread(
            target=_schedule, args=(rollouts, stop, settings), name="fleet-rollouts", daemon=True
        )
        scheduler.start()
        yield
        stop.set()
        scheduler.join(10)
        if bridge is not None:
            bridge.stop()
        engine.dispose()

    app = FastAPI(title="edgefleet fleet service", version="0.1.0", lifespan=lifespan)
    repo = BundleRepository()
    app.state.settings = settings
    app.state.engine = engine
    app.state.trust_root = trust_root
    app.state.repo = repo
    app.state.on_release = lambda release: repo.add(Path(release.path))
    keys = KeyStore.open(settings.keys) if settings.keys is not None else None
    rollouts = RolloutService(engine, keys, trust_root)
    app.state.rollouts = rollouts
    app.include_router(router)
    install_console(app)  # the web console at /, its API under /api/v1/console

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        with Session(engine) as session:
            DEVICES.set(crud.count_devices(session))
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(UsageError)
    async def usage_error(_: Request, exc: UsageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer, but one that can quote NaN or Infinity (which Python's JSON
        # parser reads in a request body) as what arrived, instead of failing to encode it
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, 422)

    return app


def _json_safe(value: object) -> object:
    """``value`` with every non-finite float replaced by its text (``"nan"``, ``"inf"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
