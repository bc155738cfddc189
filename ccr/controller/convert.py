"""`ccr compress` / `ccr decompress`: re-store a checkpoint with another codec, atomically."""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from ccr import progress
from ccr.controller.restart import load_image
from ccr.controller.runtime import Runtime
from ccr.engines.compression import Codec, Progress, compress_dir, decompress_dir
from ccr.errors import StorageError
from ccr.storage import layout
from ccr.storage.imageset import discard, fsync_dir, fsync_tree, scratch_dir, storage_error
from ccr.storage.manifest import JOB_MANIFEST, MANIFEST, FileEntry, write_signed

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Swap two directory entries in one atomic step (renameat2 RENAME_EXCHANGE)."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise storage_error(a, OSError(err, os.strerror(err)), "swapping in")


def convert(rt: Runtime, checkpoint: Path, codec: Codec) -> Path:
    """Re-store every file of checkpoint with codec; a crash half-way leaves it usable.

    The new copy is built beside the old one, verified, then swapped in with one atomic
    rename, so at every moment the checkpoint's name holds a complete, signed checkpoint.
    """
    # What the path names (a generation, or a step or rank directory in one) is rebuilt
    # whole, each image directory at its place in it (load_image authenticates each).
    dirs = layout.open_path(checkpoint, None).dirs()
    generation = checkpoint.resolve()
    key = rt.manifest_key(create=False)
    if key is None:
        raise StorageError("no manifest key in this state directory: cannot re-sign")
    series = generation.name.rsplit(".", 1)[0] if generation.name[-1].isdigit() else generation.name
    staging = generation.parent / f".{series}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir(mode=0o700)
        for src in dirs:
            image = load_image(rt, src)
            dst = staging
            for part in src.relative_to(generation).parts:  # <step>/<rank>/ in a job's
                dst = dst / part
                dst.mkdir(mode=0o700, exist_ok=True)
            packed = any(f.codec != "none" for f in image.manifest.files)
            raw = (
                scratch_dir(image.manifest.image_bytes, generation.parent, "convert")
                if packed
                else src
            )
            total = image.manifest.image_bytes
            try:
                if packed:
                    with progress.task(f"decompress {image.step}", total) as update:
                        decompress_dir(src, raw, image.manifest.files, progress=update)
                frames: dict[str, dict[str, Any]] = {}
                with progress.task(f"store {image.step} as {codec.spec}", total) as update:
                    entries = (
                        compress_dir(raw, dst, codec, update, frames)
                        if packed
                        else _store(src, dst, codec, update, frames)
                    )
            finally:
                if packed:
                    discard(raw)
            image.manifest.files = entries
            image.manifest.frame_tables = frames
            image.manifest.compression = codec.spec
            write_signed(dst / MANIFEST, image.manifest.to_dict(), key)
        if (generation / JOB_MANIFEST).exists():
            shutil.copy2(generation / JOB_MANIFEST, staging / JOB_MANIFEST)
        fsync_tree(staging)
        exchange(staging, generation)
        fsync_dir(generation.parent)
    except OSError as exc:
        discard(staging)
        raise storage_error(generation, exc, "converting") from None
    except BaseException:
        discard(staging)
        raise
    discard(staging)  # now the old copy
    return generation


def _store(
    src: Path, dst: Path, codec: Codec, update: Progress, frames: dict[str, dict[str, Any]]
) -> list[FileEntry]:
    """compress_dir over an uncompressed step dir, leaving its manifest out (hard links)."""
    scratch = dst.parent / f".{dst.name}.links-{secrets.token_hex(4)}"
    scratch.mkdir(mode=0o700)
    try:
        for path in src.iterdir():
            if path.is_file() and path.name != MANIFEST:
                os.link(path, scratch / path.name)
        return compress_dir(scratch, dst, codec, update, frames)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
