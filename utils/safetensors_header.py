"""Reading a safetensors file's header without its tensors, and checking the file is whole.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the data. A copy cut short by a crash or a full disk keeps a
plausible header over missing bytes; these checks catch that before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

IDENTITY_SAMPLE_BYTES = 4096  # bytes hashed at each tensor's head, middle and tail


def read_header(source: str | os.PathLike | BinaryIO) -> tuple[dict, int, int]:
    """(header, offset where the data starts, file size); ValueError if the header is cut short.

    `source`: a path, or a binary file already open (a caller that must check what it opened,
    see utils/regular_files.py), read from its start."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return read_header(f)
    size = os.fstat(source.fileno()).st_size
    source.seek(0)
    head = source.read(8)
    if len(head) < 8:
        raise ValueError(f"truncated ({size} bytes): no header")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise ValueError(f"header of {n} bytes in a {size}-byte file")
    header = json.loads(source.read(n))
    return header, 8 + n, size


def data_end(header: dict, start: int) -> int:
    """Where the last tensor's bytes end: a whole file is at least this long."""
    return start + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)


def safetensors_identity(path: Path) -> str:
    """Hash of a safetensors file's header and of 3 samples (head, middle, tail) of every tensor."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        h.update(header)
        for name, info in sorted(json.loads(header).items()):
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            middle = max(begin, (begin + end) // 2 - IDENTITY_SAMPLE_BYTES // 2)
            for offset in sorted({begin, middle, max(begin, end - IDENTITY_SAMPLE_BYTES)}):
                f.seek(8 + n + offset)
                h.update(f.read(min(IDENTITY_SAMPLE_BYTES, end - offset)))
    return h.hexdigest()
