#!/usr/bin/env bash
# Set up ccr on a fresh Debian machine, idempotently: system packages, .venv, CRIU, pycriu.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The distribution was called `ccr` before it became `ccr-criu` (PyPI's `ccr` is another
# project): drop such an old install so that one distribution owns the `ccr` package.
if .venv/bin/python -m pip show -q ccr >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -y -q ccr >/dev/null
fi
.venv/bin/python -m pip install -q -e '.[dev]'
bash scripts/install-criu.sh .venv/bin/python
# Byte-compile ccr now: a CLI call that compiles its modules first (where the checkout is
# not writable, or PYTHONDONTWRITEBYTECODE is set) spends ~80 ms of a read-only command's
# ~100 ms doing it.  Stale .pyc files are recompiled automatically (mtime check).
.venv/bin/python -m compileall -q ccr >/dev/null
# Every user's `ccr` (through the node service): /opt/ccr and /usr/local/bin/ccr.
bash scripts/install-for-all.sh
