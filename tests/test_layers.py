"""The layers hold: the import contracts in .importlinter (commands > services > cache > parallel >
model > config > utils; only `mmdit serve` imports the coordinator; no cycles) are kept."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    # In a process of its own: import-linter disables every logger that exists when it runs.
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_commands_live_in_launch():
    """Every `main()` and argv parser is a command, and commands live in launch/."""
    outside = [str(p.relative_to(ROOT)) for pkg in ("utils", "config", "model", "parallel", "cache", "producer",
                                                    "dataservice", "consumer")
               for p in (ROOT / pkg).rglob("*.py")
               if "\ndef main(" in p.read_text() or "argparse" in p.read_text()]
    assert outside == []
