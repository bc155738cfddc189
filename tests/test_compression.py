"""ccr.engines.compression on real files: round trips, damage detection, modes, flat memory."""

from __future__ import annotations

import hashlib
import random
import stat
import threading
import time
from pathlib import Path

import blake3
import psutil
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccr.engines.compression import (
    DEFAULT_LEVEL,
    FRAME_SIZE,
    MAX_LEVEL,
    MIN_LEVEL,
    SMALL_FILE,
    WORKERS,
    Codec,
    compress_dir,
    compress_file,
    decompress_dir,
    decompress_file,
    parse_codec,
)
from ccr.errors import IntegrityError, StorageError, UsageError
from ccr.storage.manifest import FileEntry

BLOCK = zstandard.BLOCKSIZE_MAX  # 128 KiB: sizes around it cross zstd's block boundaries
# Around 0, one block, one multi-threaded job (2 MiB at level 1) and several of each.
# ... and around ccr's frame size (one frame per FRAME_SIZE raw bytes).
SIZES = [0, 1, 100, 4095, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, (2 << 20) + 5]
SIZES += [FRAME_SIZE - 1, FRAME_SIZE, FRAME_SIZE + 1, 2 * FRAME_SIZE + BLOCK + 3]


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def compressible_bytes(size: int, seed: int = 0) -> bytes:
    """Text-like data with zero runs, roughly what CRIU page images of a program hold."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(200)]
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.1:
            out += bytes(rng.randint(1, 20000))
        else:
            out += b" ".join(rng.choices(words, k=50)) + b"\n"
    return bytes(out[:size])


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- parse_codec ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "codec"),
    [
        ("zstd", Codec("zstd", DEFAULT_LEVEL)),
        ("zstd:1", Codec("zstd", 1)),
        ("zstd:3", Codec("zstd", 3)),
        ("zstd:19", Codec("zstd", 19)),
        (f"zstd:{MAX_LEVEL}", Codec("zstd", MAX_LEVEL)),
        ("zstd:-5", Codec("zstd", -5)),
        (f"zstd:{MIN_LEVEL}", Codec("zstd", MIN_LEVEL)),
        ("none", Codec("none", 0)),
        (" ZSTD:7 ", Codec("zstd", 7)),
        ("None", Codec("none", 0)),
    ],
)
def test_parse_codec_accepts(text: str, codec: Codec) -> None:
    assert parse_codec(text) == codec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "zstd:",
        "zstd:0",
        f"zstd:{MAX_LEVEL + 1}",
        f"zstd:{MIN_LEVEL - 1}",
        "zstd:abc",
        "zstd:1:2",
        "zstd:+3",
        "zstd: 3",
        "zstd:1_0",
        "zstd:1.5",
        "zstd:\u0663",  # ARABIC-INDIC DIGIT THREE: int() would take it
        "zstd:99999999999",
        "zstd3",
        "gzip",
        "lz4",
        "none:1",
        "zst",
    ],
)
def test_parse_codec_rejects(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_codec(text)
    message = str(info.value)
    assert "\n" not in message and repr(text) in message
    assert info.value.exit_code == 2


@given(st.integers(min_value=MIN_LEVEL, max_value=MAX_LEVEL).filter(bool))
def test_parse_codec_every_level_round_trips(level: int) -> None:
    codec = parse_codec(f"zstd:{level}")
    assert codec == Codec("zstd", level)
    assert parse_codec(codec.spec) == codec


@given(st.integers().filter(lambda n: n == 0 or not MIN_LEVEL <= n <= MAX_LEVEL))
def test_parse_codec_rejects_out_of_range(level: int) -> None:
    with pytest.raises(UsageError):
        parse_codec(f"zstd:{level}")


@given(st.text(max_size=20))
def test_parse_codec_takes_nothing_else(text: str) -> None:
    spec = text.strip().lower()
    valid = spec in ("none", "zstd") or (
        spec.startswith("zstd:")
        and spec[5:].lstrip("-").isascii()
        and spec[5:].lstrip("-").isdigit()
    )
    try:
        codec = parse_codec(text)
    except UsageError:
        return
    assert valid, f"{text!r} was accepted as {codec}"


# --- compress_file / decompress_file -------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["random", "compressible"])
def test_round_trip(tmp_path: Path, size: int, kind: str) -> None:
    data = random_bytes(size, size) if kind == "random" else compressible_bytes(size, size)
    src = write(tmp_path / "pages-1.img", data)
    packed, out = tmp_path / "pages-1.img.zst", tmp_path / "out.img"
    csize, digest = compress_file(src, packed, DEFAULT_LEVEL)
    blob = packed.read_bytes()
    assert csize == len(blob)
    assert digest == blake3.blake3(blob).hexdigest()
    if kind == "compressible" and size >= BLOCK:
        assert csize < size / 2
    assert decompress_file(packed, out) == size
    assert out.read_bytes() == data
    assert mode(packed) == 0o600 and mode(out) == 0o600


def frames_of(blob: bytes) -> list[tuple[zstandard.FrameParameters, bytes]]:
    """Each zstd frame of blob, decoded on its own: (its header's parameters, its content)."""
    frames = []
    while blob:
        params = zstandard.get_frame_parameters(blob)
        dobj = zstandard.ZstdDecompressor().decompressobj()
        frames.append((params, dobj.decompress(blob)))
        blob = dobj.unused_data
    return frames


@pytest.mark.parametrize("size", [0, BLOCK + 1, FRAME_SIZE, FRAME_SIZE + 1, 3 * FRAME_SIZE - 5])
def test_frames_are_independent_sized_and_checksummed(tmp_path: Path, size: int) -> None:
    data = compressible_bytes(size)
    src = write(tmp_path / "a", data)
    compress_file(src, tmp_path / "a.zst", DEFAULT_LEVEL)
    frames = frames_of((tmp_path / "a.zst").read_bytes())
    # One frame per FRAME_SIZE raw bytes (an empty file: one empty frame), each decodable
    # alone: that is what lets a restore decode them on every core.
    assert len(frames) == max(1, -(-size // FRAME_SIZE))
    for i, (params, content) in enumerate(frames):
        assert params.has_checksum
        assert params.content_size == len(content)
        assert content == data[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]


def test_frames_cost_little_ratio(tmp_path: Path) -> None:
    data = compressible_bytes(3 * FRAME_SIZE, 11)
    src = write(tmp_path / "a", data)
    size, _ = compress_file(src, tmp_path / "a.zst", DEFAULT_LEVEL)
    whole = len(zstandard.ZstdCompressor(level=DEFAULT_LEVEL).compress(data))
    assert size < whole * 1.01


@pytest.mark.parametrize("how", ["unsized", "oversized"])
def test_single_stream_files_still_decode(tmp_path: Path, how: str) -> None:
    # Files of one big frame (ccr before it cut frames, or the zstd CLI), or of frames that
    # do not state their size, are decoded as a stream rather than held in memory.
    if how == "unsized":
        data = compressible_bytes(FRAME_SIZE + 3 * BLOCK, 12)
    else:
        data = bytes(40 << 20) + random_bytes(25 << 20, 13) + b"tail"
    packed = tmp_path / "a.zst"
    with packed.open("wb") as fh:
        cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
        if how == "unsized":
            with cctx.stream_writer(fh, closefd=False) as writer:
                writer.write(data)
        else:
            fh.write(cctx.compress(data))
    params = zstandard.get_frame_parameters(packed.read_bytes()[:18])
    assert params.content_size == (
        len(data) if how == "oversized" else zstandard.CONTENTSIZE_UNKNOWN
    )
    assert decompress_file(packed, tmp_path / "out") == len(data)
    assert (tmp_path / "out").read_bytes() == data
    # Truncation is still seen on this path.
    write(packed, packed.read_bytes()[:-2])
    with pytest.raises(IntegrityError, match="truncated"):
        decompress_file(packed, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("level", [1, 3, 19, -5, 22])
def test_other_levels(tmp_path: Path, level: int) -> None:
    data = compressible_bytes(3 * BLOCK)
    src = write(tmp_path / "a", data)
    compress_file(src, tmp_path / "a.zst", level)
    assert decompress_file(tmp_path / "a.zst", tmp_path / "b") == len(data)
    assert (tmp_path / "b").read_bytes() == data


def test_existing_destination_is_replaced_and_made_private(tmp_path: Path) -> None:
    src = write(tmp_path / "a", compressible_bytes(BLOCK))
    dst = write(tmp_path / "a.zst", b"old contents, much longer than nothing" * 100)
    dst.chmod(0o644)
    compress_file(src, dst, 1)
    assert mode(dst) == 0o600
    out = write(tmp_path / "out", b"stale")
    out.chmod(0o666)
    decompress_file(dst, out)
    assert mode(out) == 0o600 and out.read_bytes() == src.read_bytes()


@pytest.fixture(scope="module")
def packed_blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(raw, compressed) of a 1 MiB+ mixed file: several blocks, some compressible."""
    raw = compressible_bytes(4 * BLOCK, 7) + random_bytes(3 * BLOCK + 11, 7)
    directory = tmp_path_factory.mktemp("blob")
    src = write(directory / "raw", raw)
    compress_file(src, directory / "raw.zst", DEFAULT_LEVEL)
    return raw, (directory / "raw.zst").read_bytes()


def test_corrupted_byte_is_reported(tmp_path: Path, packed_blob: tuple[bytes, bytes]) -> None:
    _, blob = packed_blob
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0x40
    src = write(tmp_path / "pages-1.img.zst", bytes(damaged))
    dst = tmp_path / "pages-1.img"
    with pytest.raises(IntegrityError, match="is corrupted") as info:
        decompress_file(src, dst)
    assert str(src) in str(info.value) and "\n" not in str(info.value)
    assert not dst.exists()


def test_corrupted_checksum_is_reported(tmp_path: Path, packed_blob: tuple[bytes, bytes]) -> None:
    _, blob = packed_blob
    src = write(tmp_path / "x.zst", blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(IntegrityError, match=f"{src}.*is corrupted"):
        decompress_file(src, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("cut", [1, 2, 4, 5, 100, "half", "header", "magic", "all"])
def test_truncated_file_is_reported(
    tmp_path: Path, packed_blob: tuple[bytes, bytes], cut: int | str
) -> None:
    _, blob = packed_blob
    keep = {"half": len(blob) // 2, "header": 6, "magic": 4, "all": 0}.get(
        str(cut), len(blob) - int(cut) if isinstance(cut, int) else 0
    )
    src = write(tmp_path / "pages-1.img.zst", blob[:keep])
    dst = tmp_path / "pages-1.img"
    # Cutting inside the checksum (1..4 bytes) is the case zstandard itself does not notice.
    with pytest.raises(IntegrityError, match="is truncated") as info:
        decompress_file(src, dst)
    assert str(src) in str(info.value)
    assert not dst.exists()


def test_trailing_garbage_is_reported(tmp_path: Path, packed_blob: tuple[bytes, bytes]) -> None:
    _, blob = packed_blob
    src = write(tmp_path / "x.zst", blob + b"\x00junk")
    with pytest.raises(IntegrityError, match=f"{src}.*is corrupted"):
        decompress_file(src, tmp_path / "x")


def test_not_zstd_at_all_is_reported(tmp_path: Path) -> None:
    src = write(tmp_path / "x.zst", b"this is not a zstd frame" * 10)
    with pytest.raises(IntegrityError, match="is corrupted"):
        decompress_file(src, tmp_path / "x")


def test_concatenated_and_skippable_frames_are_accepted(tmp_path: Path) -> None:
    # What `cat a.zst b.zst` or other zstd tools may produce still decodes.
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    skippable = (0x184D2A53).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    src = write(tmp_path / "x.zst", cctx.compress(b"one") + skippable + cctx.compress(b"two"))
    assert decompress_file(src, tmp_path / "x") == 6
    assert (tmp_path / "x").read_bytes() == b"onetwo"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_flipped_byte_is_caught_or_harmless(
    tmp_path: Path, packed_blob: tuple[bytes, bytes], data: st.DataObject
) -> None:
    raw, blob = packed_blob
    where = data.draw(st.integers(0, len(blob) - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="mask")
    damaged = bytearray(blob)
    damaged[where] ^= mask
    src = write(tmp_path / "f.zst", bytes(damaged))
    dst = tmp_path / "f"
    try:
        decompress_file(src, dst)
    except IntegrityError as exc:
        assert str(src) in str(exc)
        assert not dst.exists()
    else:
        # Some header bits (e.g. a larger window size) do not change the content; the
        # manifest's SHA-256 (checked by decompress_dir) catches those.
        assert dst.read_bytes() == raw


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot compress"):
        compress_file(tmp_path / "nope", tmp_path / "nope.zst", 1)
    assert not (tmp_path / "nope.zst").exists()
    with pytest.raises(IntegrityError, match="missing"):
        decompress_file(tmp_path / "nope.zst", tmp_path / "nope")


def test_unwritable_destination(tmp_path: Path) -> None:
    src = write(tmp_path / "a", b"x" * 1000)
    with pytest.raises(StorageError, match=str(tmp_path / "no" / "a.zst")):
        compress_file(src, tmp_path / "no" / "a.zst", 1)


# --- compress_dir / decompress_dir ---------------------------------------------------------


def make_image_dir(directory: Path) -> dict[str, bytes]:
    """A CRIU-like image directory: small metadata images and larger pages images."""
    directory.mkdir()
    files = {
        "inventory.img": random_bytes(40, 1),
        "core-1.img": compressible_bytes(3000, 2),
        "empty.img": b"",
        "just-small.img": compressible_bytes(SMALL_FILE - 1, 3),
        "just-big.img": compressible_bytes(SMALL_FILE, 4),
        "pages-1.img": compressible_bytes(FRAME_SIZE + (5 << 20), 5),  # two frames
        "pages-2.img": random_bytes((1 << 20) + 3, 6),
    }
    for name, data in files.items():
        write(directory / name, data)
    (directory / "subdir").mkdir()
    write(directory / "subdir" / "ignored", b"not a top-level file")
    (directory / "link.img").symlink_to(directory / "inventory.img")
    return files


def test_dir_round_trip_zstd(tmp_path: Path) -> None:
    files = make_image_dir(tmp_path / "dump")
    seen: list[int] = []
    entries = compress_dir(tmp_path / "dump", tmp_path / "store", Codec("zstd", 1), seen.append)
    by_name = {e.name: e for e in entries}
    assert [e.name for e in entries] == sorted(by_name)  # sorted by source name
    for name, data in files.items():
        if len(data) >= SMALL_FILE:
            entry = by_name[name + ".zst"]
            assert entry.codec == "zstd" and name not in by_name
        else:
            entry = by_name[name]
            assert entry.codec == "none"
        stored = tmp_path / "store" / entry.name
        assert entry.size == stored.stat().st_size
        assert entry.algorithm == "blake3"
        assert entry.digest == blake3.blake3(stored.read_bytes()).hexdigest()
        assert entry.raw_size == len(data)
        assert mode(stored) == 0o600
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(by_name)
    total = sum(len(d) for d in files.values())
    assert seen == sorted(seen) and seen[-1] == total
    assert by_name["pages-1.img.zst"].size < (FRAME_SIZE + (5 << 20)) / 2

    progress: list[int] = []
    decompress_dir(tmp_path / "store", tmp_path / "restore", entries, progress.append)
    for name, data in files.items():
        assert (tmp_path / "restore" / name).read_bytes() == data
        assert mode(tmp_path / "restore" / name) == 0o600
    assert sorted(p.name for p in (tmp_path / "restore").iterdir()) == sorted(files)
    assert progress[-1] == total


def test_dir_round_trip_none(tmp_path: Path) -> None:
    files = make_image_dir(tmp_path / "dump")
    entries = compress_dir(tmp_path / "dump", tmp_path / "store", Codec("none", 0))
    assert sorted(e.name for e in entries) == sorted(files)
    assert all(e.codec == "none" and e.size == e.raw_size for e in entries)
    decompress_dir(tmp_path / "store", tmp_path / "restore", entries)
    for name, data in files.items():
        assert (tmp_path / "restore" / name).read_bytes() == data


def test_dir_entries_survive_the_manifest_round_trip(tmp_path: Path) -> None:
    from ccr.storage.manifest import StepManifest

    make_image_dir(tmp_path / "dump")
    entries = compress_dir(tmp_path / "dump", tmp_path / "store", parse_codec("zstd"))
    manifest = StepManifest(
        job_id=1, step_id=0, argv=["x"], cwd="/", output="/o", hostname="h", uid=0, gid=0,
        root_pid=1, pids=[1], criu_version="4", created=0.0, leave_running=True, files=entries,
    )  # fmt: skip
    again = StepManifest.from_dict(manifest.to_dict())
    assert again.files == entries
    assert manifest.stored_bytes < manifest.image_bytes
    # verify_files accepts what compress_dir wrote (it checks the stored bytes).
    from ccr.storage.manifest import verify_files

    verify_files(tmp_path / "store", manifest)


def test_decompress_dir_checks_the_manifest_hash(tmp_path: Path) -> None:
    make_image_dir(tmp_path / "dump")
    entries = compress_dir(tmp_path / "dump", tmp_path / "store", Codec("zstd", 1))
    # A same-size forgery that zstd cannot see: swap in a valid frame of different content.
    victim = tmp_path / "store" / "pages-2.img.zst"
    size = victim.stat().st_size
    other = write(tmp_path / "other", random_bytes((1 << 20) + 3, 99))
    compress_file(other, victim, 1)
    assert victim.stat().st_size == size
    with pytest.raises(IntegrityError, match=f"{victim} is corrupted \\(checksum mismatch\\)"):
        decompress_dir(tmp_path / "store", tmp_path / "restore", entries)
    assert list((tmp_path / "restore").iterdir()) == []  # nothing half-restored stays
    # Without verify the forgery decodes: zstd's own checksum only guards against accidents.
    decompress_dir(tmp_path / "store", tmp_path / "restore2", entries, verify=False)


@pytest.mark.parametrize(
    "what", ["truncate", "flip", "flip-2nd-frame", "cut-at-frame", "missing", "raw-size", "small"]
)
def test_decompress_dir_reports_damage(tmp_path: Path, what: str) -> None:
    make_image_dir(tmp_path / "dump")
    entries = compress_dir(tmp_path / "dump", tmp_path / "store", Codec("zstd", 1))
    pages = tmp_path / "store" / "pages-1.img.zst"
    if what == "truncate":
        write(pages, pages.read_bytes()[:-3])
    elif what in ("flip", "flip-2nd-frame"):
        blob = bytearray(pages.read_bytes())
        blob[-1000 if what == "flip-2nd-frame" else 1000] ^= 1
        write(pages, bytes(blob))
    elif what == "cut-at-frame":
        # A whole frame gone is invisible to zstd (the rest is well formed): the manifest
        # catches it.
        blob = pages.read_bytes()
        first = frames_of(blob)[0][1]
        dobj = zstandard.ZstdDecompressor().decompressobj()
        assert dobj.decompress(blob) == first
        keep = len(blob) - len(dobj.unused_data)
        write(pages, blob[:keep])
    elif what == "missing":
        pages.unlink()
    elif what == "raw-size":
        entries = [
            FileEntry(e.name, e.size, e.digest, e.raw_size + 1, e.codec)
            if e.name == pages.name
            else e
            for e in entries
        ]
    else:
        small = tmp_path / "store" / "core-1.img"
        write(small, b"Z" + small.read_bytes()[1:])
    with pytest.raises(IntegrityError) as info:
        decompress_dir(tmp_path / "store", tmp_path / "restore", entries)
    assert str(tmp_path / "store") in str(info.value)
    assert list((tmp_path / "restore").iterdir()) == []


@pytest.mark.parametrize(
    ("name", "codec"),
    [("../evil", "none"), ("a/b.zst", "zstd"), ("x.zst", "gzip"), (".zst", "zstd")],
)
def test_decompress_dir_refuses_bad_entries(tmp_path: Path, name: str, codec: str) -> None:
    (tmp_path / "store").mkdir()
    with pytest.raises(IntegrityError):
        decompress_dir(
            tmp_path / "store", tmp_path / "out", [FileEntry(name, 1, "0" * 64, 1, codec)]
        )


def test_compress_dir_refuses_name_clash(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "a", compressible_bytes(SMALL_FILE))
    write(tmp_path / "d" / "a.zst", b"small")
    with pytest.raises(StorageError, match="a.zst"):
        compress_dir(tmp_path / "d", tmp_path / "out", Codec("zstd", 1))


# --- streaming: memory stays flat -----------------------------------------------------------


class PeakRss:
    """Samples this process's RSS every few milliseconds while the block runs."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def test_memory_stays_flat_on_512_mib(tmp_path: Path) -> None:
    size = 512 << 20
    src = tmp_path / "pages-1.img"
    # Written 1 MiB at a time, alternating random and zero MiBs (zero runs decompress at
    # ~30000:1, the case that would balloon a decoder's output buffer).
    noise = random_bytes(1 << 20, 1)
    zeros = bytes(1 << 20)
    with src.open("wb") as fh:
        for i in range(size >> 20):
            fh.write(noise[i:] + noise[:i] if i % 2 else zeros)
    del noise, zeros
    # Bounded by what is in flight (a few frames per worker), not by the file's size.
    limit = (16 << 20) + 3 * FRAME_SIZE * WORKERS
    with PeakRss() as packing:
        csize, _ = compress_file(src, tmp_path / "p.zst", DEFAULT_LEVEL)
    assert csize < size * 0.6
    assert packing.growth < limit, f"compressing grew RSS by {packing.growth >> 20} MiB"
    src.unlink()
    with PeakRss() as unpacking:
        assert decompress_file(tmp_path / "p.zst", tmp_path / "out") == size
    assert unpacking.growth < limit, f"decompressing grew RSS by {unpacking.growth >> 20} MiB"


def test_format_1_manifests_with_sha256_still_verify(tmp_path: Path) -> None:
    from ccr.storage.manifest import (
        MANIFEST,
        StepManifest,
        load_step_manifest,
        verify_files,
        write_signed,
    )

    files = make_image_dir(tmp_path / "dump")
    entries = compress_dir(tmp_path / "dump", tmp_path / "store", Codec("zstd", 1))
    manifest = StepManifest(
        job_id=1, step_id=0, argv=["x"], cwd="/", output="/o", hostname="h", uid=0, gid=0,
        root_pid=1, pids=[1], criu_version="4", created=0.0, leave_running=True, files=entries,
    )  # fmt: skip
    old = manifest.to_dict()
    old["format"] = 1
    for entry in old["files"]:  # what ccr wrote before BLAKE3: a "sha256" per file
        del entry["digest"], entry["algorithm"]
        entry["sha256"] = hashlib.sha256(
            (tmp_path / "store" / entry["name"]).read_bytes()
        ).hexdigest()
    key = b"k" * 32
    write_signed(tmp_path / "store" / MANIFEST, old, key)
    loaded = load_step_manifest(tmp_path / "store", key)
    assert {e.algorithm for e in loaded.files} == {"sha256"}
    verify_files(tmp_path / "store", loaded)
    decompress_dir(tmp_path / "store", tmp_path / "restore", loaded.files)
    assert (tmp_path / "restore" / "pages-1.img").read_bytes() == files["pages-1.img"]
    # ... and a wrong SHA-256 is still caught.
    loaded.files[0].digest = "0" * 64
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        verify_files(tmp_path / "store", loaded)

    newer = manifest.to_dict()
    newer["format"] = 99
    write_signed(tmp_path / "store" / MANIFEST, newer, key)
    with pytest.raises(IntegrityError, match="format 99"):
        load_step_manifest(tmp_path / "store", key)
