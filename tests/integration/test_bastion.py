"""A bastion (``jump_host``) in front of the login node, in the real lab (``lab.add_bastion``:
its own namespace, sshd and host key, linked to the hub and to the login host only). While
the test runs, the hub's own link to the login host is down and the login host's hub-side
sshds are stopped: every connection of the hub, of the tunnel service and of ``check`` goes
through the bastion, or nowhere.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys

import pytest

from .conftest import (
    REPO,
    active_jobs,
    execute,
    open_kernel,
    processes_on,
    start_hub,
    start_proxy,
    stop_hub,
    wait_for,
)

PORT = 29300  # proxy; +1 its API; +81 the hub
LAB_CONFIG = REPO / "example_hub_config" / "lab_jupyterhub_config.py"


@pytest.fixture
def behind_bastion(lab):
    """The bastion up; the hub cut off from the login host for the test's length."""
    lab.add_bastion()
    lab.login_host_down("login")
    try:
        yield lab
    finally:
        lab.login_host_up("login")


@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=["TERM"])
def test_spawn_kernel_restart_and_stop_through_the_bastion(behind_bastion, tmp_path, signum):
    """Spawn, a kernel, a hub restart with its websocket open (the same connection keeps
    running code), and a stop that ends the job: all through the bastion. The tunnel
    service's masters for alice are hers on the bastion and, through it, on the login host."""
    lab = behind_bastion
    proxy_token = secrets.token_hex(24)
    env = {"HUB_KEEP_SERVERS": "1", "CONFIGPROXY_AUTH_TOKEN": proxy_token,
           "HUB_SCHEDULER": "slurm", "HUB_LOGIN_HOSTS": "login", "HUB_JUMP_HOST": lab.BASTION_IP}
    proxy = start_proxy(PORT, proxy_token, tmp_path)
    process = None
    try:
        token = secrets.token_hex(24)
        hub, process = start_hub(tmp_path, PORT, token, env)
        hub.api("POST", "/users/alice")
        events, _ = hub.spawn("alice")
        assert events[-1].get("ready"), events
        assert any("Connected to login as alice" in e.get("message", "") for e in events)
        # alice is logged in on the bastion (the hub's connection, the service's master).
        assert processes_on("bastion", "alice", "sshd")
        kernel_id, kernel = open_kernel(hub, "alice")
        assert execute(kernel, "x = 41; print('set')").strip() == "set"
        process.send_signal(signum)
        process.wait(timeout=60)
        assert execute(kernel, "x += 1; print(x)").strip() == "42"
        hub, process = start_hub(tmp_path, PORT, token, env)
        assert execute(kernel, "print(x)").strip() == "42"
        kernel.close()
        job = active_jobs("alice")
        assert len(job) == 1, job
        hub.stop("alice")
        assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")
    finally:
        if process is not None:
            stop_hub(process)
        lab.stop_pid(proxy.pid)
        lab.stop_tunnel_service(tmp_path / "tunnels")
        lab.in_namespace("login", ["scancel", "--user=alice"], check=False)  # kept servers'
        assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")


def test_check_goes_through_the_bastion(behind_bastion, tmp_path):
    """``check --submit`` behind the bastion: the bastion's reachability and host key, then
    the login (the login host's key checked through it), the scheduler and a test job."""
    config = tmp_path / "jupyterhub_config.py"
    config.write_text("\n".join([
        "c = get_config()", f"load_subconfig({str(LAB_CONFIG)!r})",
        "c.SSHBatchSpawner.login_hosts = ['login']",
        f"c.SSHBatchSpawner.jump_host = {behind_bastion.BASTION_IP!r}"]) + "\n")
    env = dict(os.environ, HUB_STATE_DIR=str(tmp_path), HUB_SCHEDULER="slurm")
    result = subprocess.run(
        [sys.executable, "-m", "hub_spawner", "check", "-f", str(config), "--user", "alice",
         "--submit"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert re.search(r"^ok +reachable +10\.77\.4\.2:22 answers", output, re.MULTILINE), output
    assert re.search(r"^ok +login +logged in as alice on login through the bastion 10\.77\.4\.2",
                     output, re.MULTILINE), output
    assert active_jobs("alice") == []
