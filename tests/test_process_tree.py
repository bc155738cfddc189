"""engines.process reads process trees from /proc itself (psutil's import cost ~15 ms a
create): checked against psutil on a real tree of three generations."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

from ccr.engines import process


def test_tree_pids_and_rss_match_psutil() -> None:
    # sh -> (sleep, sh -> sleep): grandchildren included, root first
    root = subprocess.Popen(
        ["sh", "-c", "sleep 60 & sh -c 'sleep 60 & wait' & wait"], start_new_session=True
    )
    expected: set[int] = {root.pid}
    try:
        for _ in range(200):
            expected = {root.pid} | {p.pid for p in psutil.Process(root.pid).children(True)}
            if len(expected) == 4:
                break
            time.sleep(0.01)
        assert len(expected) == 4
        pids = process.tree_pids(root.pid)
        assert pids[0] == root.pid and set(pids) == expected and len(pids) == 4
        rss = sum(psutil.Process(p).memory_info().rss for p in expected)
        assert abs(process.tree_rss(root.pid) - rss) <= 64 * 4096  # moments apart
        assert process.tree_pids(2**22 + 7) == []  # no such process
    finally:
        for pid in expected | set(process.tree_pids(root.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        root.wait()
