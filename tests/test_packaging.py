"""pyproject.toml: a distribution name of our own, every direct import declared, SPDX licence."""

from __future__ import annotations

import ast
import re
import sys
import tomllib

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# Imported by ccr but not installable from PyPI under that name, or optional by design.
NOT_FROM_PYPI = {
    "pycriu": "built from CRIU's source (ccr doctor names the command)",
    "cuda": "the gpu extra (cuda-bindings), imported only when a step uses a GPU",
    "click": "only where typer does not vendor it, and then typer itself depends on it",
}
# Import name -> distribution name, where they differ.
DISTRIBUTION = {"blake3": "blake3", "zstandard": "zstandard", "google": "protobuf"}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def third_party_imports() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "ccr").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "ccr"}


def test_distribution_name_is_not_the_unrelated_pypi_ccr() -> None:
    # PyPI's `ccr` is another project with its own `ccr` package: `pip install -U ccr`
    # must never be able to replace this tool with it.
    assert PROJECT["name"] == "ccr-criu"
    assert PROJECT["scripts"] == {"ccr": "ccr.entrypoint:main"}
    readme = (REPO / "README.md").read_text()
    assert "pip install ccr-criu" in readme


def test_every_direct_import_is_declared() -> None:
    declared = requirement_names(PROJECT["dependencies"])
    optional = requirement_names(
        [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    )
    missing = []
    for module in sorted(third_party_imports()):
        if module in NOT_FROM_PYPI:
            continue
        dist = DISTRIBUTION.get(module, module).lower().replace("_", "-")
        if dist not in declared and dist not in optional:
            missing.append(module)
    assert not missing, f"imported by ccr but not in pyproject's dependencies: {missing}"
    assert "rich" in declared  # the progress bars: typer's own dependency is not a promise


def test_spdx_license_urls_classifiers_and_shipped_installer() -> None:
    assert PROJECT["license"] == "GPL-2.0-or-later"  # an SPDX expression (PEP 639)
    requires = PYPROJECT["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r[12:]) >= 77 for r in requires)
    assert PROJECT["urls"] and PROJECT["classifiers"]
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]  # PEP 639
    assert "jsonschema>=4" in PROJECT["optional-dependencies"]["dev"]
    assert "data/*.sh" in PYPROJECT["tool"]["setuptools"]["package-data"]["ccr"]
    assert (REPO / "ccr" / "data" / "install-criu.sh").is_file()
