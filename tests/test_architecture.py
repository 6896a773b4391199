"""The service's layering and its public contract, checked statically.

* The OpenAPI document is the public API: it must equal the committed snapshot
  (``tests/data/openapi.json``) except for prose (descriptions, summaries). After an intended API
  change, regenerate the snapshot with ``python -m tests.test_architecture``.
* The engine and the session manager know nothing of HTTP: no module of ``service.engine`` or
  ``service.sessions``, nor any ``service`` module they import, imports FastAPI or Starlette.
* No package imports itself in a circle (``training`` and ``service``, imports inside functions
  included).
* The file map of ``docs/service.md`` ("Where things are") is current: every ``service`` module
  is in it and every file it names exists.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "openapi.json"
PROSE = frozenset({"description", "summary"})
HTTP_PACKAGES = ("fastapi", "starlette")
HTTP_FREE = ("service.engine", "service.sessions")


def current_openapi() -> dict[str, Any]:
    from service.api.app import create_app
    from service.config import Settings

    return create_app(Settings()).openapi()


def without_prose(node: Any) -> Any:
    """The document without its free text. Only a ``description``/``summary`` that is text is
    dropped: a schema property may itself be named ``description``."""
    if isinstance(node, dict):
        return {k: without_prose(v) for k, v in node.items() if not (k in PROSE and isinstance(v, str))}
    if isinstance(node, list):
        return [without_prose(v) for v in node]
    return node


def test_openapi_document_is_unchanged() -> None:
    expected = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    actual = json.loads(json.dumps(current_openapi()))  # tuples → lists, as in the snapshot
    assert without_prose(actual) == without_prose(expected)


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    if base.is_dir() and (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved), at any depth of
    the file (imports inside functions count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # ``from service.engine import errors`` imports the submodule service.engine.errors
            found.update(f"{module}.{alias.name}" for alias in node.names if _module_file(f"{module}.{alias.name}"))
    return found


def _service_closure(roots: list[str]) -> dict[str, set[str]]:
    """The ``service`` modules reachable from ``roots`` with what each imports (parents included:
    importing ``service.engine.errors`` runs ``service/engine/__init__.py``)."""
    seen: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = _imports(name, path)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo.extend(m for m in [*seen[name], *parents] if m == "service" or m.startswith("service."))
    return seen


def test_engine_and_sessions_import_no_http_framework() -> None:
    roots = [m for package in HTTP_FREE for m in _package_modules(package)]
    assert len(roots) > 10
    closure = _service_closure(roots)
    offenders = sorted(
        f"{module} imports {imported}"
        for module, imports in closure.items()
        for imported in imports
        if imported.split(".")[0] in HTTP_PACKAGES or imported == "service.api" or imported.startswith("service.api.")
    )
    assert not offenders, offenders


def _package_modules(package: str) -> list[str]:
    return [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted(ROOT.joinpath(*package.split(".")).rglob("*.py"))
    ]


def _cycles(package: str) -> list[list[str]]:
    """Import cycles among the modules of ``package`` (a package importing its own submodules
    from ``__init__`` is not a cycle: submodules importing their parent package is not followed)."""
    modules = set(_package_modules(package))
    graph = {
        m: sorted(i for i in _imports(m, _module_file(m)) if i in modules and not m.startswith(i + "."))  # type: ignore[arg-type]
        for m in modules
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles() -> None:
    for package in ("training", "service", "nextword"):
        assert not _cycles(package), (package, _cycles(package))


def _service_map() -> list[str]:
    """The rows of the table under "Where things are" in docs/service.md."""
    text = (ROOT / "docs" / "service.md").read_text(encoding="utf-8")
    section = text.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_service_map_lists_every_module_and_only_files_that_exist() -> None:
    rows = _service_map()
    named: set[str] = set()
    for row in rows:
        paths = re.findall(r"`(service/[^`\s]*)`", row)
        # Bare names (`predict.py`) are files of a folder the row names, or beside a file it names.
        folders = {p if p.endswith("/") else p.rpartition("/")[0] + "/" for p in paths}
        for path in paths:
            assert (ROOT / path).exists(), f"docs/service.md names {path}, which does not exist"
            named.add(path)
        for name in re.findall(r"`([\w.-]+\.py)`", row):
            homes = [f + name for f in sorted(folders) if (ROOT / f / name).is_file()]
            assert homes, f"docs/service.md names {name} in no folder of its row: {row}"
            named.update(homes)
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "service").rglob("*.py"))
    missing = [m for m in modules if m not in named and not m.endswith("/__init__.py")]
    assert not missing, f"add these to the file map in docs/service.md: {missing}"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    SNAPSHOT.write_text(json.dumps(current_openapi(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {SNAPSHOT}")
