"""Following a JSONL log another process appends to (metrics.jsonl): each call returns only the
records written since the last one, so a reader that polls a long run reads each line once.

A log rewritten in place (a resumed trainer drops the lines after its checkpoint: a new file
renamed over the old one) is read again from its start, and the caller is told.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class JsonlTail:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._inode: int | None = None
        self._offset = 0

    def read(self) -> tuple[list[dict], bool]:
        """(new complete records, whether the file was rewritten since the last read: the records
        returned then are all of them, and what the caller kept from before is stale)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            restarted = self._inode is not None
            self._inode, self._offset = None, 0
            return [], restarted
        try:
            stat = os.fstat(fd)
            restarted = self._inode is not None and (stat.st_ino != self._inode or stat.st_size < self._offset)
            if restarted or self._inode is None:
                self._inode, self._offset = stat.st_ino, 0
            os.lseek(fd, self._offset, os.SEEK_SET)
            data = b""
            while chunk := os.read(fd, 1 << 20):
                data += chunk
        finally:
            os.close(fd)
        complete = data[:data.rfind(b"\n") + 1]  # an unterminated last line is still being written
        self._offset += len(complete)
        records = []
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a torn line (a writer killed mid-write): not a record
                continue
            if isinstance(record, dict):
                records.append(record)
        return records, restarted
