"""The shape of the code, for issue 19's before/after table: the largest class (methods, lines), the longest
functions, the parameters of the E-step's entry point and the import cycles between modules of the package.

Usage: python bench/code_shape.py SRC_DIR [SRC_DIR ...] --label L [--label L ...] [--o OUT.md]
SRC_DIR is a package's parent folder (e.g. src/ of a checkout, or of `git worktree add /tmp/old 7e78ed8`).
Static reading only (ast): nothing is imported.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
from dataclasses import dataclass

PACKAGE = "cryorefine"
ENTRY_POINT = "run_expectation"
RUN_TIME = ("refine.", "estep.", "mstep.")  # the run-time layer the refactor is about


@dataclass(frozen=True)
class Shape:
    largest_class: tuple[str, int, int]  # (module.Class, methods, lines)
    longest_functions: list[tuple[str, int]]  # (module.function, lines), longest first
    longest_run_time: list[tuple[str, int]]  # the same within refine/, estep/, mstep/
    entry_parameters: tuple[str, int]  # (module.function, parameters)
    cycles: list[list[str]]  # modules in each strongly connected component of the import graph
    modules: int
    lines: int


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.Module, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of the package that ``module`` imports anywhere in its body (top level or inside functions)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != module}


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module are the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def measure(src: pathlib.Path) -> Shape:
    files = sorted((src / PACKAGE).rglob("*.py"))
    trees = {_module_name(f, src): (f, ast.parse(f.read_text())) for f in files}
    known = set(trees)
    classes: list[tuple[str, int, int]] = []
    functions: list[tuple[str, int]] = []
    entry = ("", 0)
    graph: dict[str, set[str]] = {}
    for name, (path, tree) in trees.items():
        graph[name] = _imports(tree, name, path.name == "__init__.py", known)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                classes.append((f"{name}.{node.name}", len(methods), node.end_lineno - node.lineno + 1))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((f"{name}.{node.name}", node.end_lineno - node.lineno + 1))
                if node.name == ENTRY_POINT:
                    a = node.args
                    count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                    entry = (f"{name}.{node.name}", count)
    return Shape(
        largest_class=max(classes, key=lambda c: c[2]),
        longest_functions=sorted(functions, key=lambda f: -f[1])[:3],
        longest_run_time=sorted(
            (f for f in functions if f[0].startswith(tuple(f"{PACKAGE}.{p}" for p in RUN_TIME))), key=lambda f: -f[1]
        )[:3],
        entry_parameters=entry,
        cycles=_strongly_connected(graph),
        modules=len(files),
        lines=sum(len(p.read_text().splitlines()) for p, _ in trees.values()),
    )


def table(shapes: dict[str, Shape]) -> str:
    labels = list(shapes)
    rows = [
        ("modules; lines", lambda s: f"{s.modules}; {s.lines}"),
        ("largest class (methods, lines)", lambda s: "{} ({}, {})".format(*s.largest_class)),
        ("longest functions (lines)", lambda s: "<br>".join(f"{n} ({k})" for n, k in s.longest_functions)),
        (
            "longest in refine/, estep/, mstep/ (lines)",
            lambda s: "<br>".join(f"{n} ({k})" for n, k in s.longest_run_time),
        ),
        (f"parameters of `{ENTRY_POINT}`", lambda s: "{1} ({0})".format(*s.entry_parameters)),
        ("import cycles", lambda s: "; ".join(" ↔ ".join(c) for c in s.cycles) or "none"),
    ]
    out = ["| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    out += [f"| {title} | " + " | ".join(f(shapes[k]) for k in labels) + " |" for title, f in rows]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="+", type=pathlib.Path)
    ap.add_argument("--label", action="append", required=True)
    ap.add_argument("--o", type=pathlib.Path)
    args = ap.parse_args()
    if len(args.label) != len(args.src):
        ap.error("give one --label per SRC_DIR")
    text = table({label: measure(src) for label, src in zip(args.label, args.src)})
    print(text, end="")
    if args.o:
        args.o.write_text(text)


if __name__ == "__main__":
    main()
