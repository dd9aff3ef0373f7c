"""The build. Pure Python by default. With RELAY_COMPILE=1 the hot-path modules listed in
pyproject.toml ([tool.egress-relay.compiled]) are compiled to C extensions by mypyc: about
8-9% less CPU per message (benchmarks/RESULTS.md §18). That build type-checks the package,
so mypy and the stubs must be installed beside the relay's dependencies and the build must
see them (`pip install '.[compile]'`, then `RELAY_COMPILE=1 pip install --no-build-isolation
--no-deps --force-reinstall .`; README "Compiled build")."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from setuptools import setup


def compiled_modules() -> list[str]:
    pyproject = tomllib.loads(Path(__file__).with_name("pyproject.toml").read_text())
    modules: list[str] = pyproject["tool"]["egress-relay"]["compiled"]["modules"]
    return modules


def ext_modules() -> list[Any]:
    if os.environ.get("RELAY_COMPILE", "") != "1":
        return []
    from mypyc.build import mypycify

    return list(mypycify(compiled_modules(), opt_level="3", group_name="relay"))


setup(ext_modules=ext_modules())
