"""Atomic file writes: every file mmdit publishes appears whole or not at all.

A writer writes `.tmp-<host>-<pid>-<rand>-<name>` beside the final path, fsyncs it, renames it
over the final name (atomic on POSIX) and fsyncs the directory. A process killed midway leaves
only a temp file, which no reader ever opens and `remove_stale_tmp` deletes once its writer is
gone. A full disk is reported as `DiskFullError` naming the file, and the temp file is removed
so the space comes back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from mmdit.utils.checksum import recording_alongside

TMP_PREFIX = ".tmp-"


class DiskFullError(OSError):
    """No space left on the device (or quota) while writing a file; the message names it."""


def host_id() -> str:
    """Host name plus PID namespace: containers on one node may share a host name, and a pid
    only means something inside its namespace (stale temp cleanup relies on it)."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
    try:
        return f"{host}{os.stat('/proc/self/ns/pid').st_ino:x}"
    except OSError:
        return host


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(path: str | os.PathLike) -> Path:
    """A fresh temp path beside `path`, named so that its writer can be identified."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{host_id()}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def _disk_full(e: BaseException, directory: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(e):  # a library's own error wrapping ENOSPC
        return True
    # torch.save reports a short write as "enforce fail at inline_container.cc ... unexpected pos",
    # safetensors as its own SafetensorError: judge by the free space left
    if isinstance(e, Exception):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(directory).free < (1 << 20)
    return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path`, on any error it is removed.
    Inside `utils.checksum.recording_checksums()` the file's size and CRC-32 are recorded."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        yield tmp
        with recording_alongside(tmp, path):
            if fsync:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = _disk_full(e, path.parent)  # before the temp file frees its space
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(errno.ENOSPC, f"no space left on device writing {path}") from e
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Iterable[bytes], fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp, open(tmp, "wb") as f:
        for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
            f.write(chunk)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), fsync)


def atomic_write_json(path: str | os.PathLike, obj, fsync: bool = True, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", fsync)


def atomic_torch_save(obj, path: str | os.PathLike, fsync: bool = True) -> None:
    import torch

    with atomic_path(path, fsync) as tmp:
        torch.save(obj, tmp)


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None,
                            fsync: bool = True) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, fsync) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def is_tmp(path: str | os.PathLike) -> bool:
    return Path(path).name.startswith(TMP_PREFIX)


def remove_stale_tmp(directory: str | os.PathLike, pattern: str = "**/.tmp-*", max_age_s: float = 3600.0) -> int:
    """Delete temp files of writers that are gone; returns how many.

    A temp file of this host whose writer pid is dead is removed at once; another host's (shared
    storage) or a live writer's only when older than `max_age_s`. This process's own are kept.
    """
    me, removed = host_id(), 0
    for tmp in Path(directory).glob(pattern):
        host, _, rest = tmp.name[len(TMP_PREFIX):].partition("-")
        pid = rest.partition("-")[0]
        try:
            if host == me and pid.isdigit() and int(pid) == os.getpid():
                continue
            writer_gone = host == me and pid.isdigit() and not pid_alive(int(pid))
            if writer_gone or time.time() - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
