"""The shape of lib/: imports flow one way (no module reaches itself again through others), at module level."""
from __future__ import annotations

import ast
from pathlib import Path

from lib.paths import REPO_ROOT, STAGES

LIB = REPO_ROOT / "lib"


def module_name(path: Path) -> str:
    """lib/domains/beir.py → lib.domains.beir; lib/domains/__init__.py → lib.domains."""
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lib_imports(tree: ast.AST, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported lib module, line, at module level) for every import of a lib module in `tree`; `from lib import x`
    counts as importing lib.x when that is a module."""
    top = set(map(id, getattr(tree, "body", [])))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lib" and node.level == 0:
            targets = [f"lib.{a.name}" for a in node.names if f"lib.{a.name}" in known] if node.module == "lib" else [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "lib"]
        else:
            continue
        found += [(target, node.lineno, id(node) in top) for target in targets]
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """{lib module: the lib modules it imports, anywhere in it}, and every import made inside a function or class."""
    paths = {module_name(p): p for p in sorted(LIB.rglob("*.py"))}
    graph, inner = {}, []
    for name, path in paths.items():
        imports = lib_imports(ast.parse(path.read_text(encoding="utf-8")), set(paths))
        graph[name] = {target for target, _, _ in imports if target in paths and target != name}
        packages = {".".join(t.split(".")[:n]) for t in graph[name] for n in range(2, t.count(".") + 1)}
        graph[name] |= {p for p in packages if p in paths and p != name and not name.startswith(p + ".")}
        inner += [f"{path.relative_to(REPO_ROOT)}:{line} imports {target}" for target, line, at_top in imports if not at_top]
    return graph, inner


def a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as the modules round it (empty when there is none): a depth-first search's back edge."""
    state, stack = {}, []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_lib_module_reaches_itself_through_its_imports():
    graph, _ = import_graph()
    assert "lib.encoders" in graph and "lib.search" in graph["lib.evaluate"]  # the graph is read, not empty
    cycle = a_cycle(graph)
    assert not cycle, "import cycle: " + " → ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_and_names_its_modules():
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) == []


def test_every_lib_import_is_made_at_module_level():
    _, inner = import_graph()
    assert not inner, "imports inside functions hide the import graph; move them to the top:\n" + "\n".join(inner)


def argument_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The arguments a caller may pass (self and cls not counted)."""
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs] + [a.arg for a in (args.vararg, args.kwarg) if a]
    return len(names) - (names[:1] in (["self"], ["cls"]))


def test_rooms_stay_small_no_module_over_500_lines_no_function_over_10_arguments():
    long = [f"{p.relative_to(REPO_ROOT)}: {n} lines" for p in sorted(LIB.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500]
    wide = [f"{p.relative_to(REPO_ROOT)}:{node.lineno} {node.name}: {argument_count(node)} arguments"
            for p in sorted(LIB.rglob("*.py")) for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and argument_count(node) > 10]
    assert not long, "split these modules by job:\n" + "\n".join(long)
    assert not wide, "give these a settings object:\n" + "\n".join(wide)
    assert argument_count(ast.parse("def f(self, a, *b, c=1, **d): pass").body[0]) == 4  # the counter counts


def test_stages_and_their_metrics_file_are_named_by_paths_constants_only():
    names = set(STAGES) | {"metrics.json"}
    found = [f"{p.relative_to(REPO_ROOT)}:{node.lineno} {node.value!r}"
             for folder in ("lib", "notebooks", "bench") for p in sorted((REPO_ROOT / folder).rglob("*.py"))
             if p != LIB / "paths.py" for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and (node.value in names or node.value.split("/")[0] in STAGES)]
    assert not found, "use lib.paths' constants (CORPUS … MAPS, METRICS_FILE) or Run:\n" + "\n".join(found)


def test_a_runs_folders_are_found_through_run_only():
    """Run(name, runs_root) is the catalogue of a run's folders (stage, metrics, model, index): nothing outside
    paths.py joins a run's paths with stage_dir or run_dir."""
    found = [f"{p.relative_to(REPO_ROOT)}:{node.lineno} {node.id}"
             for folder in ("lib", "notebooks", "bench") for p in sorted((REPO_ROOT / folder).rglob("*.py"))
             if p != LIB / "paths.py" for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
             if isinstance(node, ast.Name) and node.id in ("stage_dir", "run_dir")]
    assert not found, "use lib.paths.Run:\n" + "\n".join(found)
