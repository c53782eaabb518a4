"""The suite collects on a machine the lab never touched (issue 26): no test module reads the
lab's users, files or the venv's extras at import or collection time. tests/without_lab.py makes
this machine look fresh for one collecting pytest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _collect(*paths: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "tests.without_lab", *paths],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_whole_suite_collects_without_the_lab():
    result = _collect("tests")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    collected = re.search(r"^(\d+) tests collected", result.stdout, re.MULTILINE)
    assert collected and int(collected.group(1)) > 1000, result.stdout[-2000:]


@pytest.mark.parametrize(("module", "said"), [
    ("import pwd\nALICE = pwd.getpwnam('alice')\n", "name not found: 'alice'"),
    ("from pathlib import Path\nCONF = Path('/etc/slurm/slurm.conf').read_text()\n",
     "the lab has not made it"),
    ("from playwright.sync_api import sync_playwright\n", "No module named 'playwright'"),
])
def test_a_module_that_reads_lab_state_at_import_fails_collection(tmp_path, module, said):
    """The check above can fail: each kind of import-time use stops collection."""
    path = tmp_path / "test_reads_the_lab.py"
    path.write_text(module + "\n\ndef test_nothing():\n    pass\n")
    result = _collect(str(path))
    assert result.returncode != 0, result.stdout
    assert said in result.stdout, result.stdout[-3000:]
