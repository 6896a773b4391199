"""The nextword inference service: every model in the repository served through onnxruntime.

Layout (HTTP-free core first):

* :mod:`service.config` — one ``Settings`` class read from ``NEXTWORD_*`` environment variables.
* :mod:`service.engine` — no HTTP: onnxruntime sessions (``runtime``), the dynamic batcher
  (``batcher``), the watched model repository (``repository``) and the next-word / prefix /
  scoring logic on top of them (``predictor``).
* :mod:`service.protocol` — every request and response body (pydantic).
* :mod:`service.routers`, :mod:`service.deps`, :mod:`service.errors` — the FastAPI layer.
* :mod:`service.metrics`, :mod:`service.logging` — Prometheus metrics and text/JSON logs.
* :mod:`service.main` — ``create_app()`` and the module-level ``app`` for uvicorn;
  :mod:`service.cli` — the ``nextword-serve`` console script.

Nothing in this package imports torch: the serving install does not have it.
"""
