"""Triton is optional (the CPU image has none): without it the command line, the services and a greedy
generation on the bundled model still work, on the PyTorch references."""

from __future__ import annotations

import subprocess
import sys

# Python treats a None entry in sys.modules as a module that cannot be imported: `import triton` raises
# ImportError, as on a machine without the package.
SCRIPT = """
import sys
sys.modules["triton"] = sys.modules["triton.language"] = None
import torch
from zeroc.cli import build_parser
build_parser()
import decode_service.server, prefill_service.server, zeroc.gateway.app
from zeroc.config import BUNDLED_MODEL, CacheConfig
from zeroc.engine import Engine, SamplingParams
from zeroc.loader import load_model
loaded = load_model(BUNDLED_MODEL)
ids = loaded.tokenizer.encode("The built-in function")
[got] = Engine(loaded, CacheConfig()).generate([ids], SamplingParams(max_new_tokens=4, ignore_eos=True))
assert "triton" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
print(" ".join(map(str, got.token_ids)))
"""


def test_cli_services_and_generation_import_and_run_without_triton(bundled):
    from zeroc.config import CacheConfig
    from zeroc.engine import Engine, SamplingParams

    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    ids = bundled.tokenizer.encode("The built-in function")
    [want] = Engine(bundled, CacheConfig()).generate([ids], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert run.stdout.split() == [str(t) for t in want.token_ids]
