"""The package's shape: no import cycle, no private name crossing modules, a public surface, no reference to
a document outside the repository, a README that lists every module."""
import ast
import re
from pathlib import Path


import hqdit_utils

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hqdit_utils"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, list[str]]]:
    """(imported package module, line, names imported from it) for every import in ``path``, top-level or
    inside a function; ``from . import x`` that names a module counts as importing that module."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                anchor = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base not in modules:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            out += [(m, node.lineno, []) for m in submodules]
            rest = [n for n in names if f"{base}.{n}" not in modules]
            if rest or not submodules:
                out.append((base, node.lineno, rest))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m, _, _ in _imports(name, path, modules) if m != name} for name, path in modules.items()}


def test_no_import_cycle_inside_the_package():
    """Every module's imports (top-level AND inside functions) form a graph without a cycle. The package's
    ``__init__`` is left out as an importer of its own modules: it re-exports the public surface, and a
    module importing ``hqdit_utils`` itself would be the cycle this test catches."""
    graph = _graph()
    graph["hqdit_utils"] = set()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_no_module_imports_the_package_itself():
    graph = _graph()
    offenders = sorted(n for n, deps in graph.items() if "hqdit_utils" in deps and n != "hqdit_utils")
    assert not offenders, f"import hqdit_utils' own modules, not the package: {offenders}"


def test_no_private_name_imported_across_modules():
    modules = _modules()
    found = []
    for name, path in modules.items():
        for target, line, names in _imports(name, path, modules):
            found += [f"{path.relative_to(ROOT)}:{line} imports {target}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
    assert not found, "\n".join(found)


def test_public_surface():
    from hqdit_utils import calibrate, evaluate, get_recipe, load_dit, quantize_, sample  # noqa: F401

    for name in hqdit_utils.__all__:
        assert hasattr(hqdit_utils, name), name


def test_quantize_reads_as_its_steps():
    tree = ast.parse((PACKAGE / "qmodel.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "quantize_")
    assert fn.end_lineno - fn.lineno + 1 <= 60


# -- references the reader can follow ------------------------------------------------------------------
# The names of the project's private planning documents, assembled so that this file does not mention them itself.
FORBIDDEN = re.compile("|".join(["digest" + " §", "paper-" + "digest", "design" + r"\.md", r"\.\./" + "shared"]))
SEARCHED = ["hqdit_utils", "notebooks", "book", "tests", "benchmarks", "README.md"]


def test_no_reference_to_a_document_outside_the_repository():
    """Docstrings, recipe descriptions, chapters and pages cite only what a reader of the repository can open."""
    hits = []
    for entry in SEARCHED:
        base = ROOT / entry
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        for path in files:
            if path.suffix not in (".py", ".md", ".yml", ".bib", ".json", ".txt", ".cfg", ".toml", ""):
                continue
            if path == Path(__file__).resolve():
                continue  # this test names the patterns it forbids
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            for i, line in enumerate(text.splitlines(), 1):
                if FORBIDDEN.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)


def test_recipe_descriptions_refer_only_to_the_book():
    from hqdit_utils.recipes import RECIPES

    assert not [r.name for r in RECIPES.values() if FORBIDDEN.search(r.description)]


def test_readme_lists_every_module():
    """The README's "What is where" table names every module of the package, and no module that is gone."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## What is where"):]
    table = table[: table.index("\n## ", 5)]
    named = set(re.findall(r"`(?:hqdit_utils/)?([a-z_]+\.py)`", table))
    files = {p.name for p in PACKAGE.glob("*.py")}
    assert named == files, f"missing from README: {sorted(files - named)}; gone: {sorted(named - files)}"
