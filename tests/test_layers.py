"""The package layers import downward only (the contract in pyproject.toml), and Hugging Face's `kernels`
distribution is not shadowed by this project's kernels/ folder."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_lint_imports_keeps_the_layers_contract():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a dev dependency"
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_kernels_folder_is_not_the_top_level_kernels_module():
    spec = importlib.util.find_spec("zeroc_kernels")
    assert spec is not None and Path(spec.origin).parent == ROOT / "kernels"
    other = importlib.util.find_spec("kernels")
    assert other is None or Path(other.origin).parent != ROOT / "kernels"


def test_the_config_layer_imports_no_torch_and_nothing_else_of_the_project():
    code = ("import sys, zeroc.config; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'triton', 'numpy', 'zeroc_kernels', 'kv_store') or (m.startswith('zeroc.') and not "
            "m.startswith('zeroc.config'))); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
