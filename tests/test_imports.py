"""The package's import graph stays clean (issue 19): no import cycle inside ace_hf, no module reaching into
another module's private names, publishing and conversion free of the renderer and the evaluation suite, and the
remote-code files loadable from a Hub folder with nothing but torch, numpy and transformers installed.

The checks read the source with `ast` rather than importing it: they take milliseconds, see imports inside
functions too (not those under `if TYPE_CHECKING:`, which never run), and name the file and line to fix. One fresh-interpreter check confirms what importing
publishing and conversion really loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path

from transformers.dynamic_module_utils import get_imports

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ace_hf"

# Copied next to a checkpoint on the Hub and loaded with trust_remote_code, where ace_hf is not installed.
REMOTE_CODE = (
    "configuration_ace",
    "modeling_ace",
    "image_processing_ace",
    "correspondence_ace",
    "losses_ace",
    "presets_ace",
)
REMOTE_CODE_PACKAGES = {"torch", "numpy", "transformers"}

# Publishing and conversion (and the `ace-hf convert` command) must stay light: no CT renderer, no evaluation
# suite (only its report formatting).
LIGHT_MODULES = ("ace_hf.hub", "ace_hf.convert", "ace_hf.commands.convert")
RENDERER = "ace_hf.synthetic"
EVALUATION = "ace_hf.evaluation"
EVALUATION_ALLOWED = {"ace_hf.evaluation", "ace_hf.evaluation.report"}
HEAVY_PACKAGES = ("nibabel",)


@dataclass(frozen=True)
class Import:
    """One name an import statement binds. `module` is absolute; `name` is what a from-import takes from it
    (None for a plain `import module`); `local` is the name it binds and `binds` the dotted name that refers to
    (`import a.b` binds a, `import a.b as x` binds x to a.b, `from a import b` binds b to a.b)."""

    module: str
    name: str | None
    local: str
    binds: str
    line: int
    level: int
    in_function: bool


def module_name(path: Path) -> str:
    """The dotted name Python gives the file at `path` (relative to the repository root)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def package_modules() -> dict[str, Path]:
    """Every module and package of ace_hf, by dotted name."""
    return {module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


def script_files() -> list[Path]:
    """The benchmark and example scripts: users of ace_hf's public API like any other."""
    return sorted(path for folder in ("benchmarks", "examples") for path in (ROOT / folder).rglob("*.py"))


@cache
def parse(path: Path) -> ast.Module:
    """The syntax tree of `path`, parsed once for all checks."""
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_private(name: str) -> bool:
    """`_name` is private to its module; `__name__`-style names are Python's, not private."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def within(module: str, package: str) -> bool:
    """Whether `module` is `package` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def is_heavy(module: str) -> bool:
    """Whether `module` belongs to what publishing and conversion must not load: nibabel, the renderer, or an
    evaluation module other than the report."""
    return (
        any(within(module, package) for package in HEAVY_PACKAGES)
        or within(module, RENDERER)
        or (within(module, EVALUATION) and module not in EVALUATION_ALLOWED)
    )


def ancestors(module: str) -> list[str]:
    """The packages Python initializes before `module`: "a.b.c" -> ["a", "a.b"]."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def relative_base(path: Path, level: int, module: str | None) -> str:
    """The absolute module that `from <level dots><module> import ...` in `path` names."""
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{module}" if module else base


def is_type_checking_block(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): its imports are for type checkers and never run."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@cache
def imports(path: Path) -> tuple[Import, ...]:
    """Every name bound by an import statement in `path`, at any nesting level (functions' lazy imports too)."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                local, binds = (alias.asname, alias.name) if alias.asname else (top, top)
                found.append(Import(alias.name, None, local, binds, node.lineno, 0, in_function))
        elif isinstance(node, ast.ImportFrom):
            base = relative_base(path, node.level, node.module) if node.level else node.module
            for alias in node.names:
                local, binds = alias.asname or alias.name, f"{base}.{alias.name}"
                found.append(Import(base, alias.name, local, binds, node.lineno, node.level, in_function))
        if is_type_checking_block(node):  # never runs: annotations only
            for child in node.orelse:
                visit(child, in_function)
            return
        inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(parse(path), False)
    return tuple(found)


def target(imported: Import) -> str:
    """The module an import loads: `from ace_hf.evaluation import report` loads the submodule
    ace_hf.evaluation.report, `from ace_hf.hub import push` loads ace_hf.hub."""
    return imported.binds if imported.name and imported.binds in package_modules() else imported.module


def location(path: Path, line: int) -> str:
    """`path:line` relative to the repository root, as editors and pytest print it."""
    return f"{path.relative_to(ROOT)}:{line}"


@cache
def dependencies(module: str) -> dict[str, str]:
    """The ace_hf modules that importing `module` runs (each import's target and the packages above it), with
    where the import is; `module`'s own packages are left out: they are already initialized or in progress,
    so a module importing its own package's names closes no loop."""
    path = package_modules()[module]
    own = {module, *ancestors(module)}
    found: dict[str, str] = {}
    for imported in imports(path):
        loaded = target(imported)
        for dependency in (*ancestors(loaded), loaded):
            if dependency in package_modules() and dependency not in own and dependency not in found:
                lazy = ", inside a function" if imported.in_function else ""
                found[dependency] = location(path, imported.line) + lazy
    return found


@cache
def import_chains(start: str) -> dict[str, tuple[str, ...]]:
    """The shortest chain of imports from `start` to every ace_hf module that importing it runs."""
    chains = {start: (start,)}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for dependency in dependencies(module):
            if dependency not in chains:
                chains[dependency] = (*chains[module], dependency)
                queue.append(dependency)
    return chains


def describe(chain: tuple[str, ...]) -> str:
    """`a -> b (a.py:3) -> c (b.py:9)`: an import chain with the line behind each step."""
    steps = [chain[0]] + [f"{after} ({dependencies(before)[after]})" for before, after in pairwise(chain)]
    return " -> ".join(steps)


def import_cycles() -> list[str]:
    """For each group of modules that import each other (directly or through others), its shortest cycle
    through the group's first module, and the group's other members."""
    cycles: dict[frozenset[str], str] = {}
    for module in package_modules():
        group = frozenset(other for other in import_chains(module) if module in import_chains(other))
        if len(group) > 1 and group not in cycles:
            chains = [import_chains(dependency) for dependency in dependencies(module)]
            shortest = min(((module, *chain[module]) for chain in chains if module in chain), key=len)
            others = ", ".join(sorted(group - set(shortest)))
            cycles[group] = describe(shortest) + (f"; also in this loop: {others}" if others else "")
    return list(cycles.values())


def private_imports(path: Path) -> Iterator[str]:
    """Imports in `path` that take a private name (or a private module) from another ace_hf module."""
    for imported in imports(path):
        loaded = target(imported)
        if not within(loaded, PACKAGE) or loaded == module_name(path):
            continue
        names = loaded.split(".") + ([imported.name] if loaded == imported.module and imported.name else [])
        for name in filter(is_private, names):
            yield f"{location(path, imported.line)}: imports private name {name!r} from {imported.module}"


def dotted(node: ast.Attribute) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None when the chain does not start at a plain name (a call, a subscript)."""
    parts: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        parts.append(current.attr)
        current = current.value
    return [current.id, *parts[::-1]] if isinstance(current, ast.Name) else None


def private_attributes(path: Path) -> Iterator[str]:
    """`module._name` uses in `path` where `module` is a name bound to another ace_hf module."""
    aliases = {
        imported.local: imported.binds for imported in imports(path) if imported.binds in package_modules()
    }
    reported: set[tuple[int, str]] = set()
    for node in ast.walk(parse(path)):
        chain = dotted(node) if isinstance(node, ast.Attribute) else None
        if not chain or chain[0] not in aliases:
            continue
        module = aliases[chain[0]]
        for attribute in chain[1:]:
            if f"{module}.{attribute}" in package_modules():
                module = f"{module}.{attribute}"
                continue
            if (
                is_private(attribute)
                and module != module_name(path)
                and (node.lineno, attribute) not in reported
            ):
                reported.add((node.lineno, attribute))
                yield f"{location(path, node.lineno)}: uses private name {attribute!r} of {module}"
            break


def private_name_uses(paths: list[Path]) -> list[str]:
    """Every import of, or attribute access to, another ace_hf module's private name in `paths`."""
    return [
        problem
        for path in paths
        for check in (private_imports, private_attributes)
        for problem in check(path)
    ]


def test_ace_hf_has_no_import_cycles() -> None:
    """A cycle makes import order matter (a half-initialized module raises ImportError or AttributeError
    depending on who is imported first); imports inside functions count, they close the same loops."""
    cycles = import_cycles()
    assert not cycles, "import cycles in ace_hf:\n" + "\n".join(cycles)


def test_ace_hf_modules_use_only_each_others_public_names() -> None:
    """A private name is free to change; reaching into one from another module makes that change break it."""
    problems = private_name_uses(list(package_modules().values()))
    assert not problems, "private names used across ace_hf modules:\n" + "\n".join(problems)


def test_benchmarks_and_examples_use_only_public_names_of_ace_hf() -> None:
    """The scripts show how to use the library: only through what it publishes."""
    problems = private_name_uses(script_files())
    assert not problems, "private ace_hf names used by benchmarks/ or examples/:\n" + "\n".join(problems)


def test_publishing_and_conversion_do_not_import_the_renderer_or_the_evaluation_suite() -> None:
    """Publishing a checkpoint or converting one must not need nibabel or the suite's imports; only the
    evaluation report (the model card's results table) is shared. Lazy imports count: no code path may."""
    problems = []
    for start in LIGHT_MODULES:
        for module, chain in import_chains(start).items():
            if any(map(is_heavy, chain[:-1])):
                continue  # reported at the first heavy module on the way
            if is_heavy(module):
                problems.append(describe(chain))
                continue
            for imported in imports(package_modules()[module]):
                if imported.level == 0 and is_heavy(imported.module):
                    where = location(package_modules()[module], imported.line)
                    problems.append(f"{describe(chain)} imports {imported.module} ({where})")
    assert not problems, "publishing/conversion reach heavy modules:\n" + "\n".join(problems)


def test_remote_code_imports_only_torch_numpy_transformers_and_each_other() -> None:
    """The remote-code files are copied to the Hub beside the weights, without ace_hf: transformers' loader
    requires every package they import (outside its availability checks, which it skips) and copies only the
    siblings named by `from .sibling import ...`."""
    allowed = REMOTE_CODE_PACKAGES | set(sys.stdlib_module_names)
    problems = []
    for stem in REMOTE_CODE:
        path = ROOT / PACKAGE / f"{stem}.py"
        required = sorted(set(get_imports(path)) - allowed)
        problems += [f"{path.relative_to(ROOT)}: requires package {package!r}" for package in required]
        for imported in imports(path):
            sibling = imported.module.removeprefix(f"{PACKAGE}.")
            if imported.level and (imported.level != 1 or sibling not in REMOTE_CODE):
                problems.append(
                    f"{location(path, imported.line)}: imports {imported.name!r} from {imported.module} "
                    f"(relative, level {imported.level}); transformers copies only `from .<sibling> import` files"
                )
    assert not problems, (
        "remote code imports beyond torch, numpy, transformers and its siblings:\n" + "\n".join(problems)
    )


def test_importing_publishing_and_conversion_loads_neither_the_renderer_nor_the_suite() -> None:
    """What the static check promises, at run time: a fresh interpreter importing ace_hf.hub and ace_hf.convert
    has not loaded nibabel, the renderer or any evaluation module beyond the report."""
    code = "import sys, ace_hf.hub, ace_hf.convert; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert loaded.returncode == 0, loaded.stderr
    heavy = sorted(filter(is_heavy, loaded.stdout.split()))
    assert not heavy, f"importing ace_hf.hub and ace_hf.convert loaded {heavy}"


def test_the_package_namespace_holds_only_its_own_public_names() -> None:
    """`ace_hf` lists its own names and nothing of transformers' (the Auto classes it registers with stay there),
    and each name it lists resolves."""
    import ace_hf

    public = {name for name in dir(ace_hf) if not name.startswith("_")}
    submodules = {name for name in public if isinstance(getattr(ace_hf, name), type(ace_hf))}
    assert public - submodules == set(ace_hf.__all__)
    assert not {name for name in public if name.startswith("Auto")}
    assert all(getattr(ace_hf, name) is not None for name in ace_hf.__all__)


def test_importing_ace_hf_loads_neither_torch_nor_transformers_models_and_first_use_registers() -> None:
    """`import ace_hf` stays cheap (the command line's --help must not wait for torch); the first ACE name used
    registers the ACE classes with the Auto classes."""
    code = (
        "import sys, ace_hf; print('torch' in sys.modules); from transformers import AutoModel; "
        "from ace_hf import AceConfig; print(AutoModel._model_mapping[AceConfig].__name__)"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["False", "AceModel"]
