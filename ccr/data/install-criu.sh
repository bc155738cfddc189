#!/usr/bin/env bash
# Install a working CRIU >= 4 (built from Debian's upstream tarball) and pycriu.
#
# Idempotent: a CRIU that already passes `criu check` at version >= 4 is kept, and pycriu
# is installed only where the target Python cannot import it.  Debian 12's own criu 3.17
# fails on recent kernels (vdso), so it is never used.
#
# Usage: scripts/install-criu.sh [PYTHON]   (PYTHON: interpreter to install pycriu into)
set -euo pipefail

PYTHON=${1:-${CCR_PYTHON:-.venv/bin/python}}
PREFIX=${CCR_CRIU_PREFIX:-/usr/local}
SRC_CACHE=${CCR_CRIU_SRC:-/var/cache/ccr/criu-src}
CRIU_BIN="$PREFIX/sbin/criu"

log() { printf 'install-criu: %s\n' "$*" >&2; }

criu_ok() {
    local bin=$1 ver major
    [ -x "$bin" ] || return 1
    ver=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p')
    major=${ver%%.*}
    [ -n "$major" ] && [ "$major" -ge 4 ] || return 1
    "$bin" check >/dev/null 2>&1
}

pycriu_ok() {
    [ -x "$PYTHON" ] || return 1
    "$PYTHON" -c 'import pycriu, pycriu.rpc_pb2, pycriu.images' >/dev/null 2>&1
}

if [ "$(id -u)" -ne 0 ]; then
    if criu_ok "$CRIU_BIN" && pycriu_ok; then exit 0; fi
    log "must run as root to build and install CRIU"; exit 1
fi

need_build=1
criu_ok "$CRIU_BIN" && need_build=0
if [ $need_build -eq 0 ] && { [ ! -x "$PYTHON" ] || pycriu_ok; }; then
    log "CRIU $("$CRIU_BIN" --version | sed -n 's/^Version: *//p') already works; nothing to do"
    exit 0
fi

BUILD_DEPS=(build-essential xz-utils libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
    libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev pkgconf
    protobuf-c-compiler protobuf-compiler uuid-dev python3-protobuf iproute2 dpkg-dev)

ensure_source() {
    local tarball
    tarball=$(ls "$SRC_CACHE"/criu_*.orig.tar.* 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$tarball" ]; then
        mkdir -p "$SRC_CACHE"
        local list=/etc/apt/sources.list.d/ccr-criu-src.list
        if [ ! -f "$list" ]; then
            echo "deb-src http://deb.debian.org/debian trixie main" >"$list"
            echo "deb-src http://deb.debian.org/debian sid main" >>"$list"
        fi
        apt-get update -qq >&2
        # The Debian packaging files may 404; only the orig tarball is needed.
        (cd "$SRC_CACHE" && apt-get source --download-only criu >&2) || true
        tarball=$(ls "$SRC_CACHE"/criu_*.orig.tar.* 2>/dev/null | sort -V | tail -n1 || true)
        [ -n "$tarball" ] || { log "could not download CRIU's source tarball"; exit 1; }
    fi
    local dir="$SRC_CACHE/build"
    if [ ! -f "$dir/Makefile" ]; then
        rm -rf "$dir"; mkdir -p "$dir"
        tar -xf "$tarball" -C "$dir" --strip-components=1
    fi
    echo "$dir"
}

missing=()
for p in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing build dependencies: ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

SRC=$(ensure_source)
if [ $need_build -eq 1 ]; then
    log "building CRIU in $SRC"
    make -C "$SRC" -j"$(nproc)" criu >&2
    install -D -m 0755 "$SRC/criu/criu" "$CRIU_BIN"
    criu_ok "$CRIU_BIN" || { log "built CRIU does not pass 'criu check'"; "$CRIU_BIN" check >&2 || true; exit 1; }
    log "installed $("$CRIU_BIN" --version | sed -n 's/^Version: *//p') to $CRIU_BIN"
fi

if [ -x "$PYTHON" ] && ! pycriu_ok; then
    make -C "$SRC" -j"$(nproc)" lib >&2
    # pycriu's generated modules import google.protobuf; its image decoder needs protobuf<7.
    "$PYTHON" -m pip install -q 'protobuf<7' >&2
    "$PYTHON" -m pip install -q --no-deps "$SRC/lib" >&2
    pycriu_ok || { log "pycriu did not install into $PYTHON"; exit 1; }
    log "installed pycriu into $PYTHON"
fi
