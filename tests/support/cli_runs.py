"""Running the `zeroc` command in tests: in a child process (`zeroc`), or in this one (`zeroc_here`)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from zeroc.cli import main


def zeroc(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeroc.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def zeroc_here(capsys, *args: str) -> SimpleNamespace:
    """Run the command in this process (no torch start-up per call) -> returncode, stdout, stderr."""
    code = main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
