"""The package's parts depend one way (docs/operations.md): each imports only itself and the parts below it, nothing
imports the server but the command line, and the test tooling is not part of the package.

Read from the source with `ast`, every import counted: at the top, inside functions (a lazy import is still a
dependency), under `if TYPE_CHECKING`, and the `from netboot… import` lines of code that a worker process runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "netboot"

# Each part and the parts it may import, besides itself and the package's root (`netboot.__version__`).
BELOW = {
    "core": set(),
    "state": {"core"},
    "image": {"core"},
    "tftp": {"core"},
    "dhcp": {"core", "state"},
    "dhcp6": {"core", "state", "dhcp"},
    "status": {"core"},
    "server": {"core", "state", "image", "tftp", "dhcp", "dhcp6", "status"},
    "cli": {"core", "state", "image", "tftp", "dhcp", "dhcp6", "status", "server"},
}
_CODE_IMPORT = re.compile(r"\b(?:from|import)\s+(netboot(?:\.\w+)*)")


def part_of(module: str) -> str | None:
    """`netboot.image.pack` → "image"; `netboot.cli` and `netboot.__main__` → "cli"; `netboot` → None."""
    names = module.split(".")
    if len(names) == 1:
        return None
    return "cli" if names[1] in ("cli", "__main__") else names[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    names = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(names)


def imports(path: Path) -> set[str]:
    """Every netboot module `path` imports (a `from X import name` counts as X and as X.name)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import (the package imports absolutely)"
            assert node.module is not None
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(_CODE_IMPORT.findall(node.value))
    return {m for m in found if m.split(".")[0] in ("netboot", "devtools")}


def graph() -> dict[str, set[str]]:
    """Module → the netboot modules it imports, for every module of the package."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        # Keep the names that are modules (X.name may be a function of X, already counted as X).
        edges[name] = {m for m in imports(path) if m in modules}
    return edges


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a part that is neither itself nor below it."""
    wrong = []
    for module, targets in sorted(edges.items()):
        source = part_of(module)
        for target in sorted(targets):
            to = part_of(target)
            if source is None:
                if target != module:
                    wrong.append(f"{module} (the package's root) imports {target}")
            elif to is not None and to != source and to not in BELOW[source]:
                wrong.append(f"{module} ({source}) imports {target} ({to})")
    return wrong


def test_every_part_is_listed() -> None:
    parts = {part_of(module_name(p)) for p in PACKAGE.rglob("*.py")} - {None}
    assert parts == set(BELOW), "a new part of the package: give it its place in BELOW and in docs/operations.md"


def test_parts_import_only_themselves_and_parts_below() -> None:
    assert upward(graph()) == []


def test_nothing_but_the_command_line_imports_the_server() -> None:
    importers = {part_of(m) for m, targets in graph().items() for t in targets
                 if part_of(t) == "server" and part_of(m) != "server"}
    assert importers <= {"cli"}


def test_the_parts_have_no_cycle() -> None:
    parts: dict[str, set[str]] = {p: set() for p in BELOW}
    for module, targets in graph().items():
        source = part_of(module)
        for target in targets:
            to = part_of(target)
            if source is not None and to is not None and to != source:
                parts[source].add(to)
    seen: dict[str, str] = {}  # part → "open" while on the current path, "done" after

    def visit(part: str, path: list[str]) -> None:
        seen[part] = "open"
        for nxt in sorted(parts[part]):
            assert seen.get(nxt) != "open", f"import cycle: {' -> '.join([*path, nxt])}"
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[part] = "done"

    for part in sorted(parts):
        if part not in seen:
            visit(part, [part])


@pytest.mark.parametrize(("module", "target", "rule"), [
    ("netboot.dhcp.leases", "netboot.server.machines", "dhcp (dhcp) imports netboot.server.machines (server)"),
    ("netboot.image.rootfs", "netboot.server.overlay", "image (image) imports netboot.server.overlay (server)"),
    ("netboot.core.machines", "netboot.image.pack", "core (core) imports netboot.image.pack (image)"),
    ("netboot.tftp.server", "netboot.dhcp.server", "tftp (tftp) imports netboot.dhcp.server (dhcp)"),
])
def test_an_upward_import_is_caught(module: str, target: str, rule: str) -> None:
    """The check itself: the imports the layout removed (and one between protocols) are reported."""
    edges = graph()
    edges[module] = {*edges[module], target}
    assert any(line.startswith(module) and line.endswith(rule.split(" imports ")[1]) for line in upward(edges))


def test_imports_are_read_from_functions_and_worker_code(tmp_path: Path) -> None:
    source = tmp_path / "netboot" / "tftp" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from netboot.server import namespace\n"
                      "CODE = 'import sys; from netboot.image.pack import main'\n")
    found = imports(source)
    assert {"netboot.server", "netboot.server.namespace", "netboot.image.pack"} <= found


def test_test_tooling_is_outside_the_package() -> None:
    for name in ("lan", "lanboot", "postgres", "qemu"):
        assert not (PACKAGE / f"{name}.py").exists()
        assert (ROOT / "devtools" / f"{name}.py").is_file()
    for path in PACKAGE.rglob("*.py"):
        assert not [m for m in imports(path) if m.startswith("devtools")], f"{path} imports test tooling"
