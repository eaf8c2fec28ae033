"""The module map holds: no import circles, a core that knows no transport, a light client."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "asgi_events"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, type-only imports included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base)
            if node.module:  # (``from . import x`` imports module x, not the package's names)
                found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("asgi_events"):
            found.add(str(node.module))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("asgi_events"))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) & set(MODULES) - {name} for name, path in MODULES.items()}


def test_there_is_no_import_circle() -> None:
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for target in sorted(GRAPH[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])


def reaches(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize(
    "core",
    [
        "asgi_events.streams",
        "asgi_events.outbox",
        "asgi_events.senders",
        "asgi_events.hub",
        "asgi_events.backends.base",
        "asgi_events.backends.memory",
    ],
)
def test_the_core_knows_no_transport_and_no_asgi_message(core: str) -> None:
    assert not any(m.startswith("asgi_events.transports") for m in reaches(core))
    source = MODULES[core].read_text()
    for shape in ('"websocket.', '"http.response', '"lifespan.'):
        assert shape not in source, f"{core} builds an ASGI message ({shape}...)"


def test_the_client_pulls_in_no_server_module() -> None:
    assert reaches("asgi_events.client") <= {
        "asgi_events.client_policy",  # the client's own (its errors, close policy, backoff)
        "asgi_events.client_history",  # the client's own (EventsClient.history over HTTP)
        "asgi_events.protocol",
        "asgi_events.codec",
        "asgi_events.errors",
    }


def test_no_module_imports_a_web_framework() -> None:
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names.append(getattr(node, "module", None) or "")
                assert not any(n.split(".")[0] in {"starlette", "fastapi"} for n in names), name
