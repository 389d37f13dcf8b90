"""The code's layout holds: no import cycles, no import that runs upward, modules of readable size.

The layers, bottom to top (an import may only point at its own layer or one below)::

    dit/            one training process: errors, files, dist, models, diffusion, vae, flops
    dit/latents/    prepared data: sources, manifest, shard writer, stream
    dit/evaluate/   evaluation: features, FID, sampling, the evaluator
    dit/train/      the training loop, its engine, EMA and checkpoints
    analysis/       reading studies back from MLflow, fits, plots, reports (and the MLflow schema)
    orchestrator/spec/  the study spec and its cells
    orchestrator/   Ray and MLflow: studies, trials, tracking, data preparation
    orchestrator/cli/   the ``ditscale`` command

Every import counts, also one inside a function (a lazy import is still a dependency).
``python tests/test_layout.py [ROOT]`` prints the measurement for any checkout (files and line
counts, arrows, cycles, upward arrows, long modules and functions); it is how the layout was
measured before and after the restructuring.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dit", "analysis", "orchestrator")
LAYERS = ("dit", "dit/latents", "dit/evaluate", "dit/train", "analysis", "orchestrator/spec", "orchestrator",
          "orchestrator/cli")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60  # not counting the docstring
# Functions allowed past MAX_FUNCTION_LINES, each with the reason a reader would accept.
LONG_FUNCTIONS: dict[str, str] = {}
FORBIDDEN_IN_DIT = ("ray", "mlflow")  # dit/ is one process: no scheduler, no tracking


@dataclass
class Graph:
    root: Path
    files: dict[str, int] = field(default_factory=dict)  # module name -> lines
    paths: dict[str, Path] = field(default_factory=dict)
    arrows: dict[str, set[str]] = field(default_factory=dict)  # module -> project modules it imports
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level third-party names

    def folder(self, module: str) -> str:
        rel = self.paths[module].relative_to(self.root).parent.as_posix()
        return rel

    def layer(self, module: str) -> int:
        folder = self.folder(module)
        while folder not in LAYERS and "/" in folder:
            folder = folder.rsplit("/", 1)[0]
        return LAYERS.index(folder) if folder in LAYERS else -1


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def build(root: Path = ROOT) -> Graph:
    g = Graph(root)
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            name = _module_name(root, path)
            g.paths[name] = path
            g.files[name] = len(path.read_text().splitlines())
    for name, path in g.paths.items():
        tree = ast.parse(path.read_text())
        found = _imports(tree, name, path.name == "__init__.py")
        g.arrows[name] = {m for m in found if m in g.paths and m != name}
        g.external[name] = {m.split(".")[0] for m in found if m.split(".")[0] not in PACKAGES}
    return g


def cycles(g: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.arrows[v]:
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g.arrows):
        if v not in index:
            visit(v)
    return out


def package_reexports(g: Graph, src: str, dst: str) -> bool:
    """A package's ``__init__`` importing its own submodules is its public face, not a layer arrow."""
    return g.paths[src].name == "__init__.py" and dst.startswith(src + ".")


def upward(g: Graph) -> list[tuple[str, str]]:
    return sorted((a, b) for a, bs in g.arrows.items() for b in bs
                  if g.layer(b) > g.layer(a) and not package_reexports(g, a, b))


def folder_cycles(g: Graph) -> list[tuple[str, str]]:
    pairs = {(g.folder(a), g.folder(b)) for a, bs in g.arrows.items() for b in bs
             if g.folder(a) != g.folder(b) and not package_reexports(g, a, b)}
    return sorted((a, b) for a, b in pairs if (b, a) in pairs and a < b)


def long_functions(g: Graph) -> list[tuple[str, int]]:
    out = []
    for name, path in g.paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) else None
                if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                    n -= doc.end_lineno - doc.lineno + 1  # a docstring is reading help, not length
                if n > MAX_FUNCTION_LINES:
                    out.append((f"{name}.{node.name}", n))
    return sorted(out, key=lambda x: -x[1])


# ------------------------------------------------------------------------------------------- tests


def test_no_import_cycles():
    assert cycles(build()) == []


def test_no_folder_cycles():
    assert folder_cycles(build()) == []


def test_every_import_points_down():
    g = build()
    unplaced = [m for m in g.paths if g.layer(m) < 0]
    assert unplaced == [], f"modules outside every layer: {unplaced}"
    assert upward(g) == []


def test_dit_imports_neither_ray_nor_mlflow():
    g = build()
    bad = {m: sorted(g.external[m] & set(FORBIDDEN_IN_DIT)) for m in g.paths if m.split(".")[0] == "dit"}
    assert {m: v for m, v in bad.items() if v} == {}


def test_modules_are_readable_size():
    g = build()
    assert {m: n for m, n in g.files.items() if n > MAX_MODULE_LINES} == {}


def test_functions_are_short_or_excused():
    assert [f for f in long_functions(build()) if f[0] not in LONG_FUNCTIONS] == []


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: a planted cycle and a planted upward import are found."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "dit" / "a.py").write_text("from dit.b import x\n")
    (tmp_path / "dit" / "b.py").write_text("def f():\n    from dit import a\n")
    (tmp_path / "analysis" / "c.py").write_text("import orchestrator.d\n")
    (tmp_path / "orchestrator" / "d.py").write_text("import analysis.c\n")
    g = build(tmp_path)
    assert ["dit.a", "dit.b"] in cycles(g)
    assert ("analysis.c", "orchestrator.d") in upward(g)
    assert folder_cycles(g) == [("analysis", "orchestrator")]


# ------------------------------------------------------------------------------------------ report


def report(root: Path) -> str:
    g = build(root)
    lines = [f"{len(g.files)} modules, {sum(g.files.values())} lines, "
             f"{sum(len(v) for v in g.arrows.values())} import arrows"]
    by_folder: dict[str, list[str]] = {}
    for m in sorted(g.files):
        by_folder.setdefault(g.folder(m), []).append(f"{g.paths[m].name} {g.files[m]}")
    for folder, items in sorted(by_folder.items()):
        lines.append(f"  {folder}/: " + ", ".join(items))
    lines.append(f"cycles (files): {cycles(g) or 'none'}")
    lines.append(f"cycles (folders): {folder_cycles(g) or 'none'}")
    lines.append(f"upward arrows: {upward(g) or 'none'}")
    lines.append(f"modules over {MAX_MODULE_LINES} lines: "
                 f"{sorted(((m, n) for m, n in g.files.items() if n > MAX_MODULE_LINES), key=lambda x: -x[1]) or 'none'}")
    lines.append(f"functions over {MAX_FUNCTION_LINES} lines: {long_functions(g) or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
