"""``GET /healthz`` (the process is up), ``GET /readyz`` (a model can answer and the process is not
draining), ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.api.protocol.native import HealthResponse, ReadyResponse
from service.metrics import render_latest

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(request: Request) -> JSONResponse:
    """200 when at least one model version is loaded and the process is not shutting down, else
    503 (keep traffic away)."""
    engine = request.app.state.engine
    serving = engine.repository.serving() if engine.started else {}
    draining = request.app.state.drain.draining
    ready = bool(serving) and not draining
    body = ReadyResponse(ready=ready, models={n: lv.version for n, lv in serving.items()}, draining=draining)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    data, content_type = render_latest()
    return Response(data, media_type=content_type)
