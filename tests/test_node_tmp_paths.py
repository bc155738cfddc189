"""Which of the node's /tmp paths a step with a private /tmp keeps seeing (pure logic, on
real files under /tmp)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccr.engines.process import node_tmp_paths


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A checkout with a venv under /tmp, as a CI clone may be."""
    top = Path(tempfile.mkdtemp(prefix="ccr-ntp-", dir="/tmp"))
    (top / ".venv" / "bin").mkdir(parents=True)
    (top / ".venv" / "bin" / "python").write_text("")
    (top / ".venv" / "bin" / "dumb-init").write_text("")
    (top / "work").mkdir()
    (top / "work" / "train.py").write_text("")
    try:
        yield top
    finally:
        shutil.rmtree(top)


def test_software_under_tmp_keeps_its_top_level_entry(checkout: Path) -> None:
    init = str(checkout / ".venv" / "bin" / "dumb-init")
    argv = [str(checkout / ".venv" / "bin" / "python"), "train.py"]
    kept = node_tmp_paths(Path("/home/u"), [Path("/home/u/out")], argv, {}, init)
    assert kept == [checkout]


def test_cwd_and_outputs_are_kept_exactly(checkout: Path) -> None:
    work = checkout / "work"
    kept = node_tmp_paths(work, [work / "o.out"], ["/usr/bin/python3", "x.py"], {}, "/usr/bin/x")
    assert kept == [work]


def test_a_script_argument_and_path_variables(checkout: Path) -> None:
    script = checkout / "work" / "train.py"
    env = {"PYTHONPATH": f"{checkout}:/opt/lib", "PATH": "/usr/bin:/bin"}
    kept = node_tmp_paths(Path("/srv"), [Path("/srv/o")], ["python3", str(script)], env, "/x")
    assert kept == [checkout]


def test_nothing_under_tmp_keeps_nothing() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "/tmp/does-not-exist-ccr"}
    assert node_tmp_paths(Path("/srv"), [Path("/srv/o")], ["true"], env, "/usr/bin/x") == []
