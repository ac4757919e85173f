"""The code's shape (STYLE.md): no import cycles, the gateway core free of HTTP, files of a readable size.

The import graph comes from ``grimp`` (the graph library under import-linter): every
``import`` statement of ``epd`` and ``services`` modules, function-level ones included.
Imports under ``if TYPE_CHECKING:`` are left out: they never run, and an annotation naming
the object that owns you (``stages.EncoderSim(sim: Simulator)``) is a back-reference, not a
dependency that can break import order.
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("epd", "services")

#: The gateway's core (services/gateway/core.py's docstring): nothing here may import aiohttp,
#: directly or through another module. The HTTP layer (http, handlers, responder, media,
#: __main__) sits on top of it.
GATEWAY_CORE = ("core", "attempts", "generation", "stream", "router", "engine_client", "metrics", "prompt",
                "protocol")

MAX_LINES = 400
SIZED_DIRS = ("epd", "services", "benchmarks")
#: Files allowed past MAX_LINES (path relative to the repository root -> why). Keep it empty.
LONG_FILES_ALLOWED: dict[str, str] = {}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*PACKAGES, include_external_packages=True, exclude_type_checking_imports=True,
                             cache_dir=None)


def _cycles(graph, packages=PACKAGES) -> list[list[str]]:
    """Strongly connected components of more than one module of ``packages`` (Tarjan, iterative)."""
    internal = sorted(m for m in graph.modules if m.split(".")[0] in packages)
    edges = {m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i.split(".")[0] in packages)
             for m in internal}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in internal:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            succ = edges[node]
            if i < len(succ):
                work.append((node, i + 1))
                nxt = succ[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return out


def _explain(graph, cycle: list[str]) -> str:
    lines = [" <-> ".join(cycle)]
    for a in cycle:
        for b in cycle:
            if b in graph.find_modules_directly_imported_by(a):
                for d in graph.get_import_details(importer=a, imported=b):
                    lines.append(f"    {a}:{d['line_number']}: {d['line_contents']}")
    return "\n".join(lines)


def test_cycle_finder_finds_a_cycle():
    g = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c", "p.d"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")
    g.add_import(importer="p.d", imported="p.a")
    assert _cycles(g, ("p",)) == [["p.a", "p.b", "p.c"]]
    g.remove_import(importer="p.c", imported="p.a")
    assert _cycles(g, ("p",)) == []


def test_no_import_cycles(graph):
    cycles = _cycles(graph)
    assert not cycles, "import cycles (break each by moving the shared piece down a layer):\n" + "\n".join(
        _explain(graph, c) for c in cycles)


@pytest.mark.parametrize("name", GATEWAY_CORE)
def test_gateway_core_does_not_import_aiohttp(graph, name):
    module = f"services.gateway.{name}"
    assert module in graph.modules, f"{module} is gone: update GATEWAY_CORE"
    chain = graph.find_shortest_chain(importer=module, imported="aiohttp")
    assert chain is None, f"the gateway core reaches aiohttp: {' -> '.join(chain)}"
    assert "aiohttp" not in (ROOT / "services" / "gateway" / f"{name}.py").read_text()


def test_http_layer_sits_on_the_core(graph):
    assert graph.direct_import_exists(importer="services.gateway.http", imported="services.gateway.core")
    for name in GATEWAY_CORE:
        for http in ("http", "handlers", "responder", "media"):
            assert not graph.chain_exists(importer=f"services.gateway.{name}", imported=f"services.gateway.{http}")


def test_files_are_at_most_400_lines():
    long = {}
    for d in SIZED_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if "/gen/" in rel:  # generated protobuf code
                continue
            n = len(path.read_text().splitlines())
            if n > MAX_LINES and rel not in LONG_FILES_ALLOWED:
                long[rel] = n
    assert not long, f"files over {MAX_LINES} lines (split by collaborator): {long}"
