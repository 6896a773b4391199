"""The nextword inference service: every model in the repository served through onnxruntime.

Layout (HTTP-free core first):

* :mod:`service.config` — one ``Settings`` class read from ``NEXTWORD_*`` environment variables.
* :mod:`service.engine` — no HTTP: onnxruntime sessions (``runtime``), the dynamic batcher
  (``batcher``), the watched model repository (``repository``) and the next-word / prefix /
  scoring logic on top of them (``predictor``).
* :mod:`service.sessions` — no HTTP: stateful sessions over a memory or Redis store.
* :mod:`service.api` — everything HTTP: the app factory, routes, request/response bodies
  (``protocol``), dependencies, body checks and the error mapping (``docs/service.md`` has a map).
* :mod:`service.metrics`, :mod:`service.logging` — Prometheus metrics and text/JSON logs.
* :mod:`service.main` — the module-level ``app`` for uvicorn;
  :mod:`service.cli` — the ``nextword-serve`` console script.

Nothing in this package imports torch: the serving install does not have it.
"""
