"""Shard claims: two `mmdit produce` runs over the same shards split them instead of encoding
everything twice. A claim is a flock on `<cache>/.claims/<hash>.lock`, so a killed run's claims
vanish with it."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from mmdit.utils.regular_files import open_regular


class ShardClaims:
    """Exclusive claims on shards (flock on `<cache>/.claims/<hash>.lock`), held until released
    or until the process ends (a killed run's claims vanish with it). A lock path that is not a
    regular file (a FIFO, a symlink out of the cache) is refused by name, never opened."""

    def __init__(self, cache_dir: Path):
        self.dir = Path(cache_dir) / ".claims"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.held: list[int] = []

    def _path(self, url: str) -> Path:
        return self.dir / f"{hashlib.sha1(url.encode()).hexdigest()[:20]}.lock"

    def take(self, urls: list[str]) -> list[str]:
        """Claim what is free now; returns the claimed urls, in order."""
        mine = []
        for url in urls:
            fd = open_regular(self._path(url), os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.held.append(fd)
            mine.append(url)
        return mine

    def wait(self, urls: list[str]) -> None:
        """Block until nobody holds a claim on `urls` (their runs finished or died)."""
        for url in urls:
            fd = open_regular(self._path(url), os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            finally:
                os.close(fd)

    def release(self) -> None:
        for fd in self.held:
            os.close(fd)
        self.held = []
