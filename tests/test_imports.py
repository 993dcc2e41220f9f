"""The import rules docs/architecture.md writes down, read from the source (every `import`, the lazy
ones inside functions included): the stage packages form a stack and a module imports only from its own
package or from packages below it; no cycles; click only in the command package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the package layout pyproject.toml declares: calibration/ and exporters/ are r1v_quant subpackages
FOLDERS = {"calibration": "r1v_quant.calibration", "exporters": "r1v_quant.exporters"}
# bottom to top: each package may import the ones before it, never the ones after it
LAYERS = [
    "util",  # errors, atomic outputs, signals, NaN checks, devices, the Hub
    "model",  # checkpoint, spec, reference forward, tokenizer, templates, preprocessing, storage formats
    "data",  # generated problems and scoring windows
    "quant",  # the AWQ search math
    "plan",  # memory model, roofline, plan
    "calibration",  # calibration sets, capture, statistics, sensitivity, the job preflight
    "runtime",  # torch / llama.cpp / libmtmd / ONNX Runtime engines and their request protocol
    "exporters",  # AWQ checkpoint, GGUF + mmproj, ONNX writers
    "evaluate",  # ppl / KLD, benchmarks, statistics, the release gate
    "profiling",  # measured runs
    "replica",  # the built-in tiny model and its training
    "cli",  # the click commands
]
# writes the command line that made an artifact into its card, from the running click command
CLICK_OUTSIDE_COMMANDS = {"r1v_quant.exporters.model_card"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.joinpath("r1v_quant").rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    for folder in ("calibration", "exporters"):
        for f in sorted((ROOT / folder).glob("*.py")):
            package = FOLDERS[folder]
            out[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return out


MODULES = _modules()


def layer(module: str) -> str:
    """The stage package a module belongs to ("" for the root package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


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
    assert len(MODULES) > 70 and "r1v_quant.exporters.gguf_llm" in MODULES
    assert "r1v_quant.calibration.pipeline" in GRAPH["r1v_quant.calibration"]  # the façade
    assert "r1v_quant.model.awq_layout" in GRAPH["r1v_quant.model.reference"]  # a lazy import inside a method
    assert "r1v_quant.calibration.job_plan" in GRAPH["r1v_quant.calibration.pipeline"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_lives_in_a_declared_stage() -> None:
    assert {layer(m) for m in MODULES} == {"", *LAYERS}
    assert [m for m in MODULES if layer(m) == ""] == ["r1v_quant"]  # no flat modules beside the packages


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("package", LAYERS)
def test_imports_flow_down_the_stack(package: str) -> None:
    allowed = {"", *LAYERS[: LAYERS.index(package) + 1]}
    wrong = {
        m: sorted(t for t in GRAPH[m] if layer(t) not in allowed)
        for m in MODULES
        if layer(m) == package and any(layer(t) not in allowed for t in GRAPH[m])
    }
    assert wrong == {}


def test_nothing_imports_the_command_line() -> None:
    wrong = {m: sorted(t for t in GRAPH[m] if layer(t) == "cli") for m in MODULES if layer(m) != "cli"}
    assert {m: v for m, v in wrong.items() if v} == {}


def test_click_only_in_commands() -> None:
    users = {m for m, p in MODULES.items() if _uses_click(p)}
    assert {m for m in users if layer(m) != "cli"} == CLICK_OUTSIDE_COMMANDS


def _top_level_names(path: Path) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports; inside top-level if / try
    blocks too, e.g. TYPE_CHECKING imports)."""
    names: set[str] = set()

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                walk(node.body)
                for extra in (getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    walk(extra)
                for h in getattr(node, "handlers", []):
                    walk(h.body)

    walk(ast.parse(path.read_text(encoding="utf-8")).body)
    return names


def _missing_names(path: Path, package: str) -> list[str]:
    """`from <one of ours> import X` where X is neither a submodule nor a name that module defines."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        if base not in MODULES:
            continue
        defined = _top_level_names(MODULES[base])
        out += [
            f"{path.name}:{node.lineno} {base}.{a.name}"
            for a in node.names
            if a.name != "*" and a.name not in defined and f"{base}.{a.name}" not in MODULES
        ]
    return out


def test_every_imported_name_exists(tmp_path: Path) -> None:
    """A name moved or removed from one of our modules breaks its importers only when they run; read every
    `from ... import` of ours (lazy ones, tests and benches included) against what the module defines."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from r1v_quant.model.prompts import IMG_END, place_images\n"
        "def f():\n    from r1v_quant.model.preprocess import IMG_END, open_image\n"
        "from r1v_quant.runtime import engines, no_such_module\n"
    )
    assert sorted(_missing_names(probe, "tests")) == [
        "probe.py:3 r1v_quant.model.preprocess.IMG_END",
        "probe.py:4 r1v_quant.runtime.no_such_module",
    ]
    missing = []
    for name, path in MODULES.items():
        missing += _missing_names(path, name if path.stem == "__init__" else name.rsplit(".", 1)[0])
    for folder in ("tests", "bench"):
        for path in sorted((ROOT / folder).glob("*.py")):
            missing += _missing_names(path, folder)
    assert missing == []
