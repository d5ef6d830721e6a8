"""The layering docs/architecture.md draws, checked from the import statements (lazy ones included): no module
imports one of a higher floor, and no two modules import each other, directly or around a circle."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "sftlab"

# docs/architecture.md, bottom to top; a module may import its own floor and the ones below
FLOORS = {"compat": 0, "config": 0, "errors": 0, "files": 0, "data": 1, "model": 1, "infer": 2, "evaluate": 3, "export": 3, "report": 3,
          "plan": 3, "train": 4, "serve": 4, "webui": 5, "cli": 6}


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        name = ".".join(f.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = f
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sftlab"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sftlab")}
    return found & known


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(f, set(modules)) - {m} for m, f in modules.items()}


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_every_folder_is_on_a_floor():
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert folders | modules <= FLOORS.keys() | {"__main__"}, "add the new folder to docs/architecture.md and FLOORS"


def test_no_module_imports_a_higher_floor():
    climbs = [f"{m} imports {d}" for m, deps in _graph().items() for d in deps
              if _floor(m) is not None and _floor(d) is not None and _floor(d) > _floor(m)]
    assert climbs == []


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_loop_names_no_backend():
    """fit and accumulate_gradients work through the Backend's methods only (train/backend.py)."""
    source = (SRC / "train" / "loop.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in ("fit", "accumulate_gradients")):
        text = ast.get_source_segment(source, fn).lower()
        assert not any(word in text for word in ("fsdp", "deepspeed", "engine", "zero3", "zero_stage")), fn.name
