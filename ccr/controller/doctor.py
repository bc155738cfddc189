"""`ccr doctor`, `ccr version` and the check `ccr run` makes before starting a step.

A step ccr cannot checkpoint is a step whose work is lost at the first preemption, so `ccr
run` refuses to start one (unless told --no-checkpoint-check); `ccr doctor` says exactly
what is missing and which commands install it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccr import __version__, config
from ccr.controller.runtime import CRIU_FACTS
from ccr.engines import criu as criu_engine
from ccr.errors import CcrError, CriuError

MIN_CRIU_MAJOR = 4
# Features `ccr version` reports: incremental dumps need mem_dirty_track, lazy restores
# (page server) need userfaultfd with non-cooperative events.
FEATURES = ("mem_dirty_track", "uffd", "uffd-noncoop", "pidfd_store", "timens")
README_SECTION = "README.md, section 'Set-up'"


def installer() -> Path:
    """The CRIU + pycriu installer shipped inside the package (reachable after a pip install)."""
    return Path(__file__).resolve().parent.parent / "data" / "install-criu.sh"


def install_command() -> str:
    """The one command that installs CRIU >= 4 and pycriu for this Python (as root)."""
    return f"sudo bash {installer()} {sys.executable}"


@dataclass
class Finding:
    """One thing ccr needs: whether it is there, what was found, and how to get it."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def pycriu_problem() -> str | None:
    """Why pycriu (RPC and image decoder) cannot be imported; None when it can."""
    if importlib.util.find_spec("pycriu") is None:
        return "pycriu is not importable"
    try:
        importlib.import_module("pycriu.images")
    except Exception as exc:  # noqa: BLE001 - any failure to import means "not usable"
        return f"pycriu.images does not import: {type(exc).__name__}: {exc}"
    return None


def _criu_binary() -> tuple[str | None, str]:
    try:
        return config.criu_binary(), ""
    except CcrError as exc:
        return None, str(exc)


def diagnose() -> list[Finding]:
    """Every requirement of checkpointing, each with what was found and the fix."""
    fix_criu = f"{install_command()}   (builds CRIU >= {MIN_CRIU_MAJOR}; see {README_SECTION})"
    findings: list[Finding] = []
    euid = os.geteuid()
    findings.append(
        Finding(
            "root",
            euid == 0,
            "running as root" if euid == 0 else f"running as uid {euid}; CRIU needs root",
            None if euid == 0 else "run ccr as root (sudo ccr ...)",
        )
    )
    binary, why = _criu_binary()
    path = Path(binary) if binary else None
    if binary is None or path is None or not (path.is_file() and os.access(path, os.X_OK)):
        detail = why or f"{binary} is not an executable file"
        findings.append(Finding("CRIU binary", False, detail, fix_criu))
    else:
        findings.append(Finding("CRIU binary", True, binary))
        try:
            version = criu_engine.Criu(binary).version()
            major = _major(version)
            ok = major is not None and major >= MIN_CRIU_MAJOR
            findings.append(
                Finding(
                    "CRIU version",
                    ok,
                    f"{version}" + ("" if ok else f" (ccr needs >= {MIN_CRIU_MAJOR})"),
                    None if ok else fix_criu,
                )
            )
        except CcrError as exc:
            findings.append(Finding("CRIU version", False, str(exc), fix_criu))
        works, said = criu_engine.Criu(binary).check()
        findings.append(
            Finding(
                "criu check",
                works,
                said or ("ok" if works else "failed"),
                None
                if works
                else f"run `{binary} check` as root to see why; a kernel too old or "
                f"Debian 12's criu 3.17: {fix_criu}",
            )
        )
    problem = pycriu_problem()
    fix_pycriu = f"{install_command()}   (installs pycriu from CRIU's source)"
    findings.append(
        Finding(
            "pycriu",
            problem is None,
            problem or f"importable from {sys.executable}",
            None if problem is None else fix_pycriu,
        )
    )
    try:
        findings.append(Finding("dumb-init", True, config.init_binary()))
    except CcrError as exc:
        findings.append(
            Finding("dumb-init", False, str(exc), f"{sys.executable} -m pip install dumb-init")
        )
    findings.append(_state_dir_finding())
    return findings


def _state_dir_finding() -> Finding:
    fix = "set CCR_STATE_DIR to a directory you can write (default /var/lib/ccr for root)"
    try:
        state = config.state_dir()
        with tempfile.NamedTemporaryFile(dir=state, prefix=".doctor-"):
            pass
    except (CcrError, OSError) as exc:
        return Finding("state dir writable", False, str(exc), fix)
    return Finding("state dir writable", True, str(state))


def features(binary: str) -> dict[str, bool]:
    """`criu check --feature F` for each of FEATURES."""
    engine = criu_engine.Criu(binary)
    return {name: engine.check(name)[0] for name in FEATURES}


def version_info() -> dict[str, Any]:
    """ccr's and CRIU's versions and CRIU's features (what `ccr version --json` prints)."""
    binary, why = _criu_binary()
    criu: dict[str, Any] = {"binary": binary, "version": None, "works": False, "features": {}}
    if binary is None:
        criu["error"] = why
    else:
        try:
            criu["version"] = criu_engine.Criu(binary).version()
            criu["works"] = criu_engine.Criu(binary).check()[0]
            criu["features"] = features(binary)
        except CcrError as exc:
            criu["error"] = str(exc)
    feats = criu["features"]
    criu["incremental_dumps"] = bool(feats.get("mem_dirty_track"))
    criu["lazy_pages"] = bool(feats.get("uffd") and feats.get("uffd-noncoop"))
    return {
        "version": __version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "pycriu": pycriu_problem() is None,
        "criu": criu,
    }


def require_checkpointing(state_dir: Path) -> None:
    """Raise CriuError (exit 5) unless CRIU >= 4 works and pycriu imports.

    CRIU's version and a passing `criu check` are learned once per binary and kernel
    (criu.NodeFacts in the state dir): a new CRIU or a new kernel is checked again, a
    failure is never cached.
    """
    hint = (
        f"install them with `{install_command()}` ({README_SECTION}; `ccr doctor` says "
        "what is missing), or pass --no-checkpoint-check to run it anyway"
    )
    problem = pycriu_problem()
    if problem is not None:
        raise CriuError(f"cannot checkpoint this step: {problem}; {hint}")
    binary, why = _criu_binary()
    if binary is None or not os.path.exists(binary):
        raise CriuError(f"cannot checkpoint this step: {why or f'no CRIU at {binary}'}; {hint}")
    engine = criu_engine.Criu(binary, facts_file=state_dir / CRIU_FACTS)
    try:
        version = engine.version()
    except CcrError as exc:
        raise CriuError(f"cannot checkpoint this step: {exc}; {hint}") from None
    major = _major(version)
    if major is None or major < MIN_CRIU_MAJOR:
        raise CriuError(
            f"cannot checkpoint this step: CRIU {version} at {binary} is older than "
            f"{MIN_CRIU_MAJOR}; {hint}"
        )
    works, said = engine.check()
    if not works:
        raise CriuError(f"cannot checkpoint this step: `{binary} check` failed ({said}); {hint}")
