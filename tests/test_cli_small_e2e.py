"""The small things users trip on: --version, bare `ccr`, -q/-v anywhere, help texts,
progress in MiB with a spinner for CRIU's restore, and `status` as README describes it."""

from __future__ import annotations

import io
import re

from conftest import COUNTER, Ccr, numbers, wait_for


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_version_and_bare_ccr(ccr: Ccr) -> None:
    from ccr import __version__

    proc = ccr.run("--version")
    assert proc.stdout.strip() == f"ccr {__version__}"
    bare = ccr.run(check=False)
    assert bare.returncode == 0, bare.stderr
    assert "Usage: ccr" in bare.stdout and "Commands:" in bare.stdout
    assert "error" not in bare.stderr
    group = ccr.run("checkpoint", check=False)
    assert group.returncode == 0 and "vacate" in group.stdout and "error:" not in group.stderr
    text = ccr.run("version").stdout
    assert f"ccr {__version__}" in text and "CRIU 4." in text and "mem_dirty_track" in text


def test_quiet_and_verbose_after_the_command(ccr: Ccr) -> None:
    assert ccr.run("list", "-q").stdout == ""
    assert "STEP" in ccr.run("list", "-v").stdout
    assert ccr.run("list", "--quiet").stdout == ""
    # After the step's command, -q/-v are the command's own arguments.
    ccr.run("run", "--job-id", "9220", "-q", "--", "sh", "-c", 'echo "args: $*"', "sh", "-v", "-q")
    assert (ccr.work / "ccr-9220.0.out").read_text() == "args: -v -q\n"


def test_help_texts_name_the_keywords_and_units(ccr: Ccr) -> None:
    for verb in ("create", "vacate", "requeue", "restart"):
        text = ccr.run("checkpoint", verb, "--help").stdout
        for keyword in ("ImageDir=", "MaxWait=", "StickToNodes"):
            assert keyword in text, (verb, keyword, text)
    assert "a bare number is minutes" in one_line(ccr.run("run", "--help").stdout)


def test_progress_bar_uses_mib_and_a_spinner_for_phases_without_bytes() -> None:
    from rich.console import Console

    from ccr import cli, progress

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    bar = cli._progress_bar(console)
    try:
        listen = progress._listener
        assert listen is not None
        with bar:
            listen(1, "decompress 7.0", 0, 10 * 2**20)
            listen(1, "decompress 7.0", 3 * 2**20, 10 * 2**20)
            listen(2, "restoring 7.0 (CRIU)", 0, 0)
            bar.refresh()
            text = out.getvalue()
    finally:
        progress.set_listener(None)
    assert "3.0/10.0 MiB" in text, text
    assert "restoring 7.0 (CRIU)" in text
    assert not re.search(r"\d MB\b|\bMB/s", text), text  # decimal units nowhere


def test_restore_reports_its_criu_phase(ccr: Ccr) -> None:
    """CRIU's restore reports a task (drawn as a spinner), relayed from the supervisor."""
    import os
    import pty
    import subprocess
    import sys

    ccr.program("counter.py", COUNTER)
    ccr.detach("python3", "counter.py", options=("--job-id", "9221"))
    out = ccr.work / "ccr-9221.0.out"
    wait_for(lambda: len(numbers(out)) > 3, 30, "output")
    ccr.run("create", "9221", "--stop")
    wait_for(lambda: ccr.step("9221.0")["exit_code"] is not None, 30, "vacated")
    # The bar is drawn only on a terminal: restart with stderr on a pseudo-terminal and read
    # what it drew (rich draws each task as it is added, so a short phase is drawn too).
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ccr", "restart", "9221"],
            cwd=ccr.work,
            env={**ccr.env, "COLUMNS": "120"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=120,
        )
        os.close(slave)
        slave = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0, proc.stdout
    assert "9221.0 restarted" in proc.stdout
    wait_for(lambda: ccr.step("9221.0")["state"] == "running", 30, "restored")
    assert b"restoring 9221.0 (CRIU)" in drawn, drawn[-2000:]
    assert b"MiB" in drawn and b" MB" not in drawn, drawn[-2000:]  # the decompress bar
    ccr.run("cancel", "9221")


def test_status_text_shows_next_checkpoint_and_generations(ccr: Ccr) -> None:
    ccr.program("counter.py", COUNTER)
    ccr.detach("python3", "counter.py", options=("--job-id", "9222", "--checkpoint", "10"))
    out = ccr.work / "ccr-9222.0.out"
    wait_for(lambda: len(numbers(out)) > 3, 30, "output")
    ccr.run("create", "9222.0")
    text = ccr.run("status", "9222").stdout
    assert "interval checkpoints: every 00:10:00" in text, text
    assert re.search(r"next checkpoint \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text), text
    assert re.search(r"generation 1 .*MiB .*9222\.0\.ckpt\.1", text), text
    ccr.run("cancel", "9222")
