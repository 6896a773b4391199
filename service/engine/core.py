"""The engine facade: device choice, repository (with its watcher) and predictor, started and
stopped together. No HTTP in here; ``service.api.app`` drives it from the FastAPI lifespan."""

from __future__ import annotations

import logging

from service.config import Settings
from service.engine.predictor import Predictor
from service.engine.repository import ModelRepository, ScanReport
from service.engine.runtime import DeviceChoice, choose_device

log = logging.getLogger("service.engine")


class Engine:
    """Everything the service needs to answer requests.

    Construction is cheap and side-effect free; :meth:`start` picks the device (raising
    :class:`~service.engine.errors.DeviceUnavailableError` for an unusable ``cuda``), loads the
    repository and starts the watcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device: DeviceChoice | None = None
        self._repository: ModelRepository | None = None
        self._predictor: Predictor | None = None

    @property
    def repository(self) -> ModelRepository:
        if self._repository is None:
            raise RuntimeError("the engine is not started")
        return self._repository

    @property
    def predictor(self) -> Predictor:
        if self._predictor is None:
            raise RuntimeError("the engine is not started")
        return self._predictor

    @property
    def started(self) -> bool:
        return self._repository is not None

    def start(self) -> ScanReport:
        self.device = choose_device(self.settings.device)
        providers = ", ".join(self.device.providers)
        log.info("device %s: onnxruntime providers %s", self.settings.device, providers)
        if self.device.note:
            log.warning(self.device.note)
        self._repository = ModelRepository(self.settings, self.device)
        self._predictor = Predictor(self._repository, self.settings)
        report = self._repository.scan()
        if not self._repository.ready:
            log.warning("no model loaded from %s: /readyz answers 503 until one is", self.settings.model_repository)
        self._repository.start_watching()
        return report

    def stop(self) -> None:
        if self._repository is not None:
            self._repository.close()
