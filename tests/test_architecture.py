"""The house rules of docs/DESIGN.md 2, read from the code's own imports (module level and inside functions).

- no import cycle among the project's modules;
- nothing in stages/engine/ imports a stage module (stages/<stage>.py) or the CLI;
- the top of stages/ holds command modules only (each is wired by the CLI);
- the SGSD formulas are defined once (no second definition of a formula's name elsewhere);
- no stage imports another stage (only the chains in ``CHAINS`` compose stages);
- a run table's file name is spelled once, in stages/engine/tables.py;
- every stages/... path and stages.* module named in docs/, the READMEs, comments and docstrings exists.
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
    top = {m for m in graph if m.count(".") == 1 and m.startswith("stages.") and m not in ("stages.engine", "stages.experiments")}
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


# the stages that compose other stages, and which ones they may import (None: any)
CHAINS = {
    "stages.loop": None,                       # the in-process chain
    "stages.loop_plan": {"stages.loop"},       # the loop's dry-run plan
    "stages.mine_skills": {"stages.rollout"},  # samples its attempts with the rollout stage
    "stages.report": {"stages.eval"},          # eval's comparison tables
}


def test_no_stage_imports_another_stage():
    """A stage reaches shared code through the engine; only the chains above compose stages."""
    graph = _graph()
    top = {m for m in graph if m.count(".") == 1 and m.startswith("stages.") and m not in ("stages.engine", "stages.experiments")}
    bad = sorted((m, d) for m in top for d in graph[m] if d in top
                 and not (m in CHAINS and (CHAINS[m] is None or d in CHAINS[m])))
    assert bad == []


def test_table_files_are_named_once():
    """Producers and consumers name a run table through stages/engine/tables.py, never by its file name."""
    from stages.engine.tables import TABLES

    names = {n for n in TABLES}
    literals = {f"{n}.parquet" for n in names} | {f"{n}.manifest.json" for n in names}
    allowed = {"stages.engine.tables", "stages.engine.checkpoint"}
    found = []
    for mod, path in _modules().items():
        if mod in allowed:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "stage_table_path":
                found += [(mod, node.lineno, a.value) for a in node.args if isinstance(a, ast.Constant)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in literals:
                found.append((mod, node.lineno, node.value))
    assert found == []


def test_io_is_split_by_concern():
    """Issue 22: the grab-bag engine io module is gone; code imports errors / atomic / tableio / locks /
    manifest / paths directly."""
    graph = _graph()
    assert "stages.engine.io" not in graph
    assert sorted(m for m, deps in graph.items() if "stages.engine.io" in deps) == []


def test_experiment_harnesses_sit_above_the_stages():
    """The skill-world harness composes stages, so it lives in stages.experiments, not among the pipeline stages;
    nothing in the stages or the engine imports it."""
    graph = _graph()
    assert "stages.experiments.world" in graph and "stages.world" not in graph
    bad = sorted((m, d) for m, deps in graph.items() if m.startswith("stages.") and not m.startswith("stages.experiments")
                 for d in deps if d.startswith("stages.experiments"))
    assert bad == []


def _named_paths(text: str) -> set[str]:
    """stages/... and sgsd_cli/... paths and dotted stages.* module names mentioned in ``text``."""
    import re

    paths = {m.rstrip(".") for m in re.findall(r"(?<![\w./-])((?:stages|sgsd_cli)/[A-Za-z0-9_/.-]*[A-Za-z0-9_])", text)}
    mods = {m for m in re.findall(r"(?<![\w.])(stages(?:\.[a-z_][a-z0-9_]*)+)", text) if "__" not in m}
    return paths | mods


def _exists(name: str) -> bool:
    if "/" in name:
        p = REPO / name
        return p.exists() or any(p.parent.glob(p.name + "*"))  # a prefix: stages/engine/generation/ ...
    parts = name.split(".")
    for k in range(len(parts), 1, -1):  # the longest module prefix; the rest is an attribute
        base = REPO.joinpath(*parts[:k])
        if base.with_suffix(".py").exists() or (base / "__init__.py").exists() or base.is_dir():
            return True
    return False


def test_every_path_named_in_docs_and_comments_exists():
    """Module paths in docs/, the READMEs and the code's comments and docstrings point at files that exist."""
    import io
    import tokenize

    pending = {"tests/test_architecture.py"}  # its own planted stale names
    texts: dict[str, str] = {}
    for p in [*REPO.glob("docs/*.md"), REPO / "README.md", REPO / "SCHEMAS.md", REPO / "bench" / "README.md",
              *REPO.glob("scripts/*.sh")]:
        if p.exists():
            texts[str(p.relative_to(REPO))] = p.read_text(encoding="utf-8")
    for pkg in ("stages", "sgsd_cli", "tests", "bench"):
        for p in (REPO / pkg).rglob("*.py"):
            rel = str(p.relative_to(REPO))
            if rel in pending:
                continue
            toks = tokenize.generate_tokens(io.StringIO(p.read_text(encoding="utf-8")).readline)
            texts[rel] = "\n".join(t.string for t in toks if t.type in (tokenize.COMMENT, tokenize.STRING))
    missing = sorted((f, n) for f, t in texts.items() for n in _named_paths(t) if not _exists(n))
    assert missing == []


def test_path_check_finds_a_stale_name():
    assert _named_paths("see stages/vllm_backend.py and :func:`stages.scoring.score_segments`") == {
        "stages/vllm_backend.py", "stages.scoring.score_segments"}
    assert not _exists("stages/vllm_backend.py") and not _exists("stages.scoring.score_segments")
    assert _exists("stages/engine/scoring.py") and _exists("stages.engine.scoring.score_segments")
