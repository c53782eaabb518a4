"""A login shell that prints (issue 28): alice's ``~/.bashrc`` says hello on stdout and loads
modules on stderr, as login nodes' start-up files do. Before the fix every Slurm spawn failed
with "sbatch printed no job id (output: 'Welcome ...\\n82')" and every Grid Engine status was
"unreadable qstat -xml output". Now each command runs between markers of its own (``Frame``)
and only what it printed there is parsed: the spawn form's load, submit, status, the output
follower, SFTP, the tunnel service's masters, the stop's cancel, and ``check``, on all three
schedulers."""

from __future__ import annotations

import pwd
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import active_jobs, login, run_in_kernel, wait_for
from .test_browser import PASSWORDS
from .test_check import line, run_check, write_config

BANNER = "Welcome to the login node. Quota: 12% used."
MODULES = "module: loaded gcc/12"


@pytest.fixture
def noisy_alice(lab):
    """Two lines at the top of alice's ~/.bashrc (bash reads it for ssh commands too), put
    back as they were afterwards; checked with OpenSSH to print on both streams."""
    bashrc = Path(pwd.getpwnam("alice").pw_dir) / ".bashrc"
    before = bashrc.read_bytes() if bashrc.exists() else None
    bashrc.write_text(f'echo "{BANNER}"\necho "{MODULES}" >&2\n'
                      + (before or b"").decode())
    try:
        said = subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", str(lab.LAB_DIR / "keys" / "alice"),
             "-o", f"UserKnownHostsFile={lab.KNOWN_HOSTS}", "-o", "BatchMode=yes",
             f"alice@{lab.LOGIN_IP}", "true"], capture_output=True, text=True, timeout=30)
        assert BANNER in said.stdout and MODULES in said.stderr, said
        yield
    finally:
        if before is None:
            bashrc.unlink()
        else:
            bashrc.write_bytes(before)


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "torque"])
def test_every_command_works_when_the_login_shell_prints(hub_for, noisy_alice, scheduler):
    hub = hub_for(scheduler)
    since = len(hub.log())
    form = login(hub, "alice", PASSWORDS["alice"]).get(f"{hub.url}/hub/spawn", timeout=60).text
    assert "Free on the cluster now" in form, form[-2000:]  # the load was read

    events, _ = hub.spawn("alice", timeout=180)
    assert events[-1].get("ready"), events
    assert run_in_kernel(hub, "alice", "print(6 * 7)").strip() == "42"  # through the masters
    # A few status cycles while it runs (the test hubs poll every few seconds): the server
    # stays up; a status read as unknown or ended would show in the log checked below.
    time.sleep(12)
    assert hub.api("GET", "/users/alice").json()["servers"][""]["ready"]
    hub.stop("alice")
    assert wait_for(lambda: not active_jobs("alice", scheduler), 30)
    log = hub.log()[since:]
    for broken in ("unreadable", "printed no job id", "cannot tell whether", "Traceback"):
        assert broken not in log, log[-3000:]
    assert BANNER not in log  # the banner is never taken for an answer, nor logged as one


def test_check_passes_when_the_login_shell_prints(lab, noisy_alice, tmp_path):
    code, output = run_check(tmp_path, write_config(tmp_path), "--submit")
    assert code == 0, output
    for step in ("login", "scheduler", "job", "tunnel", "server", "cleanup"):
        line(output, "ok", step)
    assert active_jobs("alice") == []
