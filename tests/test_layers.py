"""The layers hold: the import contracts in .importlinter (commands > services > cache > parallel >
model > config > utils; only `mmdit serve` imports the coordinator; no cycles) are kept."""

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True) == 0


def test_commands_live_in_launch():
    """Every `main()` and argv parser is a command, and commands live in launch/."""
    outside = [str(p.relative_to(ROOT)) for pkg in ("utils", "config", "model", "parallel", "cache", "producer",
                                                    "dataservice", "consumer")
               for p in (ROOT / pkg).rglob("*.py")
               if "\ndef main(" in p.read_text() or "argparse" in p.read_text()]
    assert outside == []
