"""Reading a safetensors file's header without its tensors, and checking the file is whole.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the data. A copy cut short by a crash or a full disk keeps a
plausible header over missing bytes; these checks catch that before any tensor is read.
"""

from __future__ import annotations

import json
import os
import struct
from typing import BinaryIO


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
