"""The node service (`ccr daemon`): real users (ccr-alice, ccr-bob, ...) through it, real CRIU.

The service runs as root from a world-readable copy of this worktree's `ccr/` package (other
users cannot read a checkout under /root), with /opt/ccr's Python (`make setup`), on a socket
and state dir of this test session; each user's `ccr` is that Python with the same copy.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, numbers, wait_for

OPT_PYTHON = Path("/opt/ccr/bin/python")
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
USERS = ("ccr-alice", "ccr-bob", "ccr-carol", "ccr-dave")
COUNTER = (
    "import time\ni = 0\nwhile True:\n    print(i, flush=True)\n    i += 1\n    time.sleep(0.1)\n"
)


def ensure_users() -> None:
    for name in USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)


@dataclass
class Service:
    root: Path  # world-traversable temp dir: package copy, socket, users' homes
    socket: Path
    state: Path
    pkg: Path
    proc: subprocess.Popen[str]

    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "CCR_SOCKET": str(self.socket),
            "PYTHONPATH": str(self.pkg),
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def home(self, user: str) -> Path:
        path = self.root / user
        if not path.exists():
            path.mkdir(mode=0o700)
            info = pwd.getpwnam(user)
            os.chown(path, info.pw_uid, info.pw_gid)
        return path

    def ccr(
        self,
        user: str,
        *args: str,
        check: bool = True,
        cwd: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [RUNUSER, "-u", user, "--", str(OPT_PYTHON), "-m", "ccr", *args],
            cwd=cwd or self.home(user),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{user}: ccr {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def popen(self, user: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [RUNUSER, "-u", user, "--", str(OPT_PYTHON), "-m", "ccr", *args],
            cwd=self.home(user),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def program(self, user: str, name: str = "counter.py") -> Path:
        path = self.home(user) / name
        path.write_text(COUNTER)
        info = pwd.getpwnam(user)
        os.chown(path, info.pw_uid, info.pw_gid)
        return path

    def status(self, user: str, job: int) -> dict:
        return json.loads(self.ccr(user, "status", str(job), "--json").stdout)

    def registry_pids(self) -> list[int]:
        import sqlite3

        db = sqlite3.connect(self.state / "registry.db")
        try:
            rows = db.execute("SELECT init_pid, supervisor_pid FROM steps").fetchall()
        finally:
            db.close()
        return [p for r in rows for p in r if p]


def _uids(pid: int) -> tuple[list[int], list[int], list[int]]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    get = {ln.split(":")[0]: ln.split(":")[1].split() for ln in lines}
    return (
        [int(x) for x in get["Uid"]],
        [int(x) for x in get["Gid"]],
        [int(x) for x in get["Groups"]],
    )


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    if not OPT_PYTHON.exists():
        raise AssertionError("/opt/ccr is missing: run `make setup` (scripts/install-for-all.sh)")
    ensure_users()
    root = Path(tempfile.mkdtemp(prefix="ccr-svc-"))
    root.chmod(0o755)
    pkg = root / "pkg"
    shutil.copytree(REPO / "ccr", pkg / "ccr", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(pkg)], check=True)
    state = root / "state"
    sock = root / "run" / "ccr.sock"
    # The service's fast scratch (its tmpfs container) under root too: tests see its leftovers.
    (root / "fast").mkdir()
    env = {**os.environ, "CCR_STATE_DIR": str(state), "PYTHONPATH": str(pkg)}
    env["CCR_SCRATCH"] = str(root / "fast")
    env.pop("CCR_SOCKET", None)
    proc = subprocess.Popen(
        [str(OPT_PYTHON), "-m", "ccr", "daemon", "--socket", str(sock)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    svc = Service(root, sock, state, pkg, proc)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 30, "the service's socket")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield svc
    finally:
        for pid in svc.registry_pids() if (state / "registry.db").exists() else []:
            try:
                if os.stat(f"/proc/{pid}").st_uid in [pwd.getpwnam(u).pw_uid for u in USERS] or (
                    str(state) in Path(f"/proc/{pid}/environ").read_text(errors="replace")
                ):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _running(svc: Service, user: str, job: int, *options: str) -> Path:
    svc.program(user)
    svc.ccr(user, "run", "--detach", "--job-id", str(job), *options, "--", "python3", "counter.py")
    out = svc.home(user) / f"ccr-{job}.0.out"
    wait_for(lambda: len(numbers(out)) > 3, 30, "output")
    return out


def test_alice_single_node_flow(service: Service) -> None:
    alice = pwd.getpwnam("ccr-alice")
    out = _running(service, "ccr-alice", 74010)
    st = service.status("ccr-alice", 74010)["steps"][0]
    uids, gids, groups = _uids(st["pids"][-1])
    assert uids == [alice.pw_uid] * 4 and gids == [alice.pw_gid] * 4
    assert set(groups) <= set(os.getgrouplist("ccr-alice", alice.pw_gid))
    assert "CapEff:\t0000000000000000" in Path(f"/proc/{st['pids'][-1]}/status").read_text()
    created = json.loads(service.ccr("ccr-alice", "create", "74010", "--json").stdout)
    ckpt = Path(created["path"])
    assert ckpt.stat().st_uid == alice.pw_uid
    assert all(p.stat().st_uid == alice.pw_uid for p in ckpt.rglob("*"))
    assert all(p.stat().st_mode & 0o077 == 0 for p in ckpt.rglob("*") if not p.is_symlink())
    service.ccr("ccr-alice", "cancel", "74010")
    before = numbers(out)
    restored = json.loads(service.ccr("ccr-alice", "restart", "74010", "--json").stdout)
    pid = restored["steps"][0]["pid"]
    uids, gids, _ = _uids(pid)
    assert uids == [alice.pw_uid] * 4 and gids == [alice.pw_gid] * 4
    wait_for(lambda: len(numbers(out)) > len(before) + 3, 30, "restored output")
    assert numbers(out)[len(before)] <= before[-1] + 1  # state continues from the checkpoint
    # vacate, then restart again
    service.ccr("ccr-alice", "checkpoint", "vacate", "74010")
    wait_for(lambda: service.status("ccr-alice", 74010)["steps"][0]["state"] == "vacated", 30)
    service.ccr("ccr-alice", "restart", "74010")
    assert service.status("ccr-alice", 74010)["steps"][0]["state"] == "running"
    service.ccr("ccr-alice", "cancel", "74010")


def test_alice_foreground_run_and_preemption(service: Service) -> None:
    service.program("ccr-alice")
    out = service.home("ccr-alice") / "ccr-74011.0.out"
    proc = service.popen("ccr-alice", "run", "--job-id", "74011", "--", "python3", "counter.py")
    try:
        wait_for(lambda: len(numbers(out)) > 3, 30, "output")
        # preemption, to the user's ccr itself (runuser would end its session)
        client = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        os.kill(client, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 75, err  # checkpointed, terminated: requeue me
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = numbers(out)
    again = service.popen("ccr-alice", "run", "--job-id", "74011", "--", "python3", "counter.py")
    try:
        wait_for(lambda: len(numbers(out)) > len(before) + 3, 30, "resumed output")
        assert numbers(out)[len(before)] == before[-1] + 1
    finally:
        service.ccr("ccr-alice", "cancel", "74011", check=False)
        again.communicate(timeout=60)


def test_bob_cannot_touch_alices_job(service: Service) -> None:
    out = _running(service, "ccr-alice", 74012)
    service.ccr("ccr-alice", "create", "74012")
    ckpt = service.home("ccr-alice") / "74012.ckpt"
    for args in (
        ["create", "74012"],
        ["restart", "74012"],
        ["cancel", "74012"],
        ["status", "74012"],
        ["checkpoint", "disable", "74012"],
        ["run", "--job-id", "74012", "--", "true"],
    ):
        proc = service.ccr("ccr-bob", *args, check=False)
        assert proc.returncode == 9 and proc.stderr.startswith("ccr: error:"), (args, proc.stderr)
    # bob cannot read alice's images either (the kernel's own EACCES), and lists nothing
    proc = service.ccr("ccr-bob", "show", str(ckpt), check=False)
    assert proc.returncode != 0
    assert json.loads(service.ccr("ccr-bob", "list", "--json").stdout)["jobs"] == []
    n = len(numbers(out))
    wait_for(lambda: len(numbers(out)) > n + 2, 30, "alice's job still running")
    assert service.status("ccr-alice", 74012)["steps"][0]["state"] == "running"
    # a copy of alice's checkpoint, readable to bob: its manifest names alice
    copy = service.home("ccr-bob") / "stolen"
    shutil.copytree(ckpt.resolve(), copy / "74012.0.ckpt.1")
    subprocess.run(["chown", "-R", "ccr-bob:", str(copy)], check=True)
    proc = service.ccr("ccr-bob", "restart", str(copy / "74012.0.ckpt.1" / "0"), check=False)
    assert proc.returncode in (7, 9), proc.stderr
    service.ccr("ccr-alice", "cancel", "74012")


def test_forged_manifest_and_symlinked_image_dir(service: Service) -> None:
    _running(service, "ccr-bob", 74013)
    service.ccr("ccr-bob", "create", "74013")
    gen = (service.home("ccr-bob") / "74013.ckpt").resolve() / "0"
    manifest = gen / "manifest.json"
    data = json.loads(manifest.read_text())
    data["uid"] = 0
    manifest.write_text(json.dumps(data))
    proc = service.ccr("ccr-bob", "restart", str(gen), check=False)
    assert proc.returncode == 7, proc.stderr  # the HMAC is the service's: bob cannot sign
    # ImageDir a symlink to a root-owned dir: nothing is written there (EACCES, exit 8)
    target = Path(tempfile.mkdtemp(prefix="ccr-rootonly-"))
    try:
        link = service.home("ccr-bob") / "ckpts"
        link.symlink_to(target)
        proc = service.ccr("ccr-bob", "create", "74013", "--image-dir", str(link), check=False)
        assert proc.returncode in (8, 9), proc.stderr
        assert list(target.iterdir()) == []
        proc = service.ccr("ccr-bob", "create", "74013", "--image-dir", "/etc/cron.d", check=False)
        assert proc.returncode in (8, 9), proc.stderr
        assert not [p for p in Path("/etc/cron.d").iterdir() if "74013" in p.name]
    finally:
        shutil.rmtree(target)
    assert service.status("ccr-bob", 74013)["steps"][0]["state"] == "running"
    service.ccr("ccr-bob", "cancel", "74013")


def _raw(service: Service, payload: bytes, fds: list[int] | None = None) -> bytes:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(service.socket))
    sock.settimeout(40)
    try:
        if fds:
            socket.send_fds(sock, [payload], fds)
        else:
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data
    finally:
        sock.close()


def test_protocol_abuse_keeps_serving(service: Service) -> None:
    frame = lambda body: struct.pack("!I", len(body)) + body  # noqa: E731
    replies = [
        _raw(service, b"\x00\x00"),  # truncated header
        _raw(service, frame(b"not json")),
        _raw(service, struct.pack("!I", 1 << 30)),  # oversized
        _raw(service, frame(json.dumps({"v": 99, "op": "cli", "argv": [], "env": {}}).encode())),
        _raw(
            service, frame(json.dumps({"v": 1, "op": "cli", "argv": ["list"], "env": {}}).encode())
        ),
    ]
    for reply in replies:
        body = json.loads(reply[4:]) if len(reply) > 4 else {}
        assert body.get("op") == "error" and body.get("code") == 2, reply
    # the service still answers
    assert service.ccr("ccr-carol", "list").returncode == 0


def _criu_of(service: Service) -> bool:
    """Whether a descendant of the service runs CRIU now (a dump or restore under way)."""
    todo = [service.proc.pid]
    while todo:
        pid = todo.pop()
        try:
            if pid != service.proc.pid and Path(f"/proc/{pid}/comm").read_text() == "criu\n":
                return True
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return False


def _workers(service: Service) -> set[str]:
    pid = service.proc.pid
    return set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def _kill_client(
    service: Service, proc: subprocess.Popen[str], after: float = 0.0, criu: bool = True
) -> None:
    """SIGKILL the user's ccr itself (runuser's child: killing runuser leaves it running)
    `after` seconds after its request is in flight (criu: its CRIU runs; else: its
    worker was forked), then reap runuser."""
    before = _workers(service)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    client = wait_for(lambda: children.read_text().split(), 30, "the client")[0]
    deadline = time.monotonic() + 60
    # polled without a pause: a small dump takes ~0.1 s
    while not (_criu_of(service) if criu else _workers(service) - before):
        assert proc.poll() is None and time.monotonic() < deadline, "request not seen"
    time.sleep(after)
    try:
        os.kill(int(client), signal.SIGKILL)
    except ProcessLookupError:
        pass  # the request was done first (a restart of a small tree takes ~0.2 s)
    proc.communicate(timeout=60)


def test_client_disconnect_mid_create_rolls_back(service: Service) -> None:
    out = _running(service, "ccr-dave", 74014)
    proc = service.popen("ccr-dave", "create", "74014")
    _kill_client(service, proc)  # the client vanishes mid-dump

    def settled() -> bool:
        st = service.status("ccr-dave", 74014)["steps"][0]
        return st["state"] == "running"

    wait_for(settled, 30, "job running")
    n = len(numbers(out))
    wait_for(lambda: len(numbers(out)) > n + 2, 30, "job still producing")
    stopped = [
        p
        for p in service.status("ccr-dave", 74014)["steps"][0]["pids"]
        if Path(f"/proc/{p}/stat").read_text().split(")")[1].split()[0] == "T"
    ]
    assert stopped == []
    service.ccr("ccr-dave", "create", "74014")  # a later create works
    service.ccr("ccr-dave", "cancel", "74014")


def test_load_four_users_five_requests(service: Service) -> None:
    users = ("ccr-alice", "ccr-bob", "ccr-carol", "ccr-dave")
    jobs = {u: 74020 + i for i, u in enumerate(users)}
    for user, job in jobs.items():
        _running(service, user, job)

    def work(user: str) -> list[int]:
        job = str(jobs[user])
        codes = []
        for args in (["status", job], ["create", job], ["status", job], ["list", "--json"]):
            codes.append(service.ccr(user, *args, check=False).returncode)
        return codes

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, [u for u in users for _ in range(2)]))
    for codes in results:
        assert all(c in (0, 6) for c in codes), codes  # 6: the job's other create held its lock
    seen: dict[str, set[int]] = {}
    for user, job in jobs.items():
        listed = json.loads(service.ccr(user, "list", "--json").stdout)["jobs"]
        seen[user] = {j["job_id"] for j in listed}
        assert job in seen[user] and not seen[user] & (set(jobs.values()) - {job})
        service.ccr(user, "cancel", str(job))
    assert not set.intersection(*seen.values())  # none crosses users


def test_unreachable_service_exit_9(service: Service) -> None:
    env = {**service.env(), "CCR_SOCKET": str(service.root / "nothing.sock")}
    proc = subprocess.run(
        [RUNUSER, "-u", "ccr-alice", "--", str(OPT_PYTHON), "-m", "ccr", "list"],
        env=env,
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    assert proc.returncode == 9
    assert proc.stderr.startswith("ccr: error:") and "ccr daemon" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


API_SCRIPT = """
import json, sys, ccr
from ccr.controller.checkpoint import CheckpointResult
from ccr.controller.restart import RestartResult
from ccr.errors import PermissionDeniedError
job = int(sys.argv[1])
if sys.argv[2] == "alice":
    step = ccr.run(["python3", "counter.py"], job_id=job)
    import time
    time.sleep(1.5)
    made = ccr.create(job)
    assert isinstance(made, CheckpointResult), made
    verified = ccr.verify(made.link)
    ccr.cancel(job)
    back = ccr.restart(job)
    assert isinstance(back, list) and isinstance(back[0], RestartResult), back
    st = ccr.status(job)
    shown = ccr.show(str(made.link))
    print(json.dumps({"step": step, "path": str(made.path), "verified": len(verified),
                      "pid": back[0].pid, "state": st["steps"][0]["state"], "shown": len(shown)}))
else:
    for call in (lambda: ccr.create(job), lambda: ccr.cancel(job), lambda: ccr.status(job)):
        try:
            call()
        except PermissionDeniedError as exc:
            print("refused:", exc)
        else:
            raise SystemExit("not refused")
"""


def test_python_api_as_alice_goes_through_the_service(service: Service) -> None:
    alice = pwd.getpwnam("ccr-alice")
    service.program("ccr-alice")
    script = service.home("ccr-alice") / "api.py"
    script.write_text(API_SCRIPT)
    os.chown(script, alice.pw_uid, alice.pw_gid)
    proc = subprocess.run(
        [RUNUSER, "-u", "ccr-alice", "--", str(OPT_PYTHON), str(script), "77010", "alice"],
        cwd=service.home("ccr-alice"),
        env=service.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    assert done["step"] == "77010.0" and done["state"] == "running" and done["verified"] >= 1
    assert Path(done["path"]).stat().st_uid == alice.pw_uid
    assert _uids(done["pid"])[0] == [alice.pw_uid] * 4  # restored as alice, by the service
    bob = subprocess.run(
        [RUNUSER, "-u", "ccr-bob", "--", str(OPT_PYTHON), "-c", API_SCRIPT, "77010", "bob"],
        cwd="/",
        env=service.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bob.returncode == 0 and bob.stdout.count("refused: job 77010") == 3, bob
    assert service.status("ccr-alice", 77010)["steps"][0]["state"] == "running"
    service.ccr("ccr-alice", "cancel", "77010")


def _alice_counters(service: Service) -> list[int]:
    """Live processes of alice's counter.py run in her home of this service."""
    home = str(service.home("ccr-alice"))
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and b"counter.py" in (entry / "cmdline").read_bytes()
                and os.readlink(entry / "cwd") == home
                and (entry / "stat").read_text().split(")")[1].split()[0] != "Z"
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _scratch_left(service: Service) -> list[Path]:
    containers = [*service.root.glob(".ccr-service-*"), *(service.root / "fast").glob(".ccr-*")]
    return [p for c in containers for p in c.iterdir()]


def test_client_disconnect_mid_restart_restores_or_rolls_back(service: Service) -> None:
    out = _running(service, "ccr-alice", 77011)
    service.ccr("ccr-alice", "create", "77011")
    service.ccr("ccr-alice", "cancel", "77011")
    outcomes = set()
    for delay in (0.0, 0.05, 0.1, 0.15):
        proc = service.popen("ccr-alice", "restart", "77011")
        _kill_client(service, proc, delay, criu=False)  # gone mid-restart: worker SIGTERMed

        def settled() -> str | None:
            state = service.status("ccr-alice", 77011)["steps"][0]["state"]
            return state if state != "vacating" and not _scratch_left(service) else None

        state = wait_for(settled, 30, "restart settled")
        counters = _alice_counters(service)
        if state == "running":  # restored before the disconnect came: exactly one tree
            outcomes.add("restored")
            assert len(counters) == 1, counters
            n = len(numbers(out))
            wait_for(lambda n=n: len(numbers(out)) > n + 2, 30, "restored job producing")
            service.ccr("ccr-alice", "cancel", "77011")
            wait_for(lambda: not _alice_counters(service), 30, "cancelled")
        else:  # rolled back: nothing of it runs
            outcomes.add("rolled back")
            assert counters == [], (state, counters)
    assert _scratch_left(service) == []
    service.ccr("ccr-alice", "restart", "77011")  # and the checkpoint still restores
    assert len(_alice_counters(service)) == 1
    service.ccr("ccr-alice", "cancel", "77011")
    print("outcomes:", sorted(outcomes))


def test_interval_checkpoints_as_alice(service: Service) -> None:
    alice = pwd.getpwnam("ccr-alice")
    out = _running(service, "ccr-alice", 77012, "--checkpoint", "0:01", "--keep", "2")

    def taken() -> int:
        last = service.status("ccr-alice", 77012)["last_checkpoint"]
        return 0 if last is None else int(last["path"].rsplit(".", 1)[1])

    wait_for(lambda: taken() >= 3, 60, "three interval checkpoints")
    home = service.home("ccr-alice")
    gens = [p for p in home.iterdir() if p.name.startswith("77012.0.ckpt.")]
    assert 1 <= len(gens) <= 3, gens  # --keep 2 (and one being published)
    for path in [home / "77012.0.ckpt", *gens]:
        assert path.lstat().st_uid == alice.pw_uid
    for gen in gens:
        assert all(p.stat().st_uid == alice.pw_uid for p in gen.rglob("*"))
        assert all(p.stat().st_mode & 0o077 == 0 for p in gen.rglob("*") if not p.is_symlink())
    init = service.status("ccr-alice", 77012)["steps"][0]["init_pid"]
    os.kill(init, signal.SIGKILL)  # lost: back to the last interval checkpoint
    wait_for(lambda: service.status("ccr-alice", 77012)["steps"][0]["state"] == "failed", 30)
    before = numbers(out)
    service.ccr("ccr-alice", "restart", "77012")
    wait_for(lambda: len(numbers(out)) > len(before) + 5, 30, "restored output")
    after = numbers(out)[len(before) :]
    assert 0 < after[0] <= before[-1] + 1  # from an interval checkpoint's state, not from 0
    assert after == list(range(after[0], after[0] + len(after)))
    service.ccr("ccr-alice", "cancel", "77012")
