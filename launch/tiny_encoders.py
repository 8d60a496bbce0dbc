"""`mmdit make-tiny-encoders DIR`: write tiny random-weight Qwen-Image encoders (producer/tiny_encoders.py)."""

import sys

from mmdit.producer.tiny_encoders import make_tiny_encoders


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: mmdit make-tiny-encoders DIR", file=sys.stderr)
        return 2
    out = make_tiny_encoders(argv[0])
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote tiny Qwen-Image encoders to {out} ({size / 2**20:.1f} MiB)")
    return 0
