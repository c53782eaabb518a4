"""Importing the package is quiet: asyncssh's five DSA deprecation warnings are silenced where we
import it (hub_spawner/sshlib.py), and nothing else is."""

from __future__ import annotations

import subprocess
import sys

QUIET_IMPORT = ("import hub_spawner.check, hub_spawner.identity, hub_spawner.spawner, "
                "hub_spawner.ssh")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True,
                          text=True, timeout=120)


def test_importing_the_package_prints_no_warning():
    result = _python(QUIET_IMPORT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_the_check_command_starts_without_a_warning():
    result = subprocess.run([sys.executable, "-m", "hub_spawner", "check", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and result.stderr == ""


def test_only_the_import_is_silenced_other_warnings_still_show():
    """The filter is gone after the import: a DSA warning raised later, and any other
    warning, still reach stderr."""
    result = _python(
        QUIET_IMPORT + "\n"
        "import warnings\n"
        "from cryptography.utils import CryptographyDeprecationWarning\n"
        "warnings.warn('DSA is deprecated (later use)', CryptographyDeprecationWarning)\n"
        "warnings.warn('another deprecation', DeprecationWarning)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "DSA is deprecated (later use)" in result.stderr
    assert "another deprecation" in result.stderr


def test_asyncssh_imported_directly_does_warn():
    """The check above can fail: without our import, asyncssh's own import warns."""
    result = _python("import asyncssh")
    assert "CryptographyDeprecationWarning: DSA is deprecated" in result.stderr
