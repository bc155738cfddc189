"""A background supervisor's progress reaches the process that started it, then its report."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_for

from ccr import interrupts, progress
from ccr.controller import supervisor as sup


def test_progress_is_relayed_until_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CCR_STATE_DIR", str(tmp_path / "state"))
    events: list[tuple[int, str, int, int]] = []
    with progress.task("the caller's own task", 1) as update:  # ids must not collide with it
        update(1)

    def target(report: sup.Report) -> int:
        with progress.task("decompress 1.0", 300) as update:
            for done in (100, 200, 300):
                time.sleep(0.15)  # lines are sent at most every 0.1 s per task
                update(done)
        report({"ok": True, "pid": os.getpid()})
        with progress.task("after the report", 10) as update:
            update(10)
        return 0

    progress.set_listener(lambda *event: events.append(event))
    try:
        message: dict[str, Any] = sup.spawn_background("relay-test", target)
    finally:
        progress.set_listener(None)
    wait_for(lambda: not psutil.pid_exists(message["pid"]), 30, "the supervisor to end")

    assert message["ok"] is True
    assert {e[1] for e in events} == {"decompress 1.0"}
    assert [e[2] for e in events] == [0, 100, 200, 300, -1]
    assert len({e[0] for e in events}) == 1
    own = progress._next_id  # the relayed task got an id of this process's own counting
    assert events[0][0] == own


def _interrupt_on_first_progress(events: list[str]) -> progress.Listener:
    """A caller-side listener that plays Ctrl-C at the first progress line it sees."""

    def listen(task_id: int, description: str, done: int, total: int) -> None:
        if not events:
            events.append(description)
            time.sleep(0.5)  # the supervisor goes on meanwhile
            os.kill(os.getpid(), signal.SIGINT)

    return listen


@pytest.mark.parametrize("reported", [False, True], ids=["rolled-back", "already-started"])
def test_interrupted_caller_abandons_unless_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reported: bool
) -> None:
    monkeypatch.setenv("CCR_STATE_DIR", str(tmp_path / "state"))
    marker = tmp_path / "outcome"

    def target(report: sup.Report) -> int:
        try:
            with progress.task("restore", 10) as update:
                update(5)
                if reported:
                    report({"ok": True, "pid": os.getpid()})
                    time.sleep(2)  # the abandon request comes now: too late
                else:
                    time.sleep(30)  # a long restore: the abandon interrupts it
                    report({"ok": True, "pid": os.getpid()})
            marker.write_text("kept")
        except KeyboardInterrupt:
            marker.write_text("rolled back")
            raise
        return 0

    events: list[str] = []
    progress.set_listener(_interrupt_on_first_progress(events))
    began = time.monotonic()
    try:
        with pytest.raises(interrupts.Interrupted) as caught:
            sup.spawn_background("abandon-test", target)
    finally:
        progress.set_listener(None)
    assert caught.value.signum == signal.SIGINT
    if reported:
        assert caught.value.started is not None and caught.value.started["ok"] is True
        wait_for(lambda: marker.exists(), 30, "the supervisor to go on")
        assert marker.read_text() == "kept"
    else:
        assert caught.value.started is None
        # The caller returned once the supervisor had rolled back, not 30 s later.
        assert marker.read_text() == "rolled back"
        assert time.monotonic() - began < 10
