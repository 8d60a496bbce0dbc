"""Where the latent cache's files lie, and what else may lie there.

    <cache dir>/<fingerprint>/<H>x<W>/seg-<writer id>-<seq>.safetensors   published segments
    <cache dir>/<fingerprint>/<H>x<W>/.tmp-...                             a writer's unpublished file
    <cache dir>/quarantine/<fingerprint>/<H>x<W>/...                       what a repair moved away

Only mmdit writes a cache, and it publishes regular files by atomic rename, so anything else in
a bucket directory is a *stray*: a file not named like a segment, or an entry named like one
that is not a regular file (FIFO, socket, device, directory, symlink). A symlink is never
followed, even to a segment: it can lead out of the cache, to a FIFO, or nowhere. Strays are
told apart by their directory entries alone (no entry is opened), named, and skipped; a repair
moves them to quarantine/ like damaged segments, again without opening them. Writers' temp
files are neither (their writers may be alive; `remove_stale_tmp` deletes dead ones). The
directories themselves may be symlinks: a bucket on another disk is an operator's choice.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mmdit.utils.atomic import TMP_PREFIX
from mmdit.utils.regular_files import kind_of

QUARANTINE = "quarantine"
FINGERPRINT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
BUCKET_RE = re.compile(r"^\d+x\d+$")
SEGMENT_RE = re.compile(r"^seg-.*\.safetensors$")


@dataclass
class Listing:
    """One fingerprint's bucket directories, read entry by entry."""

    segments: list[str] = field(default_factory=list)
    """Regular files named like segments, sorted (what readers parse)."""
    strays: dict[str, str] = field(default_factory=dict)
    """Everything else but temp files: path -> what it is, sorted by path."""


def fingerprint_dirs(root: Path) -> list[str]:
    """Names of the directories under `root` that can hold a fingerprint's buckets."""
    return [name for name, _ in _subdirs(root, FINGERPRINT_RE) if name != QUARANTINE]


def list_fingerprint(root: Path, fingerprint: str) -> Listing:
    """Segments and strays of `fingerprint`'s bucket directories (none when it has none)."""
    out = Listing()
    for _, bucket in _subdirs(root / fingerprint, BUCKET_RE):
        try:
            with os.scandir(bucket) as it:
                entries = list(it)
        except FileNotFoundError:  # removed meanwhile
            continue
        except OSError as e:  # unreadable (permissions): nothing in it can be read
            out.strays[bucket] = f"unreadable directory ({e.strerror})"
            continue
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX):
                continue
            try:
                why = stray_reason(entry)
            except FileNotFoundError:  # removed meanwhile
                continue
            if why is None:
                out.segments.append(entry.path)
            else:
                out.strays[entry.path] = why
    out.segments.sort()
    out.strays = dict(sorted(out.strays.items()))
    return out


def stray_reason(entry: os.DirEntry) -> str | None:
    """None for a segment (a regular file named like one), else what the entry is."""
    if entry.is_file(follow_symlinks=False):  # the entry's own type: no open, no link followed
        return None if SEGMENT_RE.match(entry.name) else "stray file: not a cache file"
    kind = kind_of(entry.stat(follow_symlinks=False).st_mode)
    return f"not a regular file ({kind}): never {'followed' if kind == 'symlink' else 'opened'}"


def quarantine(root: Path, path: str) -> str:
    """Move the entry `path` to `root/quarantine/` under its relative path; returns where it went.

    The entry itself moves (a link, not its target; a FIFO without being opened). OSError when
    it cannot (the caller reports the entry as not repaired)."""
    dest = root / QUARANTINE / Path(path).relative_to(root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dest):  # one of that name was quarantined before
        dest = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, dest)
    except OSError as e:
        if e.errno != errno.EXDEV or not stat.S_ISREG(os.lstat(path).st_mode):
            raise
        shutil.move(path, dest)  # a regular file in a bucket directory linked to another disk
    return str(dest)


def _subdirs(parent: Path, name_re: re.Pattern) -> list[tuple[str, str]]:
    """(name, path) of the directories (or links to directories) in `parent` whose names match."""
    try:
        with os.scandir(parent) as it:
            entries = [e for e in it if name_re.match(e.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in entries:
        try:
            if e.is_dir():
                out.append((e.name, e.path))
        except OSError:  # a link loop, a vanished entry
            continue
    return sorted(out)
