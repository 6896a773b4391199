"""FastAPI dependencies (``Annotated`` aliases) giving handlers the settings and engine parts.

They are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in its thread pool,
which costs a thread hop per dependency per request on the hot path.

The engine lives on ``app.state`` (created by ``create_app``, started by its lifespan), so tests
can build an app around any settings and several apps can coexist in one process."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.engine import Engine, ModelRepository, Predictor
from service.sessions import SessionManager


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_repository(request: Request) -> ModelRepository:
    return request.app.state.engine.repository


async def get_predictor(request: Request) -> Predictor:
    return request.app.state.engine.predictor


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]


async def get_sessions(request: Request) -> SessionManager:
    return request.app.state.sessions


SessionsDep = Annotated[SessionManager, Depends(get_sessions)]
