"""The layers of the code, and imports that go one way only (imports inside functions count too:
a circle or a reach upwards put off to call time is still one).

    deployctl ─┐                       controller (daemon, operator_service)
               │                         └▶ controller.environments
               │                              └▶ controller.fleet
               │   agent                           └▶ controller.state
               ▼     ▼                                  ▼
             common ◀──────────────────────────────────┘
               ▼
             protos

Each layer may import the layers below it and nothing else of the project: the agent never the
controller or deployctl; deployctl only protos and common; the fleet never the environments; the
state neither. And no two modules import each other, directly or round a longer circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protos", "common", "agent", "controller", "deployctl")
BELOW = {  # a layer → what it may import besides itself
    "protos": set(),
    "common": {"protos"},
    "agent": {"protos", "common"},
    "deployctl": {"protos", "common"},
    "controller.state": {"protos", "common"},
    "controller.fleet": {"protos", "common", "controller.state"},
    "controller.environments": {"protos", "common", "controller.state", "controller.fleet"},
    "controller": {"protos", "common", "controller.state", "controller.fleet", "controller.environments"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules and name != here}
    return found


def graph(with_packages: bool = False) -> dict[str, set[str]]:
    """Module → the project's modules it imports (a package's own `__init__` left out of circles:
    importing `controller.state.db` runs `controller/__init__.py` whatever one writes)."""
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p) for p in files}
    packages = {module_name(p) for p in files if p.name == "__init__.py"}
    return {module_name(p): imports_of(p, modules) - (set() if with_packages else packages) for p in files}


def layer(module: str) -> str:
    return max((name for name in BELOW if module == name or module.startswith(name + ".")), key=len)


def reaches(edges: dict[str, set[str]]) -> list[str]:
    """Every import that goes sideways or upwards, as `module → imported (layer → layer)`."""
    found = []
    for module, imported in sorted(edges.items()):
        mine = layer(module)
        for target in sorted(imported):
            theirs = layer(target)
            if theirs != mine and theirs not in BELOW[mine]:
                found.append(f"{module} → {target} ({mine} may not import {theirs})")
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_that_imports_it_back():
    assert cycles(graph()) == []


def test_the_rules_see_an_import_upwards_or_sideways():
    assert reaches({"controller.fleet.dispatcher": {"controller.environments.commands", "controller.state.db"},
                    "deployctl.cli": {"controller.fleet.access", "common.tls"},
                    "agent.main": {"controller"}, "common.tls": {"protos.deployer_pb2"}}) == [
        "agent.main → controller (agent may not import controller)",
        "controller.fleet.dispatcher → controller.environments.commands "
        "(controller.fleet may not import controller.environments)",
        "deployctl.cli → controller.fleet.access (deployctl may not import controller.fleet)"]


def test_every_import_goes_down_the_layers():
    edges = graph(with_packages=True)
    assert {layer(m) for m in edges} == set(BELOW), "a package of the project has no layer"
    assert reaches(edges) == []


# ---------------------------------------------------------------- SQL stays in the state

SQL_CALLS = {"execute", "executemany", "executescript"}


def sql_outside_state(sources: dict[str, str]) -> list[str]:
    """Every call of a database cursor's method, or reach into a database connection (`.conn`),
    in a module outside controller.state: `module:line`."""
    found = []
    for module, text in sorted(sources.items()):
        if layer(module) == "controller.state":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and node.attr == "conn":
                found.append(f"{module}:{node.lineno} (.conn)")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_CALLS
                  and "dispatcher" not in ast.unparse(node.func.value)):
                found.append(f"{module}:{node.lineno} (.{node.func.attr})")
    return sorted(found)


def test_the_rule_sees_sql_outside_the_state():
    assert sql_outside_state({
        "controller.environments.orders": "db.conn.execute('SELECT 1')\n",
        "controller.fleet.pki": "self.rows.token(x)\nawait self.dispatcher.execute(a, op)\n",
        "controller.state.ledger": "self.conn.execute('SELECT 1')\n",
        "deployctl.cli": "cursor.executemany('INSERT', rows)\n"}) == [
        "controller.environments.orders:1 (.conn)", "controller.environments.orders:1 (.execute)",
        "deployctl.cli:1 (.executemany)"]


def test_only_the_state_speaks_sql():
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "_pb2" not in p.name]
    assert sql_outside_state({module_name(p): p.read_text() for p in files}) == []
