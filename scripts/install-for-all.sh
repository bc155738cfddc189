#!/usr/bin/env bash
# Install ccr for every user of this node, idempotently (part of `make setup`):
#   /opt/ccr            a venv of Debian's /usr/bin/python3 (the default python3 may live
#                       under /root, 0700, which no other user can run), world-readable,
#                       with ccr installed from this checkout (not editable) and pycriu;
#   /usr/local/bin/ccr  -> /opt/ccr/bin/ccr.
# Users other than root then run `ccr`, which talks to the node service (`ccr daemon`,
# ccr/data/ccr-daemon.service).  CCR_OPT changes /opt/ccr.
set -euo pipefail
cd "$(dirname "$0")/.."
OPT=${CCR_OPT:-/opt/ccr}
SYSPY=/usr/bin/python3
[ -x "$SYSPY" ] || { echo "install-for-all: $SYSPY missing (apt-get install python3)" >&2; exit 1; }
"$SYSPY" -c 'import venv, ensurepip' 2>/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
}
[ -x "$OPT/bin/python" ] || "$SYSPY" -m venv "$OPT"
"$OPT/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$OPT/bin/python" -m pip install -q --upgrade .
bash scripts/install-criu.sh "$OPT/bin/python"
"$OPT/bin/python" -m compileall -q "$OPT/lib" >/dev/null || true
chmod -R a+rX "$OPT"
ln -sfn "$OPT/bin/ccr" /usr/local/bin/ccr
