"""Sample keys: the one rule for what a key may look like, checked wherever a key enters a store.

A sample key is `<shard stem>/<webdataset key>`, and the webdataset key is a tar member's name up
to its first dot, so a tar can carry any key: `../../x`, `/tmp/x`, control characters, bytes
that are not UTF-8. mmdit stores keys (manifest, cache headers) and tools turn them into file
names, so a key must read as a relative POSIX path that stays inside its shard:

- not empty, not absolute, no empty component (`a//b`, a trailing `/`), no `..` component;
- no backslash (a separator on Windows and to many tools), no control character (C0, DEL, C1:
  they hide in logs and end C strings), no lone surrogate (bytes that were not UTF-8, which
  JSON and Parquet cannot store as they came).

`.` components are allowed: `tar -C dir .` writes names like `./000001.jpg`, and they cannot
leave the shard. Keys are refused, never rewritten: a rewritten key could collide with another
sample's, and renaming keys already cached would duplicate their samples. Ingest counts a refused
sample under `bad_key`; the cache and the manifest raise on one (a bug upstream, not bad data).
"""

from __future__ import annotations

import re

BAD_KEY = "bad_key"
"""The reason ingest counts a sample with a refused key under."""

_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f]|(\\)|([\ud800-\udfff])")


def key_problem(key) -> str | None:
    """Why `key` is not a safe sample key (a short phrase), or None when it is."""
    if not isinstance(key, str):
        return f"not a string ({type(key).__name__})"
    if not key:
        return "empty key"
    if key.startswith("/"):
        return "absolute path"
    bad = _FORBIDDEN.search(key)
    if bad:
        what = "backslash" if bad.group(1) else "undecodable byte" if bad.group(2) else "control character"
        return f"{what} at {bad.start()}"
    parts = key.split("/")
    if "" in parts:
        return "empty component"
    if ".." in parts:
        return "'..' component"
    return None


def check_key(key: str) -> str:
    """`key` when it is safe, else ValueError naming it (repr: control characters stay visible)."""
    why = key_problem(key)
    if why is not None:
        raise ValueError(f"sample key {key!r}: {why}")
    return key
