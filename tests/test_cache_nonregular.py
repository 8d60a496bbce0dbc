"""The latent cache against directory entries that are not its segments: FIFOs, sockets, devices,
symlinks, directories, truncated and bit-flipped segments, stray files.

What must hold: nothing that reads the cache (the cache itself, `mmdit cache verify`, the
service's selection, the manifest) ever opens an entry that is not a regular file (a FIFO would
hang it); every such entry is named and counted; and `mmdit cache verify --repair` exiting 0
means a plain verify afterwards exits 0. FIFOs are watched (badfiles.FifoWatch), so a reader
that opens one fails its test instead of hanging the suite.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from badfiles import FifoWatch, make_char_device, make_socket_file

from mmdit.cache.store import LatentCache
from mmdit.launch.cache import main as cache_cli

FP = "fp_nonregular"
BUCKETS = ((16, 16), (32, 16))
STRAY_REASONS = ("stray", "not a regular file")


def records(prefix: str, n: int, bucket=(16, 16), seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"key": f"{prefix}{i}", "fingerprint": FP, "bucket": bucket, "task": "t2i", "caption": f"c{i}",
             "source": "s", "latents": torch.randn(16, bucket[0] // 8, bucket[1] // 8, generator=g),
             "prompt_embeds": torch.randn(1 + i % 3, 4, generator=g)} for i in range(n)]


def fill(cache_dir: Path) -> dict[str, list[str]]:
    """Three segments in two buckets; segment path -> its keys."""
    cache = LatentCache(cache_dir)
    cache.write(records("a", 3, BUCKETS[0], 1))
    cache.write(records("b", 3, BUCKETS[0], 2))
    cache.write(records("c", 2, BUCKETS[1], 3))
    out: dict[str, list[str]] = {}
    for key in cache.keys(FP):
        seg, _ = cache._locate(key, FP)
        out.setdefault(seg.path, []).append(key)
    return out


def verify(capsys, cache_dir: Path, *flags: str) -> tuple[int, dict]:
    """`mmdit cache verify` in-process: (exit code, report)."""
    capsys.readouterr()
    rc = cache_cli(["verify", str(cache_dir), *flags])
    return rc, json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- kinds of damage


class Damage:
    """Applies one kind of damage to a filled cache; remembers what a repair must keep."""

    def __init__(self, cache_dir: Path, segments: dict[str, list[str]], outside: Path, watch: FifoWatch,
                 rng: random.Random):
        self.dir, self.segments, self.outside, self.watch, self.rng = cache_dir, segments, outside, watch, rng
        self.touched: set[str] = set()
        """Segments whose bytes changed: their records may be lost."""
        self.outside_files: dict[Path, bytes] = {}
        """Files outside the cache that symlinks point at: a repair must leave them alone."""
        self.n = 0
        self.added: list[Path] = []
        """Entries added to bucket directories (not temp files): each must be named."""
        self.strays: list[Path] = []
        """Those of them that are no regular file named like a segment."""

    def bucket(self) -> Path:
        return self.dir / FP / "{}x{}".format(*self.rng.choice(BUCKETS))

    def entry(self, stem: str, segment_like: bool = True, stray: bool = True) -> Path:
        """A new path in a bucket directory, remembered as added (and stray)."""
        self.n += 1
        path = self.bucket() / (f"seg-{stem}-{self.n:06d}.safetensors" if segment_like else f"{stem}-{self.n}")
        self.added.append(path)
        if stray:
            self.strays.append(path)
        return path

    def a_segment(self) -> Path:
        return Path(self.rng.choice(sorted(self.segments)))

    def outside_segment(self) -> Path:
        other = self.outside / f"cache{self.n}"
        LatentCache(other).write(records("x", 2, BUCKETS[0], 9))
        (seg,) = other.glob(f"{FP}/*/seg-*.safetensors")
        self.outside_files[seg] = seg.read_bytes()
        return seg

    # each returns True when the cache is damaged (a plain verify must then fail)
    def truncate(self) -> bool:
        seg = self.a_segment()
        if not seg.is_file():  # already moved by an earlier damage of this trial
            return False
        data = seg.read_bytes()
        seg.write_bytes(data[:self.rng.randrange(len(data))])
        self.touched.add(str(seg))
        return True

    def flip(self) -> bool:
        seg = self.a_segment()
        if not seg.is_file():
            return False
        data = bytearray(seg.read_bytes())
        for _ in range(self.rng.randint(1, 8)):
            data[self.rng.randrange(len(data))] ^= self.rng.randint(1, 255)
        seg.write_bytes(bytes(data))
        self.touched.add(str(seg))
        return False  # a flip may land where it changes nothing that matters (header padding)

    def empty_segment(self) -> bool:
        self.entry("empty", stray=False).write_bytes(b"")
        return True

    def garbage_segment(self) -> bool:
        self.entry("garbage", stray=False).write_bytes(self.rng.randbytes(self.rng.randint(1, 5000)))
        return True

    def stray_file(self) -> bool:
        self.entry("notes.txt", segment_like=False).write_text("not a segment")
        return True

    def fifo_segment(self) -> bool:
        self.watch.make(self.entry("fifo"))
        return True

    def fifo_other(self) -> bool:
        self.watch.make(self.entry("fifo", segment_like=False))
        return True

    def socket_segment(self) -> bool:
        make_socket_file(self.entry("socket"))
        return True

    def device_segment(self) -> bool:
        path = self.entry("device")
        if make_char_device(path) is None:  # no CAP_MKNOD here: a socket is the same class
            make_socket_file(path)
        return True

    def undecodable_name(self) -> bool:
        """A stray whose name is not UTF-8 (the report must still print)."""
        self.n += 1
        path = self.bucket() / os.fsdecode(b"seg-\xff\xfe-%06d.safetensors" % self.n)
        path.write_bytes(b"junk")
        self.added.append(path)
        return True

    def dir_segment(self) -> bool:
        d = self.entry("dir")
        d.mkdir()
        (d / "seg-inner-000001.safetensors").write_bytes(self.a_segment_bytes())
        return True

    def dir_other(self) -> bool:
        self.entry("subdir", segment_like=False).mkdir()
        return True

    def symlink_outside(self) -> bool:
        self.entry("link").symlink_to(self.outside_segment())
        return True

    def symlink_inside(self) -> bool:
        self.entry("link").symlink_to(self.a_segment())
        return True

    def symlink_fifo(self) -> bool:
        self.n += 1
        fifo = self.watch.make(self.outside / f"fifo-{self.n}")
        self.entry("link").symlink_to(fifo)
        return True

    def symlink_dangling(self) -> bool:
        self.entry("link").symlink_to(self.outside / "does-not-exist")
        return True

    def symlink_dir(self) -> bool:
        self.entry("link").symlink_to(self.outside, target_is_directory=True)
        return True

    def tmp_fifo(self) -> bool:
        """A writer's temp name: never read, never damage (stale ones are removed by age)."""
        self.n += 1
        self.watch.make(self.bucket() / f".tmp-otherhost-1-abcdef01-seg-fifo-{self.n:06d}.safetensors")
        return False

    def a_segment_bytes(self) -> bytes:
        seg = self.a_segment()
        return seg.read_bytes() if seg.is_file() else b""


KINDS = [k for k in vars(Damage) if not k.startswith("_") and k not in
         ("bucket", "entry", "a_segment", "outside_segment", "a_segment_bytes")]


def check_repair_then_verify(capsys, cache_dir: Path, damage: Damage, damaged: bool) -> dict:
    """The contract of `verify --repair`; returns the plain verify's report before the repair."""
    rc, before = verify(capsys, cache_dir)
    if damaged:
        assert rc == 1, before
    rc, repaired = verify(capsys, cache_dir, "--repair")
    assert rc == 0, repaired
    rc, after = verify(capsys, cache_dir)
    assert rc == 0, (repaired, after)  # the contract: repair exit 0 => a plain verify passes
    # nothing healthy is lost: every record of an untouched segment is still there and intact
    kept = [k for seg, keys in damage.segments.items() if seg not in damage.touched for k in keys]
    cache = LatentCache(cache_dir)
    found, problems = cache.read_available(kept, FP)
    assert not problems and sorted(found) == sorted(kept)
    for path, data in damage.outside_files.items():  # links were moved, never their targets
        assert path.read_bytes() == data
    assert damage.watch.opened == [], "a FIFO was opened"
    return before


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_damage_is_named_and_repaired(tmp_path, capsys, kind):
    cache_dir, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    segments = fill(cache_dir)
    with FifoWatch() as watch:
        damage = Damage(cache_dir, segments, outside, watch, random.Random(kind))
        damaged = getattr(damage, kind)()
        before = check_repair_then_verify(capsys, cache_dir, damage, damaged)
    for path in damage.added:  # every foreign entry is named, and counted when it is no segment file
        assert str(path) in before["damaged_segments"], before
    assert before["strays"] == len(damage.strays), before
    for path in damage.strays:
        assert before["damaged_segments"][str(path)].startswith(STRAY_REASONS), before


def test_random_mixtures_of_damage_repair_to_a_cache_that_verifies(tmp_path, capsys):
    """Repair exit 0 implies a plain verify exits 0, over random mixtures of every kind."""
    for trial in range(24):
        rng = random.Random(trial)
        cache_dir, outside = tmp_path / f"cache{trial}", tmp_path / f"outside{trial}"
        outside.mkdir()
        segments = fill(cache_dir)
        with FifoWatch() as watch:
            damage = Damage(cache_dir, segments, outside, watch, rng)
            damaged = False
            for kind in rng.choices(KINDS, k=rng.randint(1, 5)):
                damaged |= getattr(damage, kind)()
            check_repair_then_verify(capsys, cache_dir, damage, damaged)


def test_a_repair_that_cannot_move_a_stray_does_not_exit_0(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    fill(cache_dir)
    (cache_dir / FP / "16x16" / "notes.txt").write_text("stray")
    (cache_dir / "quarantine").write_text("a file where the quarantine directory goes")
    rc, report = verify(capsys, cache_dir, "--repair")
    assert rc == 1 and str(cache_dir / FP / "16x16" / "notes.txt") in report["unrepaired"]
    assert verify(capsys, cache_dir)[0] == 1  # honest: the damage is still there


def test_readers_and_the_service_selection_never_open_a_fifo(tmp_path):
    """What `mmdit serve` reads at start-up: fingerprints, stages, the manifest, the selection."""
    from mmdit.cache.manifest import ManifestWriter, read_manifest
    from mmdit.dataservice.selection import build_selection, resolve_fingerprint, resolve_stages

    cache_dir = tmp_path / "cache"
    segments = fill(cache_dir)
    with ManifestWriter(cache_dir / "manifest") as manifest:
        manifest.add({"key": "a0", "status": "ok", "task": "t2i", "width": 16, "height": 16})
    with FifoWatch() as watch:
        watch.make(cache_dir / FP / "16x16" / "seg-fifo-000001.safetensors")
        watch.make(cache_dir / "manifest" / "part-99999999999999999999-fifo-00001.parquet")
        (cache_dir / "manifest" / "part-99999999999999999999-dir-00001.parquet").mkdir()
        os.symlink(cache_dir / "nowhere", cache_dir / "manifest" / "part-99999999999999999999-link-00001.parquet")
        (cache_dir / "fp_fifo_only" / "16x16").mkdir(parents=True)
        watch.make(cache_dir / "fp_fifo_only" / "16x16" / "seg-fifo-000001.safetensors")
        cache = LatentCache(cache_dir)
        assert cache.fingerprints() == [FP]  # a directory holding only a FIFO holds no segment
        fp = resolve_fingerprint(cache, "")
        stages = resolve_stages(cache, fp)
        selection, counts = build_selection(cache, stages)
        assert len(selection) == sum(len(k) for k in segments.values())
        assert counts["damaged"] == 1 and "fifo" in " ".join(cache.damage.values())
        assert read_manifest(cache_dir / "manifest")["key"].to_pylist() == ["a0"]
        assert sorted(cache.read_many(["a0", "b2"], FP)[i]["key"] for i in (0, 1)) == ["a0", "b2"]
        assert watch.opened == []


def test_a_segment_swapped_for_a_fifo_after_listing_is_never_read(tmp_path):
    """The check-then-open race: the descriptor itself is checked (fstat), not just the name."""
    from mmdit.utils.regular_files import NotRegularFile, open_regular

    cache_dir = tmp_path / "cache"
    fill(cache_dir)
    cache = LatentCache(cache_dir)
    seg = Path(cache.segment_paths(FP)[0])
    key = cache.keys(FP)[0]
    with FifoWatch() as watch:
        seg.unlink()
        watch.make(seg)  # listed and indexed as a segment a moment ago
        problems = cache.read_available([key], FP)[1]
        assert key in problems and "fifo" in str(problems[key])
        with pytest.raises(NotRegularFile, match="fifo"):
            os.close(open_regular(seg))
        assert watch.opened == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_segment_is_named_and_quarantined(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    fill(cache_dir)
    seg = Path(LatentCache(cache_dir).segment_paths(FP)[0])
    seg.chmod(0)
    rc, report = verify(capsys, cache_dir)
    assert rc == 1 and "Permission" in report["damaged_segments"][str(seg)]
    assert verify(capsys, cache_dir, "--repair")[0] == 0 and verify(capsys, cache_dir)[0] == 0


@pytest.mark.slow
def test_the_verify_command_names_a_fifo_instead_of_hanging(tmp_path, capsys):
    """`mmdit cache verify` as a user runs it, on a bare FIFO (no watcher): a reader that opens
    it blocks forever, which fails this test at its timeout instead of hanging the suite."""
    cache_dir = tmp_path / "cache"
    fill(cache_dir)
    fifo = cache_dir / FP / "16x16" / "seg-fifo-000001.safetensors"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "mmdit.launch.cli", "cache", "verify", str(cache_dir)]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1, plain.stderr
    report = json.loads(plain.stdout)
    assert "fifo" in report["damaged_segments"][str(fifo)] and report["strays"] == 1
    rc, repaired = verify(capsys, cache_dir, "--repair")
    assert rc == 0 and repaired["quarantined"] == [str(cache_dir / "quarantine" / FP / "16x16" / fifo.name)]
    assert verify(capsys, cache_dir)[0] == 0
