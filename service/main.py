"""The app uvicorn serves: ``uvicorn service.main:app`` (configured from ``NEXTWORD_*`` environment
variables). The application itself is built by :func:`service.api.app.create_app`."""

from service.api.app import create_app

app = create_app()

__all__ = ["app", "create_app"]
