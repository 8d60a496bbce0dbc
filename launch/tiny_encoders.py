"""`mmdit make-tiny-encoders DIR`: write tiny random-weight Qwen-Image encoders (producer/tiny_encoders.py)."""

from mmdit.launch.args import Action, Command, parse

COMMAND = Command("make-tiny-encoders", __doc__, actions=(Action(
    paths={"DIR": "where to write vae/, text_encoder/, tokenizer/, processor/ (the Qwen-Image layout)"},
    overrides=None),))


def main(argv: list[str]) -> int:
    from mmdit.producer.tiny_encoders import make_tiny_encoders

    out = make_tiny_encoders(parse(COMMAND, argv).paths[0])
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote tiny Qwen-Image encoders to {out} ({size / 2**20:.1f} MiB)")
    return 0
