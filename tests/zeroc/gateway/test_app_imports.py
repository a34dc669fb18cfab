"""The gateway's process holds no model: it must not import torch (some 230 MB of resident memory, measured by
`make run`'s smoke check: 84 MiB without it, 319 MiB once a sampling limit was imported from zeroc.sampling)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import zeroc.gateway.app, zeroc.gateway.command
from zeroc.cli import build_parser, serve
build_parser((serve,))  # what `zeroc serve gateway` parses with (zeroc.cli.main)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton", "transformers"))
print(heavy[:5])
"""


def test_the_gateway_and_its_command_import_no_torch():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", run.stdout
