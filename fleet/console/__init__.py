"""The fleet web console: a browser UI served by the fleet service itself, at ``/``.

How the pieces fit:

- ``static/`` — the whole UI: ``index.html``, one stylesheet and plain ES modules (no build
  step, no CDN, nothing fetched from the internet). ``js/main.js`` logs in with an API token,
  routes ``#/...`` addresses to one module per page in ``js/pages/``, and hides the action
  buttons a token's role may not use; ``js/charts.js`` draws the small SVG charts.
- :mod:`fleet.console.queries` — what the pages show, from SQL aggregates and paginated reads;
- :mod:`fleet.console.rollout_views` — rollout summaries, the rollout page and the dry-run
  preview of a plan;
- :mod:`fleet.console.routes` — the JSON and server-sent-event endpoints under
  ``/api/v1/console``;
- :mod:`fleet.console.live` — stream tickets and the shared poller behind live updates; the
  overview is computed at most once per ``OVERVIEW_MAX_AGE_S`` for every viewer and the poller.

Actions go through the API's own endpoints, so the API refuses what a role may not do whatever
the page shows. :func:`install` adds all of it to the fleet's FastAPI application.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from fleet.console.live import Recent
from fleet.console.rollout_views import RolloutViews
from fleet.console.routes import router

__all__ = ["STATIC", "end_live_streams", "install"]

STATIC = Path(__file__).parent / "static"
# Viewers and the live feed share an overview this young; below the feed's poll interval
# (0.25 s), so the feed never takes its own previous result and updates stay as prompt.
OVERVIEW_MAX_AGE_S = 0.2
# Only the console's own files run or load: no inline script, no other origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install(app: FastAPI) -> None:
    """Serve the console at ``/`` (assets under ``/console/``) and its API routes.

    Needs ``app.state.rollouts`` (the :class:`~fleet.rollout_service.RolloutService`),
    ``app.state.engine`` and ``app.state.trust_root``, as :func:`fleet.app.create_app` sets.
    """
    app.state.console_views = RolloutViews(app.state.rollouts)
    app.state.console_overview = Recent(OVERVIEW_MAX_AGE_S)
    app.state.console_hub = None  # created by the first live stream, inside the event loop
    app.include_router(router)
    app.mount("/console", StaticFiles(directory=STATIC), name="console")

    @app.get("/", include_in_schema=False)
    def console_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


def end_live_streams(app: FastAPI) -> None:
    """End the console's open live streams now: call it when the server starts to stop.

    The ASGI server tells a streaming response nothing of a shutdown, and waits for it to end
    (at most ``STREAM_LIFETIME_S``, 30 s). Safe from a signal handler and from any thread.
    """
    hub = getattr(app.state, "console_hub", None)
    if hub is not None:
        hub.close_threadsafe()
