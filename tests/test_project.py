"""Project rules that code review would otherwise have to catch: lint, and the layering of
DESIGN.md (api never imports torch; the library knows nothing of the service)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_library_does_not_know_the_service() -> None:
    service = re.compile(r"^\s*(import|from)\s+(fastapi|celery|redis|kombu|api|worker)\b", re.M)
    env = re.compile(r"os\.environ|getenv\(")
    for path in _sources("flow_compress"):
        text = path.read_text()
        assert not service.search(text), f"{path} imports the service layer"
        assert not env.search(text), f"{path} reads environment variables"


def test_torch_pruning_behind_one_adapter() -> None:
    tp = re.compile(r"^\s*(import torch_pruning|from torch_pruning)", re.M)
    users = [
        str(p.relative_to(ROOT)) for p in _sources("flow_compress") if tp.search(p.read_text())
    ]
    assert users == ["flow_compress/graph/adapter.py"]


def test_registries_and_the_modules_the_api_imports_load_without_torch() -> None:
    # The API validates architecture, criterion and format names against the registries, so
    # every plug-in module must be importable without torch.
    code = (
        "import sys\n"
        "import flow_compress.arch, flow_compress.criteria, flow_compress.export\n"
        "import flow_compress.config, flow_compress.schema, flow_compress.errors\n"
        "import flow_compress.refs, flow_compress.artifacts\n"
        "assert flow_compress.arch.list_architectures()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_module_surgery_depends_on_nothing_of_the_package() -> None:
    text = (ROOT / "flow_compress" / "arch" / "surgery.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+flow_compress\b", text, re.M)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_edges(path: Path, name: str) -> set[str]:
    """Modules of the package that ``path`` imports when it is imported (module-level
    statements only, ``TYPE_CHECKING`` blocks excluded); a package's imports of its own
    plug-in modules (which register themselves) are not dependencies of the package."""
    edges: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("flow_compress") and target != name:
                if path.name == "__init__.py" and target.startswith(name + "."):
                    continue
                edges.add(target)
    return edges


def test_no_import_cycle_in_the_library() -> None:
    modules = {_module_name(p): p for p in _sources("flow_compress")}
    graph = {
        name: {t for t in _import_time_edges(path, name) if t in modules}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_unsafe_torch_load() -> None:
    for package in ("flow_compress", "api", "worker"):
        for path in _sources(package):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "torch.load(" in line:
                    assert "weights_only=True" in line, f"{path}:{n} calls torch.load unsafely"
