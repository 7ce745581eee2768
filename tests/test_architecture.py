"""The house rules of docs/DESIGN.md 2, read from the code's own imports (module level and inside functions).

- no import cycle among the project's modules;
- nothing in stages/engine/ imports a stage module (stages/<stage>.py) or the CLI;
- the top of stages/ holds command modules only (each is wired by the CLI);
- the SGSD formulas are defined once (no second definition of a formula's name elsewhere).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "sgsd_cli")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _imports(mod: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules that ``mod`` imports anywhere in its body (``from a import b`` counts a.b when it is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in mods:
                n = n.rsplit(".", 1)[0] if "." in n else ""
            if n and n != mod:
                found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    # a package's __init__ that only exists is not an import target worth an edge
    return {m: {d for d in _imports(m, p, mods) if d not in ("stages", "sgsd_cli") or mods[d].stat().st_size > 0}
            for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_engine_never_imports_a_stage_or_the_cli():
    graph = _graph()
    stage_modules = {m for m in graph if m.count(".") == 1 and m.startswith("stages.") and not m.startswith("stages.engine")}
    upward = sorted((m, d) for m, deps in graph.items() if m.startswith("stages.engine")
                    for d in deps if d in stage_modules or d.startswith("sgsd_cli"))
    assert upward == []


def test_top_of_stages_holds_command_modules_only():
    """Every module at the top of stages/ is a command: some sgsd_cli module wires it."""
    graph = _graph()
    wired = {d for m, deps in graph.items() if m.startswith("sgsd_cli") for d in deps}
    top = {m for m in graph if m.count(".") == 1 and m.startswith("stages.") and m != "stages.engine"}
    assert sorted(top - wired) == []


def test_each_sgsd_formula_is_defined_once():
    formulas = {"teacher_weights", "delta", "support_score", "clipped_fraction", "stance", "polarity", "category",
                "gated_loss", "rollout_loss", "token_mask"}
    defined: dict[str, list[str]] = {}
    for m, p in _modules().items():
        for n in ast.parse(p.read_text(encoding="utf-8")).body:  # module-level definitions
            if isinstance(n, (ast.FunctionDef, ast.Assign)):
                names = [n.name] if isinstance(n, ast.FunctionDef) else [t.id for t in n.targets if isinstance(t, ast.Name)]
                for name in names:
                    if name in formulas or name == "CATEGORIES":
                        defined.setdefault(name, []).append(m)
    assert {k: v for k, v in defined.items() if v != ["stages.engine.objectives.sgsd"]} == {}


def test_every_torch_load_goes_through_the_weights_only_loader():
    """Issue 21: a checkpoint's .pt files come from wherever the folder came from; the one torch.load of the
    project is checkpoint.load_state (weights_only=True), and nothing passes weights_only=False."""
    calls = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "pickle"):
                calls.append((mod, node.lineno, [(k.arg, getattr(k.value, "value", None)) for k in node.keywords]))
    assert [c[0] for c in calls] == ["stages.engine.checkpoint"], calls
    assert ("weights_only", True) in calls[0][2]
