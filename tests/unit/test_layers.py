"""The architecture, enforced: who may import what (docs/architecture.md, "Layers").

The rules are import-linter contracts in pyproject.toml (`[tool.importlinter]`); they follow
imports transitively, so a layer cannot reach a forbidden package through another module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the tree analysed is `src`, not whatever copy of the package is installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_every_layering_contract_is_kept():
    out = lint_imports(ROOT / "src")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_a_service_importing_redis_itself_breaks_a_contract(tmp_path):
    # The contracts are live: the same check fails on a copy of the tree with one shortcut in it.
    shutil.copytree(ROOT / "src" / "rustic_ai" / "k8s", tmp_path / "rustic_ai" / "k8s",
                    ignore=shutil.ignore_patterns("__pycache__"))
    host = tmp_path / "rustic_ai" / "k8s" / "host" / "address.py"
    host.write_text(host.read_text() + "\nimport redis  # a shortcut around the registry\n")
    out = lint_imports(tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rustic_ai.k8s.host is not allowed to import redis" in out.stdout
    assert "rustic_ai.k8s.host.address -> redis" in out.stdout
