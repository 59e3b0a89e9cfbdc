"""The layers of DESIGN.md, checked on the imports (read with `ast`, nothing is run):

- only the HTTP edge (`bridge/web/`), the entry point that serves it (`bridge/app.py`)
  and the development tools import aiohttp's server side;
- nothing under `bridge/web/` depends on the composition root (`bridge.services`): it
  reads narrow protocols or `AppKey`s;
- the composition root is imported only by the entry points, so no feature package
  forms an import loop with it.

Every import counts, also those under `if TYPE_CHECKING:` and inside functions: a loop
through a type-only import is still a loop in the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "bridge"
SERVER_MODULES = ("aiohttp.web", "aiohttp.typedefs", "aiohttp.test_utils")
# The entry points and tools that may wire or serve the edge.
MAY_SERVE = ("bridge.web", "bridge.app", "bridge.devtools")
ENTRY_POINTS = ("bridge.app", "bridge.cli", "bridge.devtools")
ROOT_MODULE = "bridge.services"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> Iterator[str]:
    return imports_in(path.read_text(encoding="utf-8"), module_name(path),
                      path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> Iterator[str]:
    """Every module `source` imports (`from a import b` yields `a` and `a.b`)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[:len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def modules() -> dict[str, set[str]]:
    return {module_name(p): set(imports_of(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_only_the_edge_imports_the_http_server() -> None:
    offenders = sorted(
        f"{module} imports {name}" for module, names in modules().items()
        for name in names if within(name, SERVER_MODULES) and not within(module, MAY_SERVE))
    assert offenders == []


def test_the_edge_does_not_import_the_composition_root() -> None:
    offenders = sorted(module for module, names in modules().items()
                       if within(module, ("bridge.web",)) and ROOT_MODULE in names)
    assert offenders == []


def test_only_entry_points_import_the_composition_root() -> None:
    offenders = sorted(module for module, names in modules().items()
                       if ROOT_MODULE in names and module != ROOT_MODULE
                       and not within(module, ENTRY_POINTS))
    assert offenders == []


def package_of(module: str) -> str:
    """`bridge.matrix.relay` -> `bridge.matrix`; a top-level module stands for itself."""
    return ".".join(module.split(".")[:2])


def test_no_package_forms_a_loop_with_the_composition_root() -> None:
    """Feature packages (matrix, whatsapp, admin ...) are below the root: none reaches it
    back, through any of its modules."""
    found = modules()
    graph: dict[str, set[str]] = {}
    for module, names in found.items():
        graph.setdefault(package_of(module), set()).update(
            package_of(n) for n in names if n in found and package_of(n) != package_of(module))
    loops = sorted(package for package in graph[ROOT_MODULE]
                   if ROOT_MODULE in reachable(graph, package))
    assert loops == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


@pytest.mark.parametrize("source", [
    "from aiohttp import web\n", "import aiohttp.web\n", "from aiohttp.web import Request\n",
    "if TYPE_CHECKING:\n    from aiohttp.typedefs import Handler\n",
    "def f() -> None:\n    from aiohttp import web\n"])
def test_the_walk_sees_a_server_import(source: str) -> None:
    """The check itself can fail: each spelling of the import is seen."""
    assert any(within(n, SERVER_MODULES) for n in imports_in(source, "bridge.whatsapp.x"))


def test_the_walk_resolves_relative_imports() -> None:
    assert "bridge.services" in set(imports_in("from ..services import Bridge\n",
                                               "bridge.web.state"))
    assert "bridge.services" in set(imports_in("from . import services\n", "bridge", True))


def test_the_admin_api_is_one_sub_app_behind_its_token_check() -> None:
    from aiohttp import web

    from bridge.app import make_admin_app, make_app
    from bridge.config import parse_config
    from bridge.web.admin_auth import admin_auth
    from tests.unit.test_config import valid

    app = make_admin_app(make_app(parse_config(valid())))
    [mount] = [r for r in app.router.resources() if isinstance(r, web.PrefixedSubAppResource)]
    assert mount.canonical == "/admin/v1"
    assert admin_auth in mount._app.middlewares
    outside = [r.canonical for r in app.router.resources()
               if r is not mount and r.canonical.startswith("/admin")]
    assert outside == []
    assert admin_auth not in app.middlewares  # the probes answer without a token
