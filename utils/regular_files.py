"""Opening a file that must be a regular file, without ever blocking on something that is not.

A directory mmdit reads (the latent cache, a manifest) can hold entries that only look like its
files: a FIFO (opening it to read blocks until some writer comes, forever if none does), a
socket, a device (opening one can have effects: a terminal becomes the controlling one), a
directory, a symlink (to outside the directory, to a FIFO, to nothing). `open_regular` refuses
all of them, named:

- the entry is checked before it is opened (`lstat`), so a device or FIFO is never opened;
- the open itself cannot block or follow a link (`O_NONBLOCK`, `O_NOFOLLOW`, `O_NOCTTY`), and
  the descriptor is checked (`fstat`), so an entry swapped between the check and the open is
  caught too. O_NONBLOCK means nothing for a regular file's reads, so it stays set.
"""

from __future__ import annotations

import errno
import os
import stat

_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
_FLAGS = os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


class NotRegularFile(OSError):
    """An entry that is not a regular file where one is expected; the message names it and says
    what it is."""

    def __init__(self, path, kind: str):
        super().__init__(errno.EINVAL, f"{kind}, not a regular file", str(path))
        self.kind = kind


def kind_of(mode: int) -> str:
    """'regular file', 'directory', 'symlink', 'fifo', 'socket', 'character device', ..."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A descriptor of the regular file `path` (opened with `flags`; O_CREAT creates it), or
    NotRegularFile; other errors (missing, permission) as OSError. Never blocks, never follows
    a symlink in the last component."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    else:
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, kind_of(st.st_mode))
    try:
        fd = os.open(path, flags | _FLAGS, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a symlink since the lstat
            raise NotRegularFile(path, "symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, kind_of(st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(path: str | os.PathLike):
    """`open_regular` as a binary file object for reading."""
    return os.fdopen(open_regular(path), "rb")
