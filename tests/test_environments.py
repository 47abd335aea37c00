"""The per-experiment conda environments (``<exp>/environment.yml``), checked without conda.

Each environment.yml names the packages its experiment needs; ``environments/ranges.txt``
holds every version range (applied as pip constraints) and ``environments/test.txt`` pins
every package exactly. Here: the files parse, the names are unique, every path they name
exists, every named package is pinned in test.txt within its range, and each environment
holds exactly the third-party packages its experiment's code imports (read with ``ast``,
following the repository's own modules it imports, plus the report and sweep tools).
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / "environments"
EXPERIMENTS = ["nano", "owt", "gpt2", "vit", "cifar", "bert"]
# The Python floors: the optimizers package (pyproject.toml) and the reproduction kit's
# environments, whose pinned numpy/matplotlib/transformers/scikit-learn need 3.11.
PACKAGE_FLOOR, KIT_FLOOR = "3.10", "3.11"
# Every experiment can be launched, reported, swept and scanned.
TOOLS = ["harness.launch", "harness.report", "harness.sweep", "harness.robustness"]
# Packages an environment holds that its code never imports: transformers' Trainer needs
# accelerate (the Trainer recipe of optimizers/README.md), in the transformers experiments;
# SQLAlchemy imports the PostgreSQL driver for a sweep's --storage postgresql:// URL, in all
# (test_the_postgresql_driver_is_the_one_sqlalchemy_is_asked_for).
DRIVER = "psycopg2-binary"
NOT_IMPORTED = {exp: {DRIVER} | ({"accelerate"} if exp in ("gpt2", "bert") else set()) for exp in EXPERIMENTS}
TEST_ONLY = {"pytest", "packaging"}  # pinned in test.txt for the tests themselves
LOCAL = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())


# ---------------------------------------------------------------- requirement files

class Requirements:
    """What a pip requirement list installs: ``named`` maps each package it names to the
    combined specifier of its lines and of the constraint files (``-c``) it applies;
    ``editables`` are the ``-e`` paths; ``files`` every file it read."""

    def __init__(self):
        self.named: dict[str, SpecifierSet] = {}
        self.constraints: dict[str, SpecifierSet] = {}
        self.editables: list[Path] = []
        self.files: list[Path] = []

    def resolved(self) -> dict[str, SpecifierSet]:
        return {name: spec & self.constraints.get(name, SpecifierSet()) for name, spec in self.named.items()}


def _add(table: dict, line: str) -> None:
    req = Requirement(line)
    name = canonicalize_name(req.name)
    table[name] = table.get(name, SpecifierSet()) & req.specifier


def read_lines(lines: list[str], base: Path, cwd: Path, out: Requirements, constraint: bool = False) -> Requirements:
    """Parse requirement ``lines`` (paths of -r/-c relative to ``base``, of -e to ``cwd``,
    as pip does). Fails on a missing file or an option this project does not use."""
    for raw in lines:
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        option, _, arg = line.partition(" ")
        if option in ("-r", "-c"):
            path = (base / arg.strip()).resolve()
            assert path.is_file(), f"{option} {arg}: no such file {path}"
            out.files.append(path)
            read_lines(path.read_text().splitlines(), path.parent, cwd, out, constraint or option == "-c")
        elif option == "-e":
            path = (cwd / arg.strip()).resolve()
            assert (path / "pyproject.toml").is_file(), f"-e {arg}: {path} holds no pyproject.toml"
            out.editables.append(path)
        else:
            assert not line.startswith("-"), f"unexpected pip option {line!r}"
            _add(out.constraints if constraint else out.named, line)
    return out


def read_file(path: Path) -> Requirements:
    return read_lines(path.read_text().splitlines(), path.parent, path.parent, Requirements())


def environment(exp: str) -> dict:
    return yaml.safe_load((ROOT / exp / "environment.yml").read_text())


def pip_lines(env: dict) -> list[str]:
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    return pip


def env_requirements(exp: str) -> Requirements:
    """What ``conda env create -f <exp>/environment.yml`` asks pip for: conda writes the pip
    lines to a file next to environment.yml and runs pip there."""
    folder = ROOT / exp
    return read_lines(pip_lines(environment(exp)), folder, folder, Requirements())


def pins() -> dict[str, str]:
    """test.txt's exact pins: {package: version}."""
    out = {}
    for name, spec in read_file(ENVS / "test.txt").named.items():
        exact = [s.version for s in spec if s.operator == "=="]
        assert len(exact) == 1, f"test.txt: {name} is not pinned exactly ({spec})"
        out[name] = exact[0]
    return out


# ---------------------------------------------------------------- the environment files

def test_each_experiment_has_its_own_environment():
    names = [environment(exp)["name"] for exp in EXPERIMENTS]
    assert names == [f"nonlinear-damping-{exp}" for exp in EXPERIMENTS]
    assert len(set(names)) == len(names)
    for exp in EXPERIMENTS:
        text = (ROOT / exp / "environment.yml").read_text()
        assert f"conda activate nonlinear-damping-{exp}" in text  # the command its header shows
        env = environment(exp)
        assert env["channels"] == ["conda-forge"] and "pip" in env["dependencies"]


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_named_path_exists_and_every_line_parses(exp):
    req = env_requirements(exp)  # asserts the -r/-c files and -e projects exist
    assert req.editables == [ROOT], "the environment installs the project (-e ..)"
    assert ENVS / "ranges.txt" in req.files and ENVS / "common.txt" in req.files
    assert req.named, "the environment names no package"


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_package_is_pinned_in_test_txt_within_its_range(exp):
    pinned = pins()
    for name, spec in env_requirements(exp).resolved().items():
        assert name in pinned, f"{exp}: {name} is not pinned in environments/test.txt"
        assert spec.contains(pinned[name], prereleases=True), \
            f"{exp}: {name}=={pinned[name]} (test.txt) is outside {spec}"
        assert spec, f"{exp}: {name} has no version range in environments/ranges.txt"


def test_test_txt_pins_every_range_and_nothing_unranged():
    test = read_file(ENVS / "test.txt")
    ranges = read_file(ENVS / "ranges.txt").named
    pinned = pins()
    assert set(ranges) <= set(pinned), f"ranges without a pin: {sorted(set(ranges) - set(pinned))}"
    assert set(pinned) - set(ranges) == TEST_ONLY
    for name, spec in test.resolved().items():  # a pin must satisfy its range (pip would refuse it)
        assert spec.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} outside {ranges[name]}"
    used = set().union(*(env_requirements(exp).named for exp in EXPERIMENTS))
    assert set(ranges) == used, f"ranges no environment uses: {sorted(set(ranges) - used)}"


def test_the_running_environment_is_the_pinned_one():
    for name, version in pins().items():
        installed = importlib.metadata.version(name)
        assert SpecifierSet(f"=={version}").contains(installed, prereleases=True), \
            f"{name} {installed} installed, test.txt pins {version}"


def test_setup_env_hashes_the_files_that_define_the_test_environment():
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert '"$ROOT"/environments/*.txt' in script and "environments/test.txt" in script
    assert {p.parent for p in read_file(ENVS / "test.txt").files} == {ENVS}  # all inside environments/


# ---------------------------------------------------------------- imports against environments

def module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class Imports(ast.NodeVisitor):
    """A module's imports: (module, enclosing top-level function or None) pairs, with
    relative and ``from package import submodule`` imports resolved to module names."""

    def __init__(self, path: Path):
        self.path, self.module = path, module_name(path)
        self.package = self.module if path.name == "__init__.py" else self.module.rpartition(".")[0]
        self.found: list[tuple[str, str | None]] = []
        self.function: str | None = None
        self.visit(ast.parse(path.read_text(), str(path)))

    def visit_FunctionDef(self, node):
        outer = self.function
        self.function = outer or node.name
        self.generic_visit(node)
        self.function = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        self.found += [(alias.name, self.function) for alias in node.names]

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module
        self.found.append((module, self.function))
        for alias in node.names:  # from harness import checkpoint: the module harness.checkpoint
            if module.split(".")[0] in LOCAL and module_file(f"{module}.{alias.name}"):
                self.found.append((f"{module}.{alias.name}", self.function))


def names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    return used


def third_party_imports(exp: str) -> dict[str, set[str]]:
    """{top-level third-party module: the files importing it} over everything ``exp`` runs:
    its folder's files, the repository modules they import (transitively) and the tools.
    Outside the folder, an import inside a function counts only when some module of the
    closure names that function (``hf_gpt2_tokenizer``'s transformers is gpt2's, not owt's)."""
    own = sorted((ROOT / exp).glob("*.py"))
    todo = [*own, *(module_file(m) for m in TOOLS)]
    closure: dict[Path, Imports] = {}
    while todo:
        path = todo.pop()
        if path in closure:
            continue
        closure[path] = Imports(path)
        for module, _ in closure[path].found:
            parts = module.split(".")
            if parts[0] in LOCAL:  # this package and its parents (their __init__ runs too)
                todo += [f for f in (module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)) if f]
    used = set().union(*(names_used(p) for p in closure))
    out: dict[str, set[str]] = {}
    for path, imports in closure.items():
        for module, function in imports.found:
            top = module.split(".")[0]
            if top in LOCAL or top in sys.stdlib_module_names or top == "__future__":
                continue
            if function and path not in own and function not in used:
                continue
            out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


@functools.lru_cache(maxsize=None)
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution(module: str) -> str:
    """The distribution that provides a top-level module (``yaml`` -> ``pyyaml``)."""
    dists = _providers().get(module)
    assert dists, f"no installed distribution provides the module {module!r}"
    return canonicalize_name(dists[0])


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_each_environment_holds_exactly_what_its_code_imports(exp):
    imported = third_party_imports(exp)
    needed = {distribution(m): files for m, files in imported.items()}
    named = set(env_requirements(exp).named)
    missing = {name: sorted(files) for name, files in needed.items() if name not in named}
    assert not missing, f"{exp}/environment.yml lacks packages its code imports: {missing}"
    extra = named - set(needed) - NOT_IMPORTED.get(exp, set())
    assert not extra, f"{exp}/environment.yml names packages its code never imports: {sorted(extra)}"


def test_the_postgresql_driver_is_the_one_sqlalchemy_is_asked_for():
    """The driver every environment holds but no code imports is the module that SQLAlchemy
    imports for the URL the sweep harness hands it for ``--storage postgresql://...``."""
    from sqlalchemy.engine import make_url

    from harness.sweep import study

    dialect = make_url(study.engine_url("postgresql://user:pw@dbhost/optuna")).get_dialect()
    assert distribution(dialect.import_dbapi().__name__) == DRIVER
    assert study.DRIVERS[dialect.driver] == DRIVER
    assert DRIVER in read_file(ENVS / "common.txt").named


def test_import_closure_sees_through_the_harness():
    """The import reader itself: nano reaches wandb only through harness.logging (a lazy
    import in start_wandb, which harness.loop calls), cifar reaches torchvision through the
    CIFAR-10 recipe it shares with vit (harness/), and no longer timm (vit's model)."""
    nano, owt, cifar = (third_party_imports(e) for e in ("nano", "owt", "cifar"))
    assert nano["wandb"] == {"harness/logging.py"} and "optuna" in nano and "yaml" in nano
    assert "transformers" not in nano and "timm" not in nano and "datasets" not in nano
    assert "transformers" not in owt and {"datasets", "tiktoken"} <= set(owt)
    assert "timm" not in cifar and "harness/cifar10.py" in cifar["torchvision"]


# ---------------------------------------------------------------- the Python floor

def test_the_python_floor_agrees_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = SpecifierSet(project["requires-python"])
    assert floor.contains(PACKAGE_FLOOR) and not floor.contains("3.9"), project["requires-python"]
    torch = importlib.metadata.metadata("torch")["Requires-Python"]  # the package's one dependency
    assert SpecifierSet(torch).contains(PACKAGE_FLOOR)
    for exp in EXPERIMENTS:
        assert f"python={KIT_FLOOR}" in environment(exp)["dependencies"], exp
    # The pinned kit needs KIT_FLOOR: every pin accepts it, and some pin refuses the version before.
    needs = {name: importlib.metadata.metadata(name)["Requires-Python"] or "" for name in pins()}
    assert all(SpecifierSet(spec).contains(KIT_FLOOR) for spec in needs.values()), needs
    assert any(not SpecifierSet(spec).contains(PACKAGE_FLOOR) for spec in needs.values()), needs
    # Every "Python 3.N+" the documentation states is one of the two floors.
    stated = {}
    for doc in [*ROOT.glob("*.md"), *ROOT.glob("*/README.md"), *ENVS.glob("*.txt")]:
        for version in re.findall(r"Python (3\.\d+)\+", doc.read_text()):
            stated.setdefault(version, []).append(doc.name if doc.parent == ROOT else f"{doc.parent.name}/{doc.name}")
    assert set(stated) == {PACKAGE_FLOOR, KIT_FLOOR}, stated
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"needs Python {re.escape(PACKAGE_FLOOR)}\+ and torch", readme)
    assert re.search(rf"Both need only Python {re.escape(KIT_FLOOR)}\+", readme)
