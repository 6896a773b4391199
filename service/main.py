"""The FastAPI application: ``create_app(settings)`` and the module-level ``app`` for uvicorn
(``uvicorn service.main:app``; configuration from ``NEXTWORD_*`` environment variables).

The lifespan starts the engine (device check, repository load, watcher) in a worker thread and
stops it on shutdown, draining queued work. An unusable ``NEXTWORD_DEVICE=cuda`` fails start-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.config import Settings
from service.engine import Engine
from service.errors import install_error_handlers
from service.logging import configure_logging
from service.metrics import MetricsMiddleware
from service.routers import health, models, predict

log = logging.getLogger("service.main")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    engine = Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        report = await asyncio.to_thread(engine.start)
        log.info(
            "serving %s: %d version(s) loaded, %d failed",
            settings.model_repository, len(report.loaded), len(report.failed),
        )
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(
        title="nextword",
        description="Next-word prediction with recurrent language models (onnxruntime).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware)
    app.include_router(predict.router)
    app.include_router(models.router)
    app.include_router(health.router)
    return app


app = create_app()
