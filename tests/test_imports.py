"""The import rules docs/architecture.md writes down, read from the source (every `import`, the lazy
ones inside functions included): no cycles, command modules only under commands, click only in them, and a
model layer that knows nothing of calibration, exporters or anything built on top of it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the package layout pyproject.toml declares: calibration/ and exporters/ are r1v_quant subpackages
PACKAGES = {
    "r1v_quant": "r1v_quant",
    "calibration": "r1v_quant.calibration",
    "exporters": "r1v_quant.exporters",
}
COMMANDS = {
    "r1v_quant.cli",
    "r1v_quant.cli_params",
    "r1v_quant.eval_cli",
    "r1v_quant.profile_cli",
    "r1v_quant.chat",
    "r1v_quant.demo",
    "r1v_quant.calibration.cli",
    "r1v_quant.exporters.awq_cli",
    "r1v_quant.exporters.cli_gguf",
    "r1v_quant.exporters.onnx_cli",
}
# writes the command line that made an artifact into its card, from the running click command
CLICK_OUTSIDE_COMMANDS = {"r1v_quant.model_card"}
MODEL_LAYER = {
    f"r1v_quant.{m}"
    for m in (
        "spec",
        "checkpoint",
        "tokenizer",
        "preprocess",
        "prompts",
        "vision",
        "llm",
        "model",
        "quant",
        "awq_format",
        "norms",
    )
}
# what the model layer may import from the package: itself and these leaf utilities
MODEL_LAYER_MAY_USE = {f"r1v_quant.{m}" for m in ("errors", "atomic", "hub", "finite", "signals", "outputs")}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for f in sorted((ROOT / folder).glob("*.py")):
            out[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of ours `name` imports (`from pkg import mod` counts as importing pkg.mod)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _uses_click(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "click" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "click":
            return True
    return False


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_the_package() -> None:
    """The rules below mean something only if the graph is the real one."""
    assert len(MODULES) > 60 and "r1v_quant.exporters.gguf_llm" in MODULES
    assert "r1v_quant.calibration.pipeline" in GRAPH["r1v_quant.calibration"]  # the façade
    assert "r1v_quant.awq_format" in GRAPH["r1v_quant.model"]  # a lazy import inside a method
    assert "r1v_quant.calibration.job_plan" in GRAPH["r1v_quant.calibration.pipeline"]  # relative
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


def test_commands_are_imported_only_by_commands() -> None:
    assert set(MODULES) >= COMMANDS
    wrong = {m: sorted(GRAPH[m] & COMMANDS) for m in MODULES if m not in COMMANDS and GRAPH[m] & COMMANDS}
    assert wrong == {}


def test_click_only_in_commands() -> None:
    users = {m for m, p in MODULES.items() if _uses_click(p)}
    assert users - COMMANDS == CLICK_OUTSIDE_COMMANDS


@pytest.mark.parametrize("module", sorted(MODEL_LAYER))
def test_model_layer_imports_only_itself_and_leaf_utilities(module: str) -> None:
    assert module in MODULES
    assert GRAPH[module] - MODEL_LAYER - MODEL_LAYER_MAY_USE == set()
