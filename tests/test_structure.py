"""The shape of the house, checked from the source: who imports whom, where the few privileged calls live,
and that the library never reads files relative to the checkout.

Every module of ``mpma_ds`` and ``data_tools`` is parsed with ``ast`` (nothing is imported, so the scan is
fast and sees imports inside functions too). Module-level imports are the ones that run at import time and
can form a circle; imports inside functions and under ``if TYPE_CHECKING:`` are recorded apart.

``python tests/test_structure.py`` prints the package-level import graph that docs/architecture.md carries
between its ``import-graph`` markers; ``test_architecture_doc_graph_matches_code`` keeps the two equal.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # tests may know the checkout; the library may not
LIBRARY = ("mpma_ds", "data_tools")
# A file past this is probably two ideas (STYLE.md: files of about 100-600 lines): a warning, not a failure.
MAX_LIBRARY_LINES = 800
# launch/*.py: `from mpma_ds.cli.<command> import main`, nothing else.
MAX_LAUNCH_LINES = 60
# What the model package may import from the rest of the house (STYLE.md: the model knows nothing of
# distribution), and what it must never import.
MODELS_MAY_IMPORT = ("mpma_ds.models", "mpma_ds.config", "mpma_ds.kernels")  # kernels: plain torch (+ triton)
MODELS_NEVER_IMPORT = ("deepspeed", "mlflow", "nvidia.dali")
# The package ladder, bottom rung first: a package imports only from rungs below its own, imports inside
# functions counted (those under `if TYPE_CHECKING:` never run and are left out). Written once here; the
# diagram in docs/architecture.md is rendered from it. data_tools is a library of its own below all of these
# (test_data_tools_never_imports_mpma_ds). A top-level module (mpma_ds.config) is a package of its own here.
LADDER: tuple[tuple[str, ...], ...] = (
    # core: the config engine, file io, the process group and collectives, the tokenizer loader, fused kernels,
    # the shipped recipe YAMLs
    ("mpma_ds.config", "mpma_ds.fileio", "mpma_ds.distributed", "mpma_ds.tokenizer", "mpma_ds.kernels",
     "mpma_ds.recipes"),
    ("mpma_ds.models", "mpma_ds.data"),  # plain-PyTorch MPMA; shards -> batches
    ("mpma_ds.eval",),  # metrics as pure functions
    ("mpma_ds.tracking",),  # MLflow + metrics.jsonl, run lineage, the comparison report
    ("mpma_ds.tasks",),  # what a run optimises and measures: batch -> loss, metrics
    ("mpma_ds.training",),  # the engine: recipe, build_engine (DeepSpeed), checkpoints, resharding
    ("mpma_ds.runner",),  # the Trainer, init.from, export, evaluation, the demo's stages
    ("mpma_ds.predict", "mpma_ds.benchmark", "mpma_ds.sweep"),  # a model on films; benchmark suites; sweeps
    ("mpma_ds.cli",),  # argument parsing and exit codes of the console scripts
    ("mpma_ds",),  # the public API (SPEC 5a): what it re-exports, Predictor on first use
)  # fmt: skip
# Function-level imports that point up the ladder today, (module, imported module). The list only shrinks: an
# entry whose import is gone must be deleted. (Empty: the runner resolves init.from and hands a fine-tuning task
# its source, whose load() builds the backbone.)
KNOWN_UPWARD_IMPORTS: tuple[tuple[str, str], ...] = ()
# Deferred (function-level) imports known to close a circle today, each the upward edge of its circle. The
# list only shrinks: a new circle fails the test, and an entry whose import is gone must be deleted.
KNOWN_DEFERRED_EDGES: tuple[tuple[str, str], ...] = ()
DOC = ROOT / "docs" / "architecture.md"
GRAPH_START = "<!-- import-graph:start (python tests/test_structure.py) -->"
GRAPH_END = "<!-- import-graph:end -->"


@dataclass(frozen=True)
class Import:
    """One import statement's target, as the scan resolved it."""

    module: str  # the importing module, e.g. "mpma_ds.runner.trainer"
    target: str  # the imported module: the deepest name that is a module of ours, else the name as written
    line: int
    where: str  # "module" (runs at import time), "function" (runs when called) or "type_checking"

    def __str__(self) -> str:
        return f"{module_path(self.module)}:{self.line} imports {self.target} ({self.where} level)"


@dataclass(frozen=True)
class Call:
    """A call of interest (``deepspeed.initialize``, ``sys.path.insert`` ...) and the function it sits in."""

    path: Path
    line: int
    name: str
    function: str  # dotted qualname of the enclosing function, "<module>" at module level

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} {self.name} in {self.function}"


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in python_files(*LIBRARY)}


def module_path(module: str) -> str:
    return str(library_modules()[module].relative_to(ROOT))


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.where = ["module"]
        self.found: list[Import] = []

    def _add(self, target: str, line: int) -> None:
        self.found.append(Import(self.module, target, line, self.where[-1]))

    def _scoped(self, node: ast.AST, where: str) -> None:
        self.where.append(where if self.where[-1] == "module" else self.where[-1])
        self.generic_visit(node)
        self.where.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scoped(node, "function")

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.where.append("type_checking" if self.where[-1] == "module" else self.where[-1])
        for child in node.body:
            self.visit(child)
        self.where.pop()
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.module, self.is_package, node)
        ours = library_modules()
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            # `from pkg import submodule` imports the submodule; `from pkg import name` runs pkg/__init__
            self._add(sub if sub in ours else base, node.lineno)


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    path = library_modules()[module]
    visitor = _ImportVisitor(module, path.name == "__init__.py")
    visitor.visit(parse(path))
    return tuple(dict.fromkeys(visitor.found))  # one entry per (target, line, where)


def all_imports() -> list[Import]:
    return [imp for module in library_modules() for imp in imports_of(module)]


def _within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_time_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports when it is imported (module-level imports only).

    ``import a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so those packages are edges too, except
    the packages the importer sits in: Python initialises a package before any of its modules, so a module
    reaching into its own parents finds them already in ``sys.modules`` (that is no circle).
    """
    ours = library_modules()
    graph: dict[str, set[str]] = {m: set() for m in ours}
    for imp in all_imports():
        if imp.where != "module" or imp.target not in ours:
            continue
        parts = imp.target.split(".")
        for depth in range(1, len(parts) + 1):
            target = ".".join(parts[:depth])
            if target in ours and not _within(imp.module, target):
                graph[imp.module].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component with more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return [_cycle_through(graph, comp) for comp in components]


def _cycle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest path from the component's first node back to itself, staying inside the component."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # cannot happen for a strongly connected component


class _CallVisitor(ast.NodeVisitor):
    """Calls and names worth a rule, with the enclosing function's qualname."""

    def __init__(self, path: Path):
        self.path = path
        self.scope: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> what it stands for ("ds" -> "deepspeed")
        self.calls: list[Call] = []
        self.file_refs: list[Call] = []
        self.version_literals: list[Call] = []

    def _qualname(self) -> str:
        return ".".join(self.scope) or "<module>"

    def _scoped(self, node: ast.FunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.aliases[alias.asname or alias.name.split(".")[0]] = (
                alias.name if alias.asname else alias.name.split(".")[0]
            )

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def _dotted(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func)
        if name:
            self.calls.append(Call(self.path, node.lineno, name, self._qualname()))
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            if any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
                if re.fullmatch(r"\d+(\.\d+)+\S*", node.value.value):
                    self.version_literals.append(Call(self.path, node.lineno, "__version__", self._qualname()))
        for target in node.targets:
            base = target.value if isinstance(target, ast.Subscript) else target
            if self._dotted(base) == "sys.path":
                self.calls.append(Call(self.path, node.lineno, "sys.path assignment", self._qualname()))
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in ("__file__", "REPO_ROOT", "REPO", "ROOT"):
            self.file_refs.append(Call(self.path, node.lineno, node.id, self._qualname()))


@cache
def scan_calls(path: Path) -> _CallVisitor:
    visitor = _CallVisitor(path)
    visitor.visit(parse(path))
    return visitor


def calls_named(folders: tuple[str, ...], *names: str) -> list[Call]:
    return [
        call
        for path in python_files(*folders)
        for call in scan_calls(path).calls
        if any(_within(call.name, n) for n in names)
    ]


# --- the package-level diagram in docs/architecture.md ----------------------------------------------


def component(module: str) -> str:
    """The box a module belongs to in the diagram: a subpackage (mpma_ds.training, data_tools.sources) or a
    top-level module of its own (mpma_ds.config, data_tools.build_shards)."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, dict[str, str]]:
    """Component -> {imported component: "module" | "function"} over every import of ours (module-level
    wins over function-level when both occur)."""
    ours = library_modules()
    graph: dict[str, dict[str, str]] = {component(m): {} for m in ours}
    for imp in all_imports():
        if imp.target not in ours or imp.where == "type_checking":
            continue
        src, dst = component(imp.module), component(imp.target)
        if src == dst:
            continue
        if graph[src].get(dst) != "module":
            graph[src][dst] = imp.where
    return graph


def rung(component_name: str) -> int | None:
    """The component's rung on ``LADDER`` (0 = bottom); None for data_tools (below all) or a missing entry."""
    return next((i for i, names in enumerate(LADDER) if component_name in names), None)


def ladder_violations() -> list[Import]:
    """Imports of ours (module- or function-level) from an mpma_ds package to one on its own rung or above."""
    ours = library_modules()
    known = set(KNOWN_UPWARD_IMPORTS)
    bad = []
    for imp in all_imports():
        if imp.where == "type_checking" or imp.target not in ours or not _within(imp.module, "mpma_ds"):
            continue
        src, dst = component(imp.module), component(imp.target)
        if src == dst or not _within(dst, "mpma_ds") or (imp.module, imp.target) in known:
            continue
        if rung(dst) >= rung(src):
            bad.append(imp)
    return bad


def render_package_graph() -> str:
    """data_tools first, then mpma_ds rung by rung from the bottom; ``(x)``: imported only inside functions."""
    graph = package_graph()
    width = max(len(name) for name in graph)
    order = sorted(graph, key=lambda name: (-1 if rung(name) is None else rung(name), name))
    lines = []
    for src in order:
        deps = graph[src]
        targets = [d if deps[d] == "module" else f"({d})" for d in sorted(deps)]
        where = "data_tools" if rung(src) is None else f"rung {rung(src)}"
        lines.append(f"{where:<10}  {src:<{width}}  -> {', '.join(targets) if targets else '-'}")
    return "\n".join(lines)


def doc_graph_block() -> str:
    return f"{GRAPH_START}\n```\n{render_package_graph()}\n```\n{GRAPH_END}"


# --- the rules --------------------------------------------------------------------------------------


def test_scan_sees_the_library():
    modules = library_modules()
    assert "mpma_ds.training.engine" in modules and "data_tools.shard_format" in modules
    graph = import_time_graph()
    assert "mpma_ds.models.mpma" in graph["mpma_ds.models"]
    # a function-level import is recorded, but not as an import-time edge
    assert any(imp.where == "function" for imp in all_imports())


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_time_graph())
    assert not cycles, "import circles among module-level imports:\n" + "\n".join(" -> ".join(c) for c in cycles)


def deferred_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports at import time or when a function runs (TYPE_CHECKING
    imports left out: they never run). A circle here is one that a function-level import only hides, like
    the two this project once had (dicom_io <-> sources_images, loggers <-> mlflow_logger)."""
    ours = library_modules()
    graph: dict[str, set[str]] = {m: set() for m in ours}
    for imp in all_imports():
        if imp.where != "type_checking" and imp.target in ours and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    return graph


def test_no_import_circles_hidden_by_deferred_imports():
    graph = deferred_graph()
    stale = [edge for edge in KNOWN_DEFERRED_EDGES if edge[1] not in graph.get(edge[0], ())]
    assert not stale, f"these known deferred imports are gone; delete them from KNOWN_DEFERRED_EDGES: {stale}"
    for src, dst in KNOWN_DEFERRED_EDGES:
        graph[src].discard(dst)
    cycles = find_cycles(graph)
    assert not cycles, "import circles closed by a function-level import:\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_every_package_is_on_the_ladder_once():
    names = [name for names in LADDER for name in names]
    assert len(names) == len(set(names)), "a package on two rungs"
    components = {component(m) for m in library_modules() if _within(m, "mpma_ds")}
    assert components - set(names) == set(), "packages missing from LADDER (give each its rung)"
    assert set(names) - components == set(), "LADDER names packages that do not exist"


def test_ladder_finder_reports_an_upward_import():
    assert rung("mpma_ds.config") == 0 < rung("mpma_ds.models") < rung("mpma_ds.tasks") < rung("mpma_ds.cli")
    assert rung("data_tools.shard_format") is None
    assert rung("mpma_ds.models") == rung("mpma_ds.data")  # siblings: neither may import the other


def test_packages_form_a_ladder():
    """Counting imports inside functions: a deferred import that points upward hides a layer that points
    upward (the cycle training -> tasks -> training once did)."""
    ours = library_modules()
    stale = [
        (m, t) for m, t in KNOWN_UPWARD_IMPORTS if t not in {i.target for i in imports_of(m)} or t not in ours
    ]
    assert not stale, f"these upward imports are gone; delete them from KNOWN_UPWARD_IMPORTS: {stale}"
    bad = ladder_violations()
    assert not bad, (
        "imports that point up the ladder (or across a rung) in tests/test_structure.py:\n"
        + "\n".join(
            f"{imp}: {component(imp.module)} is on rung {rung(component(imp.module))}, "
            f"{component(imp.target)} on rung {rung(component(imp.target))}"
            for imp in bad
        )
    )


def test_models_import_only_models_config_and_third_party():
    bad = [
        imp
        for imp in all_imports()
        if _within(imp.module, "mpma_ds.models")
        and (
            _within(imp.target, MODELS_NEVER_IMPORT)
            or (_within(imp.target, "mpma_ds") and not _within(imp.target, MODELS_MAY_IMPORT))
        )
    ]
    assert not bad, "mpma_ds.models must stay plain PyTorch:\n" + "\n".join(map(str, bad))


BLOCKED_IMPORT_PROBE = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {blocked!r}
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                attempts.append(name)
                raise ModuleNotFoundError(f"{{name}} is blocked in this test", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import torch
    import mpma_ds.models as models

    model = models.create_model("mpma_tiny").eval()
    images = torch.randn(2, model.config.in_chans, model.config.image_size, model.config.image_size)
    ids = torch.randint(5, 100, (2, 12))
    batch = {{"image": images, "input_ids": ids, "attention_mask": torch.ones_like(ids),
             "mlm_labels": torch.where(torch.rand(2, 12) < 0.3, ids, -100)}}
    out = model(batch)
    assert torch.isfinite(out["loss"]), out
    loaded = sorted(m for m in sys.modules if m.startswith("mpma_ds"))
    print("ATTEMPTS", attempts)
    print("LOADED", loaded)
    """
)


def test_models_import_and_run_with_deepspeed_mlflow_dali_blocked():
    code = BLOCKED_IMPORT_PROBE.format(blocked=list(MODELS_NEVER_IMPORT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = dict(
        line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("ATTEMPTS", "LOADED"))
    )
    assert report["ATTEMPTS"] == "[]", f"something tried to import a blocked package: {report['ATTEMPTS']}"
    loaded = ast.literal_eval(report["LOADED"])
    # importing mpma_ds.models runs mpma_ds/__init__, which adds the tokenizer loader and nothing else
    allowed = (*MODELS_MAY_IMPORT, "mpma_ds.tokenizer")
    extra = [m for m in loaded if m != "mpma_ds" and not _within(m, allowed)]
    assert not extra, f"importing mpma_ds.models loaded {extra}"


def test_data_tools_never_imports_mpma_ds():
    bad = [imp for imp in all_imports() if _within(imp.module, "data_tools") and _within(imp.target, "mpma_ds")]
    assert not bad, "data_tools is independent of the training code:\n" + "\n".join(map(str, bad))


def test_deepspeed_initialize_only_in_build_engine():
    calls = calls_named((*LIBRARY, "launch", "benchmarks"), "deepspeed.initialize")
    where = {(str(c.path.relative_to(ROOT)), c.function) for c in calls}
    assert where == {("mpma_ds/training/engine.py", "build_engine")}, "\n".join(map(str, calls))


def test_mlflow_imported_only_by_tracking():
    for folder in ("launch", "benchmarks"):  # scripts: scanned like the library, with their own module names
        for path in python_files(folder):
            visitor = _ImportVisitor(module_name(path), path.name == "__init__.py")
            visitor.visit(parse(path))
            assert not [i for i in visitor.found if _within(i.target, "mlflow")], f"{path} imports mlflow"
    bad = [
        imp
        for imp in all_imports()
        if _within(imp.target, "mlflow") and not _within(imp.module, "mpma_ds.tracking")
    ]
    assert not bad, "only mpma_ds.tracking talks to MLflow:\n" + "\n".join(map(str, bad))


def test_no_sys_path_edits():
    calls = [
        c
        for c in calls_named((*LIBRARY, "launch"), "sys.path")
        if c.name.startswith("sys.path.") or "assignment" in c.name
    ]
    assert not calls, "sys.path is the installer's business:\n" + "\n".join(map(str, calls))


def test_library_never_reads_files_relative_to_the_checkout():
    """Package data goes through importlib.resources (see shipped_ds_configs, shipped_recipes): an installed
    wheel has no launch/, ds_configs/ or checkout around it."""
    refs = [ref for path in python_files(*LIBRARY) for ref in scan_calls(path).file_refs]
    assert not refs, "library code that finds files from its own location:\n" + "\n".join(map(str, refs))


def test_library_files_are_one_idea_each():
    sizes = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in python_files(*LIBRARY)}
    over = {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > MAX_LIBRARY_LINES}
    if over:  # a size is a smell, not a rule: splitting one idea across two files to pass a cap is worse
        warnings.warn(f"files over {MAX_LIBRARY_LINES} lines (two ideas? split them): {over}", stacklevel=1)


def test_launch_scripts_are_thin():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in (ROOT / "launch").glob("*.py")}
    fat = {name: n for name, n in sizes.items() if n > MAX_LAUNCH_LINES}
    assert not fat, f"launch scripts over {MAX_LAUNCH_LINES} lines (move the work into mpma_ds): {fat}"


def test_pre_commit_runs_the_pinned_ruff_as_make_lint_does():
    import yaml
    from packaging.specifiers import SpecifierSet

    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    (repo,) = config["repos"]
    assert repo["repo"] == "local", "hooks from the project's venv need no download"
    hooks = {hook["id"]: hook for hook in repo["hooks"]}
    assert set(hooks) == {"ruff-check", "ruff-format"}
    assert '/bin/ruff" check ' in hooks["ruff-check"]["entry"]
    assert '/bin/ruff" format ' in hooks["ruff-format"]["entry"]
    # the ruff the hooks (and make lint) run is the one setup.py's dev extra pins
    (pin,) = re.findall(r'"ruff([<>=!~][^"]*)"', (ROOT / "setup.py").read_text(encoding="utf-8"))
    assert metadata.version("ruff") in SpecifierSet(pin), f"installed ruff {metadata.version('ruff')} vs {pin}"


def test_one_version_source():
    import data_tools
    import mpma_ds

    (version,) = re.findall(r'^VERSION = "([^"]+)"', (ROOT / "setup.py").read_text(encoding="utf-8"), re.M)
    assert mpma_ds.__version__ == data_tools.__version__ == version
    literals = [ref for path in python_files(*LIBRARY) for ref in scan_calls(path).version_literals]
    assert not literals, "a version written a second time:\n" + "\n".join(map(str, literals))


def test_architecture_doc_graph_matches_code():
    text = DOC.read_text(encoding="utf-8")
    assert GRAPH_START in text and GRAPH_END in text, f"{DOC} lost its import-graph markers"
    start = text.index(GRAPH_START)
    current = text[start : text.index(GRAPH_END) + len(GRAPH_END)]
    assert current == doc_graph_block(), (
        "docs/architecture.md's import graph is out of date; paste the output of "
        "`python tests/test_structure.py` between its markers"
    )


if __name__ == "__main__":
    print(doc_graph_block())
