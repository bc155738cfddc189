"""What ccr asks of CRIU (CriuOptions), MaxWait as one Deadline, errors classified by errno,
the one exit-code table, and configuration read only in config.py (pure logic, no CRIU)."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import socket
import struct
import time
from pathlib import Path

import pytest

from ccr import errors
from ccr.deadline import NO_DEADLINE, Deadline
from ccr.engines import criu as criu_engine
from ccr.engines import criu_wire, image_fixes
from ccr.engines.criu import Criu, CriuOptions, criu_options
from ccr.errors import CriuError, MaxWaitExceeded, StorageError, exit_code_for
from ccr.locking import exclusive_lock

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


# --- CriuOptions: the whole of what CRIU is asked -----------------------------------------


def test_dump_options_are_one_value() -> None:
    opts = criu_options(
        "dump", pid=4242, final_state="stopped", tcp_established=True, network_lock="skip",
        notify=True,
    )  # fmt: skip
    assert opts == CriuOptions(
        action="dump",
        pid=4242,
        leave_running=False,
        leave_stopped=True,
        file_locks=True,
        tcp_established=True,
        network_lock="skip",
        auto_ext_mnt=True,
        ghost_limit=criu_engine.GHOST_LIMIT,
        root=None,
        rst_sibling=False,
        notify_scripts=True,
        log_file="dump.log",
        log_level=4,
    )
    assert opts.rpc_fields(7, 8) == {
        "images_dir_fd": 7,
        "work_dir_fd": 8,
        "log_file": "dump.log",
        "log_level": 4,
        "notify_scripts": True,
        "file_locks": True,
        "tcp_established": True,
        "auto_ext_mnt": True,
        "network_lock": 3,  # rpc.proto's SKIP
        "pid": 4242,
        "leave_running": False,
        "leave_stopped": True,
        "ghost_limit": 1 << 30,
    }
    assert opts.request(7, 8) == _pycriu_request(opts, 7, 8)


def test_restore_options_are_one_value() -> None:
    opts = criu_options("restore", tcp_established=False)
    assert opts == CriuOptions(
        action="restore",
        file_locks=True,
        auto_ext_mnt=True,
        root="/",
        rst_sibling=True,
        log_file="restore.log",
    )
    assert opts.rpc_fields(3, 4) == {
        "images_dir_fd": 3,
        "work_dir_fd": 4,
        "log_file": "restore.log",
        "log_level": 4,
        "notify_scripts": False,
        "file_locks": True,
        "tcp_established": False,
        "auto_ext_mnt": True,
        "root": "/",
        "rst_sibling": True,
    }
    assert opts.request(3, 4) == _pycriu_request(opts, 3, 4)


def _pycriu_request(opts: CriuOptions, images_fd: int, work_fd: int) -> bytes:
    """The same request, built with pycriu's generated protobufs."""
    rpc = pytest.importorskip("pycriu.rpc_pb2")
    req = rpc.criu_req()
    req.type = rpc.DUMP if opts.action == "dump" else rpc.RESTORE
    for name, value in opts.rpc_fields(images_fd, work_fd).items():
        setattr(req.opts, name, value)
    return bytes(req.SerializeToString())


@pytest.mark.parametrize(
    ("lock", "tcp", "final"),
    [(None, False, "running"), ("nftables", True, "killed"), ("iptables", True, "stopped")],
)
def test_requests_match_pycriu_byte_for_byte(lock: str | None, tcp: bool, final: str) -> None:
    for opts in (
        criu_options("dump", pid=2**31 - 1, final_state=final, tcp_established=tcp,
                     network_lock=lock, notify=tcp),
        criu_options("restore", tcp_established=tcp, network_lock=lock),
        dataclasses.replace(criu_options("dump", pid=1), unprivileged=True),  # the service's
    ):  # fmt: skip
        assert opts.request(1000, 0) == _pycriu_request(opts, 1000, 0)
    rpc = pytest.importorskip("pycriu.rpc_pb2")
    for ok in (True, False):
        ack = rpc.criu_req(type=rpc.NOTIFY, notify_success=ok)
        assert criu_wire.encode_req(criu_wire.NOTIFY, notify_success=ok) == ack.SerializeToString()


def test_responses_decode_as_pycriu_reads_them() -> None:
    rpc = pytest.importorskip("pycriu.rpc_pb2")
    ok = rpc.criu_resp(type=rpc.RESTORE, success=True)
    ok.restore.pid = 123456
    assert criu_wire.decode_resp(ok.SerializeToString()) == criu_wire.Response(
        type=criu_wire.RESTORE, success=True, restore_pid=123456
    )
    note = rpc.criu_resp(type=rpc.NOTIFY, success=True)
    note.notify.script, note.notify.pid = "post-dump", 77
    got = criu_wire.decode_resp(note.SerializeToString())
    assert (got.type, got.notify_script, got.notify_pid) == (criu_wire.NOTIFY, "post-dump", 77)
    failed = rpc.criu_resp(type=rpc.DUMP, success=False, cr_errno=-3, cr_errmsg="nope")
    failed.dump.restored = False
    failed.version.major_number = 4  # fields ccr does not read are skipped
    failed.version.minor_number = 2
    got = criu_wire.decode_resp(failed.SerializeToString())
    assert (got.success, got.cr_errno, got.cr_errmsg) == (False, -3, "nope")
    for bad in (b"", b"\x08", b"\x08\x01\x12\x05ab"):
        with pytest.raises(ValueError):
            criu_wire.decode_resp(bad)


def test_dump_stats_decode_as_pycriu_reads_them(tmp_path: Path) -> None:
    stats_pb2 = pytest.importorskip("pycriu.images.stats_pb2")
    entry = stats_pb2.stats_entry()
    for n, name in enumerate(("freezing_time", "frozen_time", "memdump_time", "memwrite_time")):
        setattr(entry.dump, name, 1000 * (n + 1))
    entry.dump.pages_scanned, entry.dump.pages_written = 2**40, 18137
    entry.dump.irmap_resolve = 5  # counters ccr does not read
    entry.dump.pages_skipped_parent = entry.dump.pages_lazy = 0
    body = entry.SerializeToString()
    image = tmp_path / "stats-dump"
    # IMG_SERVICE magic, STATS magic, then the entry's size and the entry (images.py).
    image.write_bytes(
        struct.pack("<III", 0x55105940, 1460220678, len(body)) + body
    )  # fmt: skip
    stats = criu_engine.read_dump_stats(image)
    assert (stats.freezing_time, stats.frozen_time) == (0.001, 0.002)
    assert (stats.memdump_time, stats.memwrite_time) == (0.003, 0.004)
    assert (stats.pages_scanned, stats.pages_written) == (2**40, 18137)
    image.write_bytes(b"\x40\x59\x10\x55garbage")
    assert criu_engine.read_dump_stats(image).frozen_time == 0.0  # informative: never fatal


@pytest.mark.parametrize(
    "kwargs",
    [
        {"action": "pre-dump", "pid": 1},
        {"action": "dump"},  # no pid
        {"action": "dump", "pid": 1, "final_state": "frozen"},
        {"action": "dump", "pid": 1, "network_lock": "ebpf"},
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        criu_options(**kwargs)  # type: ignore[arg-type]


def test_rpc_path_loads_no_protobuf() -> None:
    """A dump or restore request needs neither pycriu nor google.protobuf (~30 ms)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ccr.engines import criu\n"
        "criu.criu_options('dump', pid=1).request(0, 0)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pycriu', 'google'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "[]"


# --- Deadline: MaxWait as one value -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_deadline_counts_down_and_names_the_users_limit() -> None:
    clock = Clock()
    deadline = Deadline.after(5, clock=clock)
    assert deadline.remaining() == 5 and not deadline.expired()
    clock.now += 4.5
    assert deadline.remaining() == pytest.approx(0.5)
    clock.now += 1
    assert deadline.remaining() == 0 and deadline.expired()
    assert deadline.timeout() == pytest.approx(0.001)
    with pytest.raises(MaxWaitExceeded, match=r"^CRIU dump did not finish within MaxWait=5s$"):
        deadline.check("CRIU dump")


def test_no_deadline() -> None:
    assert NO_DEADLINE.remaining() is None and NO_DEADLINE.timeout() is None
    assert not NO_DEADLINE.expired() and not NO_DEADLINE.bounded
    NO_DEADLINE.check("anything")
    assert Deadline.after(None) == NO_DEADLINE


def test_criu_timeout_says_maxwait_not_the_seconds_left() -> None:
    """CRIU's socket timing out, late in the MaxWait, names the user's MaxWait."""
    deadline = Deadline.after(0.3)
    time.sleep(0.15)  # half of it spent before CRIU was asked (the lock, the GPU, ...)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with pytest.raises(MaxWaitExceeded) as info:
            Criu("/nonexistent")._receive(ours, deadline, None, "dump", Path("/nonexistent"))  # type: ignore[arg-type]
    finally:
        ours.close()
        theirs.close()
    assert str(info.value) == "CRIU dump did not finish within MaxWait=0.3s"


def test_lock_timeout_says_maxwait(tmp_path: Path) -> None:
    lock = tmp_path / "job.lock"
    with exclusive_lock(lock, NO_DEADLINE, "held"):
        with pytest.raises(MaxWaitExceeded, match=r"^another checkpoint after MaxWait=0.05s$"):
            with exclusive_lock(lock, Deadline.after(0.05), "another checkpoint"):
                pass


# --- errors by errno ----------------------------------------------------------------------


def _log(tmp_path: Path, line: str) -> Path:
    log = tmp_path / "dump.log"
    log.write_text(
        "(00.001) Error (criu/util.c:1): RLIMIT_NOFILE bla\n"
        f"(00.002) Error (criu/page-xfer.c:90): {line}\n"
    )
    return log


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_in_criu_is_a_storage_error(tmp_path: Path, code: int) -> None:
    log = _log(tmp_path, f"Can't write pages: {os.strerror(code)}")
    err = criu_engine.failure("dump", "Can't write pages", log, 0)
    assert isinstance(err, StorageError) and err.errno == code
    assert exit_code_for(err) == 8 and str(log) in str(err)


def test_full_disk_by_criu_errno(tmp_path: Path) -> None:
    err = criu_engine.failure("dump", "x", _log(tmp_path, "something"), errno.ENOSPC)
    assert isinstance(err, StorageError) and err.errno == errno.ENOSPC


def test_other_criu_failure_stays_criu_error(tmp_path: Path) -> None:
    err = criu_engine.failure("dump", "x", _log(tmp_path, "Can't attach: No such process"), 0)
    assert type(err) is CriuError and exit_code_for(err) == 5


def test_storage_error_from_oserror_keeps_errno(tmp_path: Path) -> None:
    from ccr.storage.imageset import storage_error

    err = storage_error(tmp_path, OSError(errno.ENOSPC, "No space left on device"), "dumping")
    assert err.errno == errno.ENOSPC and "no space left" in str(err)


def test_no_full_disk_is_told_by_its_message() -> None:
    for path in (ROOT / "ccr").rglob("*.py"):
        assert "No space left" not in path.read_text(), path


# --- one exit-code table ------------------------------------------------------------------


def test_readme_exit_codes_are_the_error_classes() -> None:
    section = README.split("### Exit codes", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| ([0-9, ]+) \| (.+) \|$", section, re.M)
    documented = {int(c) for codes, _ in rows for c in codes.split(",")}
    classes = {cls.exit_code for cls in errors.ERROR_CLASSES}
    assert classes <= documented, classes - documented
    # The rest are the success code, the vacate code and the signals' 128 + n.
    assert documented - classes == {0, errors.EXIT_VACATED, 130, 143}


def test_no_exit_code_is_hard_coded() -> None:
    """Exit codes come from the error classes (or errors.EXIT_*), never a bare number."""
    exits = re.compile(r"(_exit|sys\.exit|Exit|\"code\":)\s*\(?\s*([2-9]|[1-9][0-9])\b")
    # A command's return value is its exit code in the CLI and the controller.
    returns = re.compile(r"\breturn ([3-9]|10|70|75)$")
    for path in (ROOT / "ccr").rglob("*.py"):
        rel = path.relative_to(ROOT / "ccr").as_posix()
        if rel == "errors.py":
            continue
        commands = rel == "cli.py" or rel.startswith(("controller/", "service/"))
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not exits.search(line), f"ccr/{rel}:{n}: {line.strip()}"
            assert not (commands and returns.search(line.strip())), f"ccr/{rel}:{n}: {line}"


# --- configuration read only in config.py -------------------------------------------------

# Where ccr touches the environment other than to read a setting, and why.
ENV_ELSEWHERE = {
    # The step starts with the environment of the user who launched it.
    "controller/run.py": ("env = dict(os.environ)",),
    # srun's environment: the caller's, less its own step's variables.
    "engines/slurm_cli.py": ("for k, v in os.environ.items() if not k.startswith(",),
    # The node service's client sends its caller's whole environment to the service...
    "service/client.py": ('"env": dict(os.environ)',),
    # ... and the service builds each worker's from it and its own settings, and passes
    # its private scratch containers down to them (ccr's own variable, no user setting).
    "service/server.py": ("os.environ",),
    "identity.py": ("os.environ.get(PRIVATE_SCRATCH_ENV",),
}


def test_environment_is_read_only_in_config() -> None:
    for path in sorted((ROOT / "ccr").rglob("*.py")):
        rel = path.relative_to(ROOT / "ccr").as_posix()
        if rel == "config.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"os\.environ|getenv|environ\.get", line):
                allowed = ENV_ELSEWHERE.get(rel, ())
                assert any(a in line for a in allowed), f"ccr/{rel}:{n}: {line.strip()}"


def test_every_setting_is_documented() -> None:
    names = set(re.findall(r"\bCCR_[A-Z_]+\b", (ROOT / "ccr" / "config.py").read_text()))
    assert {"CCR_INIT", "CCR_SCRATCH", "CCR_DEBUG", "CCR_COMPRESS"} <= names
    missing = sorted(n for n in names if f"`{n}" not in README)
    assert not missing, f"not in README: {missing}"


@pytest.mark.parametrize(
    "kinds, needed",
    [
        (["REG", "PIPE", "EVENTFD"], False),
        (["REG", "UNIXSK"], True),
        (["TIMERFD"], True),
        ([], False),
    ],
)
def test_image_fixes_read_files_img_without_pycriu(
    tmp_path: Path, kinds: list[str], needed: bool
) -> None:
    """may_need_fixes reads each file_entry's type as pycriu would write it; a restore
    decodes images with pycriu (60-100 ms) only when a fix may apply."""
    images = pytest.importorskip("pycriu.images")
    entries: list[dict[str, object]] = []
    for n, kind in enumerate(kinds):
        entry: dict[str, object] = {"type": kind, "id": n + 1}
        if kind == "REG":
            entry["reg"] = {"id": n + 1, "flags": 0, "pos": 0, "fown": _FOWN, "name": "/x"}
        elif kind == "UNIXSK":
            entry["usk"] = {
                "id": n + 1, "ino": 9, "type": 1, "state": 7, "flags": 0, "backlog": 0,
                "peer": 0, "fown": _FOWN, "uflags": 0, "name": "", "opts": {
                    "so_sndbuf": 1, "so_rcvbuf": 1, "so_snd_tmo_sec": 0,
                    "so_snd_tmo_usec": 0, "so_rcv_tmo_sec": 0, "so_rcv_tmo_usec": 0,
                },
            }  # fmt: skip
        elif kind == "TIMERFD":
            entry["tfd"] = {
                "id": n + 1, "flags": 0, "fown": _FOWN, "clockid": 1, "ticks": 0,
                "settime_flags": 0, "vsec": 0, "vnsec": 0, "isec": 1, "insec": 0,
            }  # fmt: skip
        elif kind == "PIPE":
            entry["pipe"] = {"id": n + 1, "pipe_id": 7, "flags": 0, "fown": _FOWN}
        elif kind == "EVENTFD":
            entry["efd"] = {"id": n + 1, "flags": 0, "fown": _FOWN, "counter": 0}
        entries.append(entry)
    with (tmp_path / "files.img").open("wb") as fh:
        images.dump({"magic": "FILES", "entries": entries}, fh)
    assert image_fixes.may_need_fixes(tmp_path) is needed
    (tmp_path / "files.img").write_bytes(b"\x19\x43\x56\x54garbage")
    assert image_fixes.may_need_fixes(tmp_path)  # not understood: the full decode decides
    (tmp_path / "files.img").unlink()
    (tmp_path / "timerfd.img").write_bytes(b"")
    assert image_fixes.may_need_fixes(tmp_path)  # older CRIU's own image


_FOWN = {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}


def _mount(mnt_id: int, source: str, root: str, ext_key: str = "") -> dict[str, object]:
    entry: dict[str, object] = {
        "fstype": 5, "mnt_id": mnt_id, "root_dev": 1, "parent_mnt_id": 1, "flags": 0,
        "root": root, "mountpoint": f"./m{mnt_id}", "source": source, "options": "",
    }  # fmt: skip
    if ext_key:
        entry["ext_key"] = ext_key
    return entry


@pytest.mark.parametrize(
    "mounts, all_there",
    [
        ([_mount(2, "tmpfs", "/"), _mount(3, "/", "/", ext_key="/")], True),
        ([_mount(3, "/ccr-no-such-path-9f3", "/", ext_key="/x")], False),
        ([_mount(2, "tmpfs", "/")], True),
    ],
)
def test_mount_check_reads_mountpoints_without_pycriu(
    tmp_path: Path, mounts: list[dict[str, object]], all_there: bool
) -> None:
    """A restore asks whether every external mount is still on the node without pycriu;
    a gone one (or an image not understood) leaves it to the full decode."""
    images = pytest.importorskip("pycriu.images")
    with (tmp_path / "mountpoints-12.img").open("wb") as fh:
        images.dump({"magic": "MNTS", "entries": mounts}, fh)
    assert criu_engine._no_mount_gone(tmp_path / "mountpoints-12.img") is all_there
    if not all_there:  # the full decode agrees: the mount is left out of a view
        view = criu_engine.without_gone_mounts(tmp_path)
        assert view != tmp_path
        criu_engine.drop_view(view, tmp_path)


def test_listening_ports_need_pycriu_only_with_inet_sockets(tmp_path: Path) -> None:
    images = pytest.importorskip("pycriu.images")
    fown = {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}
    pipe = {"type": "PIPE", "id": 1, "pipe": {"id": 1, "pipe_id": 7, "flags": 0, "fown": fown}}
    with (tmp_path / "files.img").open("wb") as fh:
        images.dump({"magic": "FILES", "entries": [pipe]}, fh)
    assert criu_engine.tcp_listen_ports(tmp_path) == set()
    isk = {
        "id": 2, "ino": 5, "family": 2, "type": 1, "proto": 6, "state": 10, "src_port": 4711,
        "dst_port": 0, "flags": 0, "backlog": 8, "src_addr": [0], "dst_addr": [0],
        "fown": fown, "opts": {
            "so_sndbuf": 1, "so_rcvbuf": 1, "so_snd_tmo_sec": 0, "so_snd_tmo_usec": 0,
            "so_rcv_tmo_sec": 0, "so_rcv_tmo_usec": 0,
        },
    }  # fmt: skip
    with (tmp_path / "files.img").open("wb") as fh:
        images.dump(
            {"magic": "FILES", "entries": [pipe, {"type": "INETSK", "id": 2, "isk": isk}]}, fh
        )
    assert criu_engine.tcp_listen_ports(tmp_path) == {4711}
