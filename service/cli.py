"""``nextword-serve``: run the service on uvicorn with the host/port from the settings.

Configuration comes from ``NEXTWORD_*`` environment variables; the few flags here override the
most common ones for a quick local run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.config import Settings
from service.engine.errors import DeviceUnavailableError
from service.engine.runtime import choose_device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nextword-serve", description="Serve the model repository over HTTP.")
    parser.add_argument("--host", help="bind address (NEXTWORD_HOST)")
    parser.add_argument("--port", type=int, help="port (NEXTWORD_PORT)")
    parser.add_argument("--model-repository", type=Path, help="model repository (NEXTWORD_MODEL_REPOSITORY)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="NEXTWORD_DEVICE")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    try:
        choose_device(settings.device)  # fail fast, before binding the port
    except DeviceUnavailableError as exc:
        print(f"nextword-serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    import uvicorn

    from service.api.app import create_app
    from service.api.connections import header_timeout_protocol
    from service.api.shutdown import GracefulServer
    from service.logging import configure_logging

    configure_logging(settings.log_level, settings.log_format, uvicorn=settings.log_format == "json")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=settings.request_deadline_seconds,
        # permessage-deflate keeps ~300 KB of zlib state per open socket, and glibc kept most of it
        # after the socket closed (500 idle sockets opened and closed: +37 MB RSS, every time).
        # Session messages are a few hundred bytes: not worth compressing.
        ws_per_message_deflate=False,
        http=header_timeout_protocol(settings.header_timeout_seconds) or "auto",
        limit_concurrency=settings.max_connections,
    )
    GracefulServer(
        config, app.state.drain, settings.shutdown_delay_seconds, settings.request_deadline_seconds
    ).run()


if __name__ == "__main__":
    main()
