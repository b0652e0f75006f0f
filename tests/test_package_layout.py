"""The package's shape: no import cycle, no private name crossing modules, a public surface, no reference to
a document outside the repository, a README that lists every module."""
import ast
import re
from importlib import import_module
from pathlib import Path

import pytest

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
    tree = ast.parse((PACKAGE / "engine" / "qmodel.py").read_text())
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
    from hqdit_utils.engine.recipes import RECIPES

    assert not [r.name for r in RECIPES.values() if FORBIDDEN.search(r.description)]


def test_readme_lists_every_module():
    """The README's "What is where" table names every module of the package (path below ``hqdit_utils/``), on
    the floor the layout test gives it, and no module that is gone."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## What is where"):]
    table = table[: table.index("\n## ", 5)]
    named = {}
    for floor, paths in re.findall(r"^\| (\d) \| ([^|]+) \|", table, flags=re.M):
        for path in re.findall(r"`([a-z_/]+(?:\.py|/))`", paths):
            named[path] = int(floor)
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.parent.name != "metrics"
             and not (p.name == "__init__.py" and p.parent != PACKAGE)} | {"metrics/"}
    assert set(named) == files, f"missing from README: {sorted(files - set(named))}; gone: {sorted(set(named) - files)}"
    wrong = {p: f for p, f in named.items() if f != FLOORS[p.split("/")[0] if "/" in p else ""]}
    assert not wrong, f"README floors differ from the layout test's: {wrong}"


#: The floors of the package, from the ground up: a module imports only from its own floor or below.
FLOORS = {"": 1, "dit": 2, "engine": 3, "metrics": 4, "runs": 5, "commands": 6, "chapters": 6}


def _floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS[parts[1] if len(parts) > 2 else ""]


def _upward_imports(graph) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if b != "hqdit_utils" and a != "hqdit_utils" and _floor(b) > _floor(a))


def test_no_module_imports_a_floor_above_its_own():
    up = _upward_imports(_graph())
    assert not up, f"upward imports (move the shared piece down a floor): {up}"
    # the control: an engine module importing the runs wing would be found
    assert _upward_imports({"hqdit_utils.engine.qmodel": {"hqdit_utils.runs.experiments"}}) == [
        "hqdit_utils.engine.qmodel -> hqdit_utils.runs.experiments"]


def test_every_folder_of_the_package_has_a_floor():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders | {""} == set(FLOORS)


# -- one home per cross-cutting idea -----------------------------------------------------------------------
# Each test below finds the idea wherever it is written out again in the package, the benchmarks or the book's
# extensions (tests are left out: they may restate a value to check it), and names the home to use instead.
TOOL_FOLDERS = ["hqdit_utils", "benchmarks", "book/_ext"]


def _sources() -> dict[str, ast.Module]:
    out = {}
    for folder in TOOL_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out[str(path.relative_to(ROOT))] = ast.parse(path.read_text(), str(path))
    return out


def _home(name: str) -> str:
    """The file of the package module ``hqdit_utils.<name>`` (a wing move keeps this test true)."""
    return str(Path(import_module(f"hqdit_utils.{name}").__file__).relative_to(ROOT))


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _cpuinfo_readers(trees) -> list[str]:
    return [f"{f}:{n.lineno}" for f, tree in trees.items() for n in ast.walk(tree) if isinstance(n, ast.Call)
            and any(isinstance(a, ast.Constant) and a.value == "/proc/cpuinfo" for a in n.args)]


def _version_literals(trees, version: str) -> list[str]:
    return [f"{f}:{n.lineno}" for f, tree in trees.items() for n in ast.walk(tree)
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and n.value.value == version]


def _raw_json_writes(trees) -> list[str]:
    """``json.dump(obj, f)`` and ``….write_text(json.dumps(…))``: a JSON file written around ``files``."""
    hits = []
    for f, tree in trees.items():
        for n in ast.walk(tree):
            if not isinstance(n, ast.Call):
                continue
            inner = {_dotted(c.func) for a in n.args for c in ast.walk(a) if isinstance(c, ast.Call)}
            writes = isinstance(n.func, ast.Attribute) and n.func.attr in ("write_text", "write")
            if _dotted(n.func) == "json.dump" or (writes and "json.dumps" in inner):
                hits.append(f"{f}:{n.lineno}")
    return hits


def _model_hashers(trees) -> list[str]:
    """Functions that feed a model's ``state_dict()`` into ``hashlib.sha256``."""
    hits = []
    for f, tree in trees.items():
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                calls = {_dotted(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
                if "hashlib.sha256" in calls and any(c.endswith(".state_dict") for c in calls):
                    hits.append(f"{f}:{fn.name}")
    return hits


def _timing_helpers(trees) -> list[str]:
    """Functions that take the median time of repeated calls of a callable they are given: a loop holding
    ``time.perf_counter`` and a call of a parameter or of the loop's own variable, and a median."""
    hits = []
    for f, tree in trees.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            median = any((isinstance(n, ast.Call) and _dotted(n.func).endswith("median"))
                         or (isinstance(n, ast.BinOp) and isinstance(n.op, ast.FloorDiv)) for n in ast.walk(fn))
            if not median:
                continue
            params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
            for loop in (n for n in ast.walk(fn) if isinstance(n, ast.For)):
                names = params | {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}
                calls = [n for n in ast.walk(loop) if isinstance(n, ast.Call)]
                if (any(_dotted(c.func) == "time.perf_counter" for c in calls)
                        and any(isinstance(c.func, ast.Name) and c.func.id in names for c in calls)):
                    hits.append(f"{f}:{fn.name}")
                    break
    return hits


def _dit_configs(trees) -> list[str]:
    """A DiT config written out: a call or dict display naming both ``num_attention_heads`` and
    ``attention_head_dim``."""
    hits = []
    for f, tree in trees.items():
        for n in ast.walk(tree):
            keys = ({k.arg for k in n.keywords} if isinstance(n, ast.Call) else
                    {k.value for k in n.keys if isinstance(k, ast.Constant)} if isinstance(n, ast.Dict) else set())
            if {"num_attention_heads", "attention_head_dim"} <= keys:
                hits.append(f"{f}:{n.lineno}")
    return hits


#: The diffusers names of a DiT block's linears (``attn1.to_q`` … ``ff.net.2``, ``norm1.linear``): their home is
#: ``engine.layers`` (``LEAF_KINDS``, ``BLOCK_LINEARS``, ``layer_kind`` …).
LAYER_NAMES = re.compile(r"attn1\.to_|ff\.net\.|norm1\.linear")


def _layer_vocabulary(trees) -> list[str]:
    """A DiT layer name written out: a string constant (an f-string's literal parts included) without whitespace
    — a name or pattern, not a sentence — holding one of :data:`LAYER_NAMES`."""
    return [f"{f}:{n.lineno}" for f, tree in trees.items() for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and not re.search(r"\s", n.value)
            and LAYER_NAMES.search(n.value)]


ONE_HOME = {  # idea -> (finder, home module)
    "/proc/cpuinfo read": (_cpuinfo_readers, "provenance"),
    "JSON file written": (_raw_json_writes, "files"),
    "model state dict hashed": (_model_hashers, "files"),
    "timing helper": (_timing_helpers, "timing"),
    "DiT config written out": (_dit_configs, "dit_configs"),
    "DiT layer name written out": (_layer_vocabulary, "engine.layers"),
}
#: Modules allowed to write an idea out again, with the reason (by module, so a new occurrence elsewhere fails).
ONE_HOME_EXCEPTIONS = {
    "DiT layer name written out": {
        "dit.models": "maps the original DiT checkpoint's names onto diffusers' (the other side of the vocabulary)",
    },
}


@pytest.mark.parametrize("idea", sorted(ONE_HOME))
def test_one_home_per_idea(idea):
    finder, home = ONE_HOME[idea]
    trees = _sources()
    allowed = [_home(home)] + [_home(m) for m in ONE_HOME_EXCEPTIONS.get(idea, {})]
    found = [h for h in finder(trees) if h.split(":")[0] not in allowed]
    assert not found, f"{idea} outside {_home(home)} (use it from there): {found}"


def test_the_version_is_written_once():
    """The version is ``pyproject.toml``'s, read through the package metadata; no module assigns it as a literal."""
    from hqdit_utils.provenance import __version__

    assert re.search(rf'^version = "{re.escape(__version__)}"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert not _version_literals(_sources(), __version__)


def test_every_finder_finds_what_it_looks_for():
    """Each finder above, run on a snippet that writes its idea out again, finds it (a finder that finds nothing
    would make its test pass whatever the code)."""
    snippets = {
        _cpuinfo_readers: 'open("/proc/cpuinfo").read()',
        _raw_json_writes: 'Path("a.json").write_text(json.dumps({"a": 1}))',
        _model_hashers: "def h(m):\n    d = hashlib.sha256()\n    for k, v in m.state_dict().items():\n        d.update(k)\n",
        _timing_helpers: ("def t(fns):\n    ts = []\n    for f in fns:\n        t0 = time.perf_counter()\n        f()\n"
                          "        ts.append(time.perf_counter() - t0)\n    return statistics.median(ts)\n"),
        _dit_configs: "cfg = dict(num_attention_heads=16, attention_head_dim=72)",
        _layer_vocabulary: 'LABELS = {"ff.net.2": "fc2"}\nq = f"transformer_blocks.{b}.attn1.to_{c}"',
    }
    for finder, code in snippets.items():
        assert finder({"x.py": ast.parse(code)}), finder.__name__
    assert _version_literals({"x.py": ast.parse('__version__ = "9.9.9"')}, "9.9.9")
    # the layer-name finder sees both occurrences (a dict key, an f-string's literal part), not prose naming a layer
    assert _layer_vocabulary({"x.py": ast.parse(snippets[_layer_vocabulary])}) == ["x.py:1", "x.py:2"]
    assert not _layer_vocabulary({"x.py": ast.parse('d = "fp4 on every block (adds adaLN norm1.linear)"')})


def test_cli_common_imports_no_engine_module_for_an_exception():
    """The commands catch the package's typed errors from ``errors``, not from the modules that raise them."""
    modules = _modules()
    name = next(n for n in modules if n.endswith(".cli_common"))
    imported = {m for m, _, _ in _imports(name, modules[name], modules)}
    assert not {m for m in imported if m.rsplit(".", 1)[-1] in ("qmodel", "sampling")}, imported


def test_each_command_module_registers_its_name_with_the_listed_help():
    """``hqdit --help`` lists :data:`~hqdit_utils.commands.cli.COMMANDS` without importing their modules; each module
    registers exactly that name with exactly that help (fails when one of them changes alone)."""
    from hqdit_utils.commands.cli import COMMANDS, build_parser

    for name, (_, help_line) in COMMANDS.items():
        action = next(a for a in build_parser(name)._actions if a.dest == "command")
        assert [(c.dest, c.help) for c in action._choices_actions] == [(name, help_line)], name


def test_help_imports_no_command_module():
    import subprocess
    import sys

    code = ("import sys\nfrom hqdit_utils.commands.cli import COMMANDS, main\nassert main(['--help']) == 0\n"
            "print(sorted(m for m, _ in COMMANDS.values() if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# -- the integer path reads a layer through its public interface ----------------------------------------------
def _private_reads(tree: ast.Module) -> list[str]:
    """``obj._name`` read or written in a module where ``obj`` is another object's private state: every private
    attribute except those of ``self``, of the ``torch`` module, a tensor's version counter (``_version``, torch's
    way to see an in-place change) and the private names the module defines itself (``self._x = …``, ``def _x``)."""
    own = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
           and isinstance(n.value, ast.Name) and n.value.id == "self"}
    own |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return sorted(f"{n.lineno}: {ast.unparse(n)}" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                  and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "torch"))
                  and n.attr not in own | {"_version"})


def _quant_linear_privates() -> set[str]:
    """The private names :class:`QuantLinear` defines (its methods and ``self._x`` attributes)."""
    tree = ast.parse((PACKAGE / "engine" / "qlinear.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QuantLinear")
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    names |= {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
              and n.value.id == "self"}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_the_integer_path_reads_no_private_state_of_a_layer():
    """``lowbit`` reads a ``QuantLinear`` through its typed interface (``act_quantizer()``, public fields), never
    its privates; no module but ``qlinear`` names a private of ``QuantLinear``."""
    assert not _private_reads(ast.parse((PACKAGE / "engine" / "lowbit.py").read_text()))
    privates = _quant_linear_privates()
    assert {"_act_fmt", "_current_scale"} <= privates  # the finder below looks for something real
    outside = [f"{f}:{n.lineno}: {ast.unparse(n)}" for f, tree in _sources().items() if not f.endswith("qlinear.py")
               for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in privates
               and not (isinstance(n.value, ast.Name) and n.value.id == "self")]
    assert not outside, f"QuantLinear's privates read outside qlinear.py: {outside}"
    # the control: the reads this interface replaced are found; the module's own privates and torch's are not
    code = ("class S:\n    def __init__(self):\n        self._k = 1\n    def f(self, layer, st, w):\n"
            "        return layer._act_fmt, layer._current_scale(), st._k, self._k, torch._int_mm, w._version\n"
            "def g(layer):\n    layer._buffers['weight'] = None\n")
    assert _private_reads(ast.parse(code)) == ["5: layer._act_fmt", "5: layer._current_scale", "7: layer._buffers"]
