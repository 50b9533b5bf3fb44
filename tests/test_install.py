"""What a fresh install needs: every module imports, every third-party import is a declared
dependency, every option of every command says what it does."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import pkgutil
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from conftest import load_local_cluster

import distnum
from distnum.cli import build_parser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from the test extra
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCAL = {"distnum"} | {p.stem for p in (ROOT / "tests").glob("*.py")}  # tests' own helpers


def canonical(name: str) -> str:
    """A distribution's name as pip compares them: ray[default] and Ray are "ray"."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", name, maxsplit=1)[0]).lower()


def declared(*extras: str) -> set[str]:
    """The distributions the project's dependencies and the given extras name."""
    project = PYPROJECT["project"]
    names = list(project["dependencies"])
    for extra in extras:
        names += project["optional-dependencies"][extra]
    return {canonical(name) for name in names}


def third_party_imports(files: list[Path]) -> dict[str, list[str]]:
    """The top-level modules the files import (anywhere in them, lazily included) that are
    neither the standard library nor the project's own, each with the files importing it."""
    found: dict[str, list[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL:
                    found.setdefault(top, []).append(path.name)
    return found


def undeclared(files: list[Path], allowed: set[str]) -> list[str]:
    """Each import of the files whose distribution is not among allowed, or not installed."""
    distributions = packages_distributions()
    problems = []
    for module, where in sorted(third_party_imports(files).items()):
        names = {canonical(d) for d in distributions.get(module, [])}
        if not names:  # fine only when declared for another Python (tomli)
            if canonical(module) not in allowed:
                problems.append(f"{module} (imported in {where[0]}) is neither installed nor "
                                "declared")  # fmt: skip
        elif not names & allowed:
            problems.append(f"{module} (imported in {where[0]}) comes from {sorted(names)}, "
                            "which pyproject.toml does not declare")  # fmt: skip
    return problems


def test_every_module_of_distnum_imports():
    modules = [info.name for info in pkgutil.walk_packages(distnum.__path__, "distnum.")]
    assert "distnum.engines.fast" in modules and "distnum.function_gradient" in modules
    for name in modules:
        importlib.import_module(name)


def test_the_package_imports_only_what_it_declares():
    # the package and its command: its dependencies, matplotlib from the plot extra, mpmath
    # (gradcheck's 50-digit column) from the check extra
    package = sorted((ROOT / "distnum").rglob("*.py"))
    assert undeclared(package, declared("plot", "check")) == []


def test_the_scripts_examples_and_tests_import_only_what_the_extras_declare():
    scripts = sorted((ROOT / "cluster").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))
    assert undeclared(scripts, declared("plot")) == []
    assert undeclared(sorted((ROOT / "tests").glob("*.py")), declared("test")) == []


def test_a_module_ray_does_not_ship_is_caught(tmp_path):
    """The check itself: the import that broke a fresh install (cloudpickle, which Ray ships
    only as ray.cloudpickle) is reported, and Ray's own copy is not."""
    module = tmp_path / "module.py"
    module.write_text("import cloudpickle\nfrom ray import cloudpickle as ray_copy\n")
    (problem,) = [p for p in undeclared([module], declared()) if p.startswith("cloudpickle")]
    assert "neither installed nor declared" in problem or "does not declare" in problem
    assert third_party_imports([module]) == {"cloudpickle": ["module.py"], "ray": ["module.py"]}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (choices,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(choices)


@pytest.mark.parametrize("program", ["distnum", "local_cluster.py"])
def test_every_option_has_a_help_line(program):
    parser = build_parser() if program == "distnum" else load_local_cluster().build_parser()
    parsers = {program: parser, **{f"{program} {name}": p
                                   for name, p in subcommands(parser).items()}}  # fmt: skip
    unnamed = (argparse._HelpAction, argparse._SubParsersAction)  # --help; the commands
    silent = [f"{name} {'/'.join(action.option_strings) or action.dest}"
              for name, p in parsers.items() for action in p._actions
              if action.help is None and not isinstance(action, unnamed)]  # fmt: skip
    assert silent == []
