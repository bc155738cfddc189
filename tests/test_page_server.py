"""The lazy restart's page server: frame tables and address bookkeeping (pure logic)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccr.engines.compression import FRAME_SIZE, Codec, compress_dir
from ccr.engines.page_server import Space, TaskPages, frame_index, frames_of
from ccr.errors import IntegrityError


def test_manifest_frame_table_matches_the_frames_in_the_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "raw", tmp_path / "stored"
    src.mkdir()
    # 2.5 frames: half random (stored about raw), half zeros (a few bytes a frame).
    data = os.urandom(FRAME_SIZE + FRAME_SIZE // 4) + bytes(FRAME_SIZE + FRAME_SIZE // 4)
    (src / "pages-1.img").write_bytes(data)
    frames: dict[str, dict[str, object]] = {}
    [entry] = compress_dir(src, dst, Codec("zstd", 1), frames=frames)
    table = frames_of(entry, frames[entry.name])  # type: ignore[arg-type]
    walked = frame_index(dst / entry.name)
    assert table == walked and len(table) == 3
    assert [f.size for f in table] == [FRAME_SIZE, FRAME_SIZE, len(data) - 2 * FRAME_SIZE]
    assert frames_of(entry, None) == []
    bad = {"raw": FRAME_SIZE, "stored": frames[entry.name]["stored"][:-1]}  # type: ignore[index]
    with pytest.raises(IntegrityError, match="does not add up"):
        frames_of(entry, bad)


def test_uncompressed_files_get_no_frame_table(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "pages-1.img").write_bytes(os.urandom(1 << 20))
    frames: dict[str, dict[str, object]] = {}
    compress_dir(tmp_path / "raw", tmp_path / "stored", Codec("none", 0), frames=frames)
    assert frames == {}


def space(*vmas: tuple[int, int]) -> Space:
    return Space(-1, TaskPages(1, "pages-1.img", vmas=list(vmas)))


def test_unmapped_and_removed_ranges_are_never_copied_into() -> None:
    s = space((0x1000, 0x9000))
    s.cut(0x3000, 0x5000)
    assert s.now(0x1000, 0x8000) == [(0x1000, 0, 0x2000), (0x5000, 0x4000, 0x4000)]
    assert s.image_address(0x4000) is None and s.image_address(0x5000) == 0x5000


def test_remapped_ranges_are_copied_where_they_went() -> None:
    s = space((0x1000, 0x5000))
    s.move(0x2000, 0x100000, 0x2000)  # mremap of the middle half
    assert s.now(0x1000, 0x4000) == [
        (0x1000, 0, 0x1000),
        (0x100000, 0x1000, 0x2000),
        (0x4000, 0x3000, 0x1000),
    ]
    assert s.image_address(0x100800) == 0x2800
    assert s.image_address(0x2800) is None


def test_frame_digests_are_checked_before_a_frame_is_served(tmp_path: Path) -> None:
    import blake3

    from ccr.engines.page_server import Fatal, ServedFile, _Source

    src, dst = tmp_path / "raw", tmp_path / "stored"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(2 * FRAME_SIZE))
    frames: dict[str, dict[str, object]] = {}
    [entry] = compress_dir(src, dst, Codec("zstd", 1), frames=frames)
    table = frames_of(entry, frames[entry.name])  # type: ignore[arg-type]
    stored = (dst / entry.name).read_bytes()
    digests = [blake3.blake3(stored[f.at : f.at + f.length]).hexdigest() for f in table]
    served = ServedFile(
        "pages-1.img",
        str(dst / entry.name),
        "zstd",
        entry.raw_size,
        entry.digest,
        "blake3",
        table,
        digests,
    )
    assert _Source(served).read(1)[1] == (src / "pages-1.img").read_bytes()[FRAME_SIZE:]
    served.digests = [digests[0], "0" * 64]
    with pytest.raises(Fatal, match=r"pages-1.img.zst is corrupted \(frame 1 .*checksum"):
        _Source(served).read(1)
