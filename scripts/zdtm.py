#!/usr/bin/env python3
"""CRIU's zdtm static tests, under plain CRIU and under ccr, in one run.

Builds the suite from CRIU's source tarball (the one scripts/install-criu.sh keeps in
CCR_CRIU_SRC, /var/cache/ccr/criu-src; fetched with `apt-get source` when missing) in a
directory of its own, then runs each test twice, as test/zdtm.py runs a static test in its
host flavour:

  plain: start the test (`make -n <test>.pid` gives its command line), `criu dump -t PID`
         (the test's own CRIU options from its .desc), `criu restore --restore-detached`,
         SIGTERM the restored test and look for PASS in its .out file;
  ccr:   `ccr run --detach` the same command line, `ccr create --stop` (vacate),
         `ccr restart`, SIGTERM the restored test and look for PASS.

Only the tests of scripts/zdtm-safe.txt (or a subset of it named on the command line) are
ever built or run: the others change the host (one renames it, one remounts /proc/sys
read-only).  Prints a line per test, both pass counts and the tests whose results differ.
Exit status: 0 when every test that passes under plain CRIU passes under ccr too, 1 when
some do not, 2 on a usage or set-up error.

Usage: scripts/zdtm.py [--json FILE] [--keep] [TEST ...]      (as root)
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccr.engines.criu import log_reason  # noqa: E402 - after the sys.path fix-up above
from ccr.engines.process import reap_exited_children  # noqa: E402

SAFE_LIST = REPO / "scripts" / "zdtm-safe.txt"
SRC_CACHE = Path(os.environ.get("CCR_CRIU_SRC", "/var/cache/ccr/criu-src"))
BUILD_ROOT = Path(os.environ.get("CCR_ZDTM_DIR", "/var/cache/ccr/zdtm"))
CRIU = os.environ.get("CCR_CRIU", "/usr/local/sbin/criu")
JOB_ID = "9650"  # every ccr run has a state dir of its own, so one id serves them all

# What test/zdtm.py sets for a static test in the host flavour (noop freezer).
BASE_ENV = {"TMPDIR": "/tmp", "ZDTM_THREAD_BOMB": "5"}
# A test without the `suid` flag drops to these ids (numbers as in zdtm.py).
USER_ENV = {"ZDTM_UID": "18943", "ZDTM_GID": "58467", "ZDTM_GROUPS": "27495 48244"}


@dataclass
class Result:
    test: str
    plain: str  # "PASS" or what went wrong
    ccr: str


def log(msg: str) -> None:
    print(f"zdtm: {msg}", file=sys.stderr, flush=True)


# -- building -------------------------------------------------------------------------------


def tarball() -> Path:
    found = sorted(glob.glob(str(SRC_CACHE / "criu_*.orig.tar.*")))
    if found:
        return Path(found[-1])
    # The same source install-criu.sh builds CRIU from (it keeps it only when it builds).
    SRC_CACHE.mkdir(parents=True, exist_ok=True)
    src_list = Path("/etc/apt/sources.list.d/ccr-criu-src.list")
    if not src_list.exists():
        src_list.write_text(
            "deb-src http://deb.debian.org/debian trixie main\n"
            "deb-src http://deb.debian.org/debian sid main\n"
        )
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "source", "--download-only", "criu"], cwd=SRC_CACHE, check=False)
    found = sorted(glob.glob(str(SRC_CACHE / "criu_*.orig.tar.*")))
    if not found:
        raise SystemExit("zdtm: could not get CRIU's source tarball (apt-get source criu)")
    return Path(found[-1])


def build(tests: list[str]) -> Path:
    """Extract the tarball once, build the zdtm library and the named tests; return the
    static directory."""
    tar = tarball()
    src = BUILD_ROOT / tar.name.split(".orig.tar")[0]
    if not (src / "test" / "zdtm" / "Makefile.inc").exists():
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(tar), "-C", str(src), "--strip-components=1"], check=True)
    zdtm = src / "test" / "zdtm"
    jobs = f"-j{os.cpu_count() or 2}"
    for cmd in (["make", "-s", "-C", str(zdtm / "lib"), jobs], ["make", "-s", "-k", jobs, *tests]):
        proc = subprocess.run(
            cmd, cwd=zdtm / "static", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if proc.returncode != 0:
            log(f"{' '.join(cmd[:4])} ...: {proc.stderr.strip()[-1000:]}")
    static = zdtm / "static"
    # Tests that drop to an unprivileged user write their .pid and .out files here.
    static.chmod(static.stat().st_mode | 0o222)
    return static


# -- one test -------------------------------------------------------------------------------


def desc(static: Path, test: str) -> dict:
    path = static / f"{test}.desc"
    if not path.exists():
        return {}
    try:
        value = ast.literal_eval(path.read_text())
    except (ValueError, SyntaxError):
        return {}
    return value if isinstance(value, dict) else {}


def command(static: Path, test: str) -> list[str]:
    """The test's command line, from its Makefile rule (as `make <test>.pid` would run)."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-s", "-n", f"{test}.pid"],
        cwd=static,
        capture_output=True,
        text=True,
    ).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith(f"./{test} ")]
    if not lines:
        raise RuntimeError(f"no command line for {test} (not built?)")
    return lines[-1].split()


def cleanout(static: Path, test: str) -> None:
    subprocess.run(
        ["make", "--no-print-directory", "-s", f"{test}.cleanout"],
        cwd=static,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for leftover in static.glob(".zdtm.pidfile.*"):
        leftover.unlink(missing_ok=True)


CAP_SYS_RESOURCE = 24


def can_dump_other_users() -> bool:
    """CRIU reads a task's rlimits with prlimit(), which for a task of another user needs
    CAP_SYS_RESOURCE; some sandboxes give root every capability but that one."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def test_env(d: dict) -> dict[str, str]:
    env = {**os.environ, **BASE_ENV}
    if "suid" not in d.get("flags", "").split() and can_dump_other_users():
        env.update(USER_ENV)
    return env


def become_subreaper() -> None:
    """Orphaned tests (a static test daemonizes; a restored tree is detached) become our
    children, so that we reap them: a zombie left to a PID 1 that does not reap keeps its
    PID, and a later restore of that PID fails (`Can't fork ...: File exists`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise SystemExit("zdtm: cannot become a child subreaper")


def wait_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.05)
    raise RuntimeError(f"no {path.name} after {timeout:g}s")


def alive(pid: int) -> bool:
    reap_exited_children()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_hard(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_and_check(static: Path, test: str, pid: int, timeout: float) -> str:
    """SIGTERM the (restored) test; PASS if it says so in its .out file."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "restored test is gone"
    if not wait_gone(pid, timeout):
        kill_hard(pid)
        return "did not exit on SIGTERM"
    out = static / f"{test}.out"
    try:
        words = out.read_text(errors="replace").split()
    except OSError:
        words = []
    if "PASS" in words:
        return "PASS"
    tail = ""
    for name in (f"{test}.out", f"{test}.out.inprogress"):
        try:
            tail = (static / name).read_text(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            continue
    return f"no PASS ({tail[:160]})" if tail else "no PASS"


def run_plain(static: Path, test: str, work: Path) -> str:
    d = desc(static, test)
    timeout = float(d.get("timeout") or 30)
    cleanout(static, test)
    cmd = command(static, test)
    env = test_env(d)
    started = subprocess.run(cmd, cwd=static, env=env, capture_output=True, timeout=timeout)
    if started.returncode != 0:
        return f"start failed ({started.returncode})"
    pidfile = static / f"{test}.pid"
    pid = int(wait_file(pidfile, timeout))
    images = work / "plain" / test
    images.mkdir(parents=True)
    opts = d.get("opts", "").split()
    criu = [CRIU, "--images-dir", str(images), "--verbosity=4"]
    dump = subprocess.run(
        [
            *criu,
            "dump",
            "--log-file",
            "dump.log",
            "--tree",
            str(pid),
            "--timeout",
            "10",
            *opts,
            *d.get("dopts", "").split(),
        ],
        capture_output=True,
        timeout=120,
    )
    if dump.returncode != 0:
        kill_hard(pid)
        wait_gone(pid, 10)
        return f"dump: {log_reason(images / 'dump.log')[:200] or dump.returncode}"
    if not wait_gone(pid, timeout):
        kill_hard(pid)
        return "dumped test did not die"
    pidfile.unlink(missing_ok=True)
    restore = subprocess.run(
        [
            *criu,
            "restore",
            "--log-file",
            "restore.log",
            "--restore-detached",
            "--pidfile",
            str(pidfile),
            *opts,
            *d.get("ropts", "").split(),
        ],
        capture_output=True,
        timeout=120,
    )
    if restore.returncode != 0:
        return f"restore: {log_reason(images / 'restore.log')[:200] or restore.returncode}"
    return stop_and_check(static, test, int(wait_file(pidfile, 10)), timeout)


def ccr_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ccr", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=180,
    )


def ccr_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    return (lines[-1] if lines else f"exit {proc.returncode}").removeprefix("ccr: error: ")[:200]


def host_pid(pids: list[int], ns_pid: int) -> int | None:
    """The host PID of the process that is ns_pid inside the step's PID namespace."""
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                    return pid
        except OSError:
            continue
    return None


def run_ccr(static: Path, test: str, work: Path) -> str:
    d = desc(static, test)
    timeout = float(d.get("timeout") or 30)
    cleanout(static, test)
    cmd = command(static, test)
    home = work / "ccr" / test
    home.mkdir(parents=True)
    env = {
        **test_env(d),
        "CCR_STATE_DIR": str(home / "state"),
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
    }
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_"))]:
        del env[var]
    # A static test daemonizes (its starter exits once the test is ready), and a step ends
    # with its command: a shell stays as the command until the test itself has exited.
    pidfile = static / f"{test}.pid"
    shell = (
        f"{' '.join(cmd)} || exit 1; pid=$(cat {pidfile.name}) || exit 1; "
        'while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done'
    )
    step = f"{JOB_ID}.0"
    run = ccr_cli(
        [
            "run",
            "--detach",
            "--job-id",
            JOB_ID,
            "--checkpoint-dir",
            str(home),
            "--output",
            str(home / "step.out"),
            "--",
            "sh",
            "-c",
            shell,
        ],
        env,
        static,
    )
    if run.returncode != 0:
        return f"run: {ccr_error(run)}"
    try:
        ns_pid = int(wait_file(pidfile, timeout))
        create = ccr_cli(["create", step, "--stop", "--max-wait", "60"], env, static)
        if create.returncode != 0:
            return f"create: {ccr_error(create)}"
        pidfile.unlink(missing_ok=True)
        restart = ccr_cli(["restart", step, "--max-wait", "60"], env, static)
        if restart.returncode != 0:
            return f"restart: {ccr_error(restart)}"
        status = ccr_cli(["status", JOB_ID, "--json"], env, static)
        pids = json.loads(status.stdout)["steps"][0]["pids"] if status.returncode == 0 else []
        pid = host_pid(pids, ns_pid)
        if pid is None:
            return "restored test not found in the step"
        return stop_and_check(static, test, pid, timeout)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        return str(exc)[:200]
    finally:
        # Whatever happened, nothing of this step outlives it (cancel kills its tree).
        ccr_cli(["cancel", step], env, static)


def run_one(static: Path, test: str, work: Path, only: str | None) -> Result:
    results = {}
    for kind, runner in (("plain", run_plain), ("ccr", run_ccr)):
        if only and kind != only:
            results[kind] = "-"
            continue
        try:
            results[kind] = runner(static, test, work)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, OSError) as exc:
            results[kind] = f"error: {exc}"[:200]
        finally:
            cleanout(static, test)
    return Result(test, results["plain"], results["ccr"])


# -- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*", help="tests of the safe list (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", choices=("plain", "ccr"), help="run one side only")
    parser.add_argument("--keep", action="store_true", help="keep images and ccr state")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("zdtm: error: run as root (CRIU)", file=sys.stderr)
        return 2
    safe = [ln.strip() for ln in SAFE_LIST.read_text().splitlines() if ln.strip()]
    unsafe = [t for t in args.tests if t not in safe]
    if unsafe:
        print(f"zdtm: error: not in {SAFE_LIST.name}: {' '.join(unsafe)}", file=sys.stderr)
        return 2
    tests = args.tests or safe
    static = build(tests)
    become_subreaper()
    if not can_dump_other_users():
        log("no CAP_SYS_RESOURCE: tests run as root (CRIU cannot dump another user's task)")
    work = Path(tempfile.mkdtemp(prefix="ccr-zdtm-", dir=BUILD_ROOT))
    results = []
    started = time.monotonic()
    try:
        for test in tests:
            if not (static / test).exists():
                results.append(Result(test, "not built", "not built"))
            else:
                results.append(run_one(static, test, work, args.only))
            r = results[-1]
            print(f"{r.test:40} plain={r.plain:10} ccr={r.ccr}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    plain_ok = [r.test for r in results if r.plain == "PASS"]
    ccr_ok = [r.test for r in results if r.ccr == "PASS"]
    differ = [r for r in results if (r.plain == "PASS") != (r.ccr == "PASS")]
    print(f"plain CRIU: {len(plain_ok)} of {len(results)} pass")
    print(f"ccr:        {len(ccr_ok)} of {len(results)} pass")
    print(
        f"differ ({len(differ)}):"
        + "".join(f"\n  {r.test}: plain={r.plain} ccr={r.ccr}" for r in differ)
    )
    print(f"({time.monotonic() - started:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return 1 if any(r.plain == "PASS" and r.ccr != "PASS" for r in differ) else 0


if __name__ == "__main__":
    sys.exit(main())
