"""The keyboard page as files (its behaviour in a browser is ``test_keyboard_page.py``): served at
``/`` and ``/static/`` with a same-origin-only content security policy, nothing fetched from another
origin, out of the OpenAPI document, and shipped as package data."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "service" / "api" / "static"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(model_repository=tmp_path_factory.mktemp("no-models"), device="cpu",
                        reload_interval_seconds=0, log_level="warning")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_page_and_its_files_are_served(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert r.headers["cache-control"] == "no-cache"
    for src in re.findall(r'(?:src|href)="([^"]+)"', r.text):
        if src.startswith("/static/"):
            asset = client.get(src)
            assert asset.status_code == 200, src
            assert asset.headers["cache-control"] == "no-cache"  # revalidated: never an old script
    script_type = client.get("/static/app.js").headers["content-type"]
    assert script_type.startswith(("text/javascript", "application/javascript"))
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    missing = client.get("/static/absent.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


def test_page_is_not_part_of_the_api_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


@pytest.mark.parametrize("name", sorted(p.name for p in STATIC.iterdir()))
def test_page_loads_nothing_from_another_origin(name: str) -> None:
    text = (STATIC / name).read_text(encoding="utf-8")
    # No absolute URLs (CDNs, web fonts), no protocol-relative ones, no CSS imports.
    assert not re.search(r"https?://|[\"'(]//[a-z]|@import|@font-face", text, re.I), name


def test_page_files_ship_in_the_package() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = patterns.get("service.api", []) + patterns.get("*", [])
    for path in STATIC.rglob("*"):
        if path.is_file():
            relative = path.relative_to(STATIC.parent).as_posix()  # package data of service.api
            assert any(fnmatch.fnmatch(relative, g) for g in globs), f"{relative} is not package data"


def test_every_control_is_labelled() -> None:
    """Screen readers name every control: inputs by a <label for>, buttons by text or aria-label."""
    from html.parser import HTMLParser

    class Controls(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.labelled: set[str] = set()
            self.controls: list[dict[str, str | None]] = []
            self.open_button: dict[str, str | None] | None = None
            self.button_text: dict[int, str] = {}

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "label" and a.get("for"):
                self.labelled.add(str(a["for"]))
            elif tag in ("input", "select", "textarea"):
                self.controls.append(a)
            elif tag == "button":
                self.open_button = a
                self.button_text[id(a)] = ""

        def handle_data(self, data: str) -> None:
            if self.open_button is not None:
                self.button_text[id(self.open_button)] += data.strip()

        def handle_endtag(self, tag: str) -> None:
            if tag == "button" and self.open_button is not None:
                b = self.open_button
                named = self.button_text[id(b)] or b.get("aria-label") or "chip" in (b.get("class") or "")
                assert named, f"a button without a name: {b}"  # chips are named by the script
                self.open_button = None

    page = Controls()
    page.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    assert len(page.controls) >= 3
    unlabelled = [c.get("id") for c in page.controls if c.get("id") not in page.labelled and not c.get("aria-label")]
    assert not unlabelled, unlabelled
    # The chips get their accessible name from the script, whenever suggestions change.
    assert "setAttribute(\"aria-label\"" in (STATIC / "app.js").read_text(encoding="utf-8")
