"""The compiled build (setup.py, RELAY_COMPILE=1, `make test-compiled`): what it compiles,
the rules its modules keep, and which build a run of the suite has in front of it."""

from __future__ import annotations

import ast
import os
import tomllib
from pathlib import Path

from relay.runtime.build import compiled_modules, describe

ROOT = Path(__file__).resolve().parent.parent


def listed() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    modules: list[str] = pyproject["tool"]["egress-relay"]["compiled"]["modules"]
    return modules


def test_the_listed_modules_exist_once_each() -> None:
    modules = listed()
    assert modules, "nothing to compile"
    assert len(set(modules)) == len(modules)
    missing = [m for m in modules if not (ROOT / m).is_file()]
    assert missing == []


def test_no_compiled_class_overrides_what_it_inherits_in_its_class_body() -> None:
    """mypyc drops the class-level values a subclass sets when it inherits from a class of an
    interpreted module: compiled, AddressError(PermanentError) with `code = 553` answered
    `554 5.7.1`, its base's code. Such classes live in modules left interpreted
    (core/errors.py); a compiled module's classes derive from nothing (dataclasses, plain
    classes) or keep their class bodies to methods and annotations."""
    offenders = []
    for module in listed():
        tree = ast.parse((ROOT / module).read_text(), module)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef) or not node.bases:
                continue
            bases = [ast.unparse(b) for b in node.bases]
            if bases in (["object"], ["Protocol"], ["typing.Protocol"]):
                continue
            for stmt in node.body:
                valued = isinstance(stmt, ast.Assign) or (
                    isinstance(stmt, ast.AnnAssign) and stmt.value is not None
                )
                if valued:
                    offenders.append(f"{module}:{stmt.lineno} {node.name}({', '.join(bases)})")
    assert offenders == []


def test_the_suite_runs_against_the_build_it_was_asked_to() -> None:
    """`make test` runs the sources as they are; `make test-compiled` (RELAY_EXPECT_COMPILED=1)
    must really have every listed module compiled, or its run proves nothing."""
    if os.environ.get("RELAY_EXPECT_COMPILED") == "1":
        assert compiled_modules() == sorted(listed())
        assert describe() == f"compiled by mypyc ({len(listed())} modules)"
    else:
        assert compiled_modules() == []
        assert describe() == "interpreted (pure Python)"
