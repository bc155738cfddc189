"""The client side: a `ccr` of a user other than root runs each command in the node service.

The client passes its argv, its environment (the job's, never ccr's own settings: the
service keeps its own) and, as file descriptors, its working directory and stdin, stdout and
stderr; the service runs the very same command line with those as its stdio, so output
(text, --json, progress bars on a terminal), errors and exit codes are what ccr in-process
gives.  SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 are forwarded as they come.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

from ccr.errors import PermissionDeniedError
from ccr.service import protocol

DEFAULT_SOCKET = "/run/ccr/ccr.sock"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

# Commands that never need the service (and must work when it is down).
LOCAL_FIRST = {"--version", "--help", "-h", "--install-completion", "--show-completion", "daemon"}


def socket_path() -> Path:
    """`CCR_SOCKET` (`%n` = this node's name, as in CCR_STATE_DIR: nodes that share one
    /run, like the mini-cluster's, each have their own service), else /run/ccr/ccr.sock."""
    from ccr.config import node_name, service_socket

    return Path((service_socket() or DEFAULT_SOCKET).replace("%n", node_name()))


class ServiceUnavailable(PermissionDeniedError):
    """A user other than root without a reachable node service (exit 9)."""


def connect(path: Path | None = None) -> socket.socket:
    path = path or socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ServiceUnavailable(
            f"the ccr node service is not reachable at {path} ({exc.strerror}); "
            "as root, start it with `ccr daemon` (or `systemctl start ccr-daemon`)"
        ) from None
    _, uid, _ = protocol.peer_credentials(sock)
    if uid != 0:
        sock.close()
        raise ServiceUnavailable(f"{path} is served by uid {uid}, not by root: not a ccr service")
    return sock


def wants_service(argv: list[str]) -> bool:
    """Whether this command line goes to the service: always for a user other than root
    (but --help, --version and bare `ccr`), for root only when CCR_SOCKET names a live one."""
    head = argv[: argv.index("--")] if "--" in argv else argv
    if not argv or argv[0] in LOCAL_FIRST or "--help" in head:
        return False
    if os.geteuid() != 0:
        return True
    from ccr.config import service_socket

    if not service_socket():
        return False
    try:
        connect(socket_path()).close()
    except ServiceUnavailable:
        return False
    return True


def call(argv: list[str], stdio: tuple[int, int, int] = (0, 1, 2)) -> int:
    """Run argv in the service with stdio as its stdin, stdout and stderr; return its exit
    code.  Signals are forwarded only from the main thread (the only one Python lets set
    handlers: the Python API may be called from any)."""
    sock = connect()
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        protocol.send(sock, {"op": "cli", "argv": argv, "env": dict(os.environ)}, [cwd, *stdio])
    finally:
        os.close(cwd)

    def forward(signum: int, _frame: object) -> None:
        try:
            protocol.send(sock, {"op": "signal", "signum": signum})
        except OSError:
            pass

    main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, forward) for sig in FORWARDED} if main else {}
    try:
        while True:
            try:
                message, _ = protocol.recv(sock)
            except protocol.Disconnected:
                print("ccr: error: the node service ended the request", file=sys.stderr)
                return 1
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            if message.get("op") == "exit":
                return int(message.get("code", 1))
            if message.get("op") == "error":
                print(f"ccr: error: {message.get('message')}", file=sys.stderr)
                return int(message.get("code", 1))
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        sock.close()


def call_captured(argv: list[str]) -> tuple[int, str, str]:
    """Run argv in the service with stdin /dev/null and stdout, stderr captured (memfds:
    the service writes while this waits for its exit code, so no pipe can fill up)."""
    out, err = os.memfd_create("ccr-stdout"), os.memfd_create("ccr-stderr")
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        code = call(argv, (null, out, err))
        texts = []
        for fd in (out, err):
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(fd), "rb") as fh:
                texts.append(fh.read().decode(errors="replace"))
        return code, texts[0], texts[1]
    finally:
        for fd in (out, err, null):
            os.close(fd)
