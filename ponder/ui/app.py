"""The page's server: static assets and four JSON endpoints over one trace store file.

Each request opens the store read-only and closes it again: the writer (a file run or a worker,
another process) appends at its checkpoints, and SQLite's write-ahead log lets both go on.
Starlette and uvicorn come with the `jax` extra; they are imported here, only by `ponder ui`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from ponder.runtime.tracestore import TraceStore, explain_doc

__all__ = ["STATIC", "create_app", "serve"]

STATIC = Path(__file__).parent / "static"
MAX_DECISIONS = 500  # per poll: a page that fell behind catches up over a few polls
MAX_POINTS = 5000  # gate rows per timeline


def _starlette():
    try:
        import starlette  # noqa: F401
    except ImportError as e:
        msg = "ponder ui needs starlette and uvicorn: pip install 'ponder[jax]' (or starlette uvicorn)"
        raise RuntimeError(msg) from e


def create_app(store: str | Path):
    """The Starlette app serving the page over the trace store at `store`."""
    _starlette()
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    path = Path(store)

    def respond(doc: Any, status: int = 200) -> Response:
        return Response(msgspec.json.encode(doc, enc_hook=str), status_code=status, media_type="application/json")

    def opened() -> TraceStore:
        return TraceStore(path, readonly=True)

    def error(text: str, status: int) -> Response:
        return JSONResponse({"error": text}, status_code=status)

    def number(request: Request, name: str, default: int, hi: int) -> int:
        raw = request.query_params.get(name)
        if raw is None:
            return default
        try:
            v = int(raw)
        except ValueError:
            msg = f"{name} must be an integer, got {raw!r}"
            raise ValueError(msg) from None
        if v < 0:
            msg = f"{name} must be >= 0, got {v}"
            raise ValueError(msg)
        return min(v, hi)

    def guarded(fn):
        def endpoint(request: Request) -> Response:
            try:
                return fn(request)
            except ValueError as e:
                return error(str(e), 400)
            except FileNotFoundError as e:  # the writer has not started yet
                return error(str(e), 503)
        return endpoint

    @guarded
    def decisions(request: Request) -> Response:
        after = number(request, "after", 0, 2**62)
        limit = number(request, "limit", MAX_DECISIONS, MAX_DECISIONS)
        db = opened()
        try:
            return respond({"decisions": db.decisions_after(after, limit)})
        finally:
            db.close()

    @guarded
    def keys(request: Request) -> Response:
        db = opened()
        try:
            return respond({"keys": db.keys()})
        finally:
            db.close()

    @guarded
    def timeline(request: Request) -> Response:
        key = request.query_params.get("key")
        if not key:
            return error("timeline needs ?key=KEY (and &tenant=T for a tenant's key)", 400)
        tenant = request.query_params.get("tenant")
        limit = number(request, "limit", MAX_POINTS, MAX_POINTS)
        db = opened()
        try:
            gates, decs = db.timeline(key, tenant, limit)
        finally:
            db.close()
        return respond({"key": key, "tenant": tenant, "gates": gates,
                        "decisions": [{"decision_id": d.decision_id, "ts": d.ts, "action": d.action,
                                       "severity": d.severity, "tier": d.tier, "reason": d.reason}
                                      for d in decs]})

    @guarded
    def explain(request: Request) -> Response:
        did = request.path_params["decision_id"]
        db = opened()
        try:
            sd = db.get(did)
        finally:
            db.close()
        if sd is None:
            return error(f"no decision {did!r} in the store (never made, or dropped by its bounds)", 404)
        return respond(explain_doc(sd))

    routes = [
        Route("/api/decisions", decisions),
        Route("/api/keys", keys),
        Route("/api/timeline", timeline),
        Route("/api/explain/{decision_id:path}", explain),
        Mount("/", StaticFiles(directory=STATIC, html=True)),
    ]
    return Starlette(routes=routes)


def serve(store: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the page until interrupted."""
    _starlette()
    import uvicorn

    uvicorn.run(create_app(store), host=host, port=port, log_level="warning")
