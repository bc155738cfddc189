#!/usr/bin/env bash
# The installer ships inside the package (ccr/data/install-criu.sh) so that `ccr doctor` can
# name it after a plain pip install; this path stays for checkouts and older instructions.
exec bash "$(dirname "$0")/../ccr/data/install-criu.sh" "$@"
