#!/usr/bin/env bash
# Gather what scripts/gpu-check.sh needs on a GPU machine that has no package registry:
# CRIU (the binary and its non-glibc shared libraries), pycriu, ccr's source and the
# wheels of ccr's dependencies for that machine's Python (3.12, x86-64).
#
# Run HERE (where CRIU is installed and PyPI is reachable), from the repository root:
#     scripts/gpu-bundle.sh [DIR]          (DIR: default .gpu-bundle, git-ignored)
# Then carry DIR to the GPU machine with the repository and run scripts/gpu-check.sh there.
set -euo pipefail

BUNDLE=${1:-.gpu-bundle}
CRIU_BIN=${CCR_CRIU:-/usr/local/sbin/criu}
PYTHON=${CCR_PYTHON:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
WHEELS=(psutil typer zstandard dumb-init "protobuf<7")

log() { printf 'gpu-bundle: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ -f ccr/__init__.py ] || die "run me from the repository root"
[ -x "$CRIU_BIN" ] || die "no CRIU at $CRIU_BIN: run scripts/install-criu.sh (or set CCR_CRIU)"
[ -x "$PYTHON" ] || die "no $PYTHON: run make setup (or set CCR_PYTHON)"

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/bin" "$BUNDLE/lib" "$BUNDLE/wheels" "$BUNDLE/site" "$BUNDLE/src"

# CRIU and every shared library it loads, except glibc's own (the GPU machine has a newer
# glibc; mixing two would break).
cp -L "$CRIU_BIN" "$BUNDLE/bin/criu"
chmod 0755 "$BUNDLE/bin/criu"
ldd "$CRIU_BIN" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r lib; do
    case "$(basename "$lib")" in
        libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | \
            libresolv.so.* | libutil.so.* | ld-linux*.so.*) continue ;;
    esac
    cp -L "$lib" "$BUNDLE/lib/"
done
log "CRIU $("$CRIU_BIN" --version | sed -n 's/^Version: *//p') with $(find "$BUNDLE/lib" -type f | wc -l) libraries"

# pycriu: pure Python (RPC and image protobufs), installed from CRIU's source into .venv.
pycriu_dir=$("$PYTHON" -c 'import os, pycriu; print(os.path.dirname(pycriu.__file__))') ||
    die "pycriu is not importable with $PYTHON: run scripts/install-criu.sh"
cp -r "$pycriu_dir" "$BUNDLE/site/pycriu"
find "$BUNDLE/site" -name __pycache__ -prune -exec rm -rf {} +

# ccr itself (gpu-check.sh prefers the repository's copy when it runs from one).
cp -r ccr "$BUNDLE/src/ccr"
find "$BUNDLE/src" -name __pycache__ -prune -exec rm -rf {} +

# Wheels for the GPU machine's Python, with their dependencies resolved for it: recent
# typer needs pydantic, which that machine lacks. They are used by ccr's own processes
# only (gpu-check.sh keeps them off the job's PYTHONPATH), so they shadow nothing of torch.
python3 -m pip download -q --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$BUNDLE/wheels" "${WHEELS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
log "wheels: $(cd "$BUNDLE/wheels" && echo *.whl)"

size=$(du -sm "$BUNDLE" | cut -f1)
log "bundle ready in $BUNDLE (${size} MiB)"
[ "$size" -lt 60 ] || log "warning: ${size} MiB is more than the 60 MiB a GPU run should carry"
