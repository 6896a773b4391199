"""``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/models/reload``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from service.api.body import CheckedRoute
from service.api.deps import EngineDep, RepositoryDep
from service.api.protocol.native import ErrorResponse, ModelInfo, ModelsResponse, ReloadResponse, model_info
from service.engine import ModelRepository

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=CheckedRoute)


def _models(repository: ModelRepository) -> list[ModelInfo]:
    return [model_info(name, versions) for name, versions in repository.status().items()]


@router.get("", response_model=ModelsResponse)
async def list_models(engine: EngineDep, repository: RepositoryDep) -> ModelsResponse:
    """Every model with its versions, status (serving/loaded/failed + error), device and card metrics."""
    try:
        default = repository.default_name()
    except Exception:
        default = None
    device = engine.device
    return ModelsResponse(
        default_model=default, device=engine.settings.device,
        providers=list(device.providers) if device else [], device_note=device.note if device else None,
        models=_models(repository),
    )


@router.get("/{name}", response_model=ModelInfo, responses={404: {"model": ErrorResponse}})
async def get_model(name: str, repository: RepositoryDep) -> ModelInfo:
    return model_info(name, repository.status(name)[name])


@router.post("/reload", response_model=ReloadResponse)
async def reload_models(repository: RepositoryDep) -> ReloadResponse:
    """Rescan the repository now: load new versions (retrying failed ones), unload removed ones.
    Loading runs in a worker thread; requests keep being served meanwhile."""
    report = await asyncio.to_thread(repository.scan, True)
    return ReloadResponse(
        loaded=[f"{n}/{v}" for n, v in report.loaded],
        failed=[{"model": n, "version": v, "error": e} for n, v, e in report.failed],
        unloaded=[f"{n}/{v}" for n, v in report.unloaded],
        models=_models(repository),
    )
