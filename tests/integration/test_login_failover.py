"""Several login nodes (``login_hosts``) in the real lab: its second login host (``login2``,
``lab.add_login2``: own namespace, sshd and host key, the same Slurm and homes), and the first
one going down for the hub (its sshds stopped, its hub-side link down so every packet to it is
dropped), while a real hub with the tunnel service runs.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time

import pytest

from .conftest import (
    REPO,
    active_jobs,
    connect_kernel,
    execute,
    open_kernel,
    start_hub,
    stop_hub,
    wait_for,
)

LAB_CONFIG = REPO / "example_hub_config" / "lab_jupyterhub_config.py"
PORT = 29200
CONNECT_TIMEOUT = 8.0  # ssh_connect_timeout: bob's spawn may wait this long for login1
POLL = 5  # poll_interval: how soon alice's tunnel is seen down and moved


@pytest.fixture(scope="module")
def login2(lab):
    """The lab's second login host, up for this module (and the rest of the session)."""
    lab.add_login2()
    return lab


def _job_of(hub, user: str) -> str:
    state = hub.api("GET", f"/users/{user}").json()["servers"][""]["state"]
    return state["job_id"]


def _submit_host(hub, user: str) -> str:
    return hub.api("GET", f"/users/{user}").json()["servers"][""]["state"]["submit_host"]


def test_a_login_node_going_down_moves_new_spawns_running_tunnels_and_stops(login2, tmp_path):
    """Login1 goes down while alice's server runs (submitted through it): bob's new spawn goes
    through login2 within the connect timeout plus 5 s; alice's server answers again through
    login2 (the same kernel, its variable kept); her stop cancels her job through login2."""
    lab = login2
    hub, process = start_hub(tmp_path, PORT, secrets.token_hex(24), {
        "HUB_SCHEDULER": "slurm", "HUB_LOGIN_HOSTS": "login,login2",
        "HUB_SSH_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT), "HUB_POLL_INTERVAL": str(POLL)})
    down = False
    try:
        for user in ("alice", "bob"):
            hub.api("POST", f"/users/{user}")
        events, _ = hub.spawn("alice")
        assert events[-1].get("ready"), events
        assert _submit_host(hub, "alice") == "login"
        job = _job_of(hub, "alice")
        kernel_id, kernel = open_kernel(hub, "alice")
        assert execute(kernel, "x = 41; print('set')").strip() == "set"
        kernel.close()

        lab.login_host_down("login")
        down = True
        started = time.monotonic()
        events, _ = hub.spawn("bob")
        took = time.monotonic() - started
        assert events[-1].get("ready"), events
        assert _submit_host(hub, "bob") == "login2"
        assert took <= CONNECT_TIMEOUT + 5, f"bob's spawn took {took:.1f} s"
        print(f"bob's spawn with login1 down: ready in {took:.1f} s through login2")

        def alice_answers() -> bool:
            try:
                connection = connect_kernel(hub, "alice", kernel_id)
            except Exception:  # noqa: BLE001 - not yet moved
                return False
            try:
                return execute(connection, "x += 1; print(x)").strip() == "42"
            finally:
                connection.close()

        started = time.monotonic()
        assert wait_for(alice_answers, 60, 1), hub.log()[-4000:]
        print(f"alice's kernel answered again {time.monotonic() - started:.1f} s later")
        assert re.search(r"login node login:22 does not answer", hub.log())

        hub.stop("alice")
        assert wait_for(lambda: not any(line.split()[0] == job
                                        for line in active_jobs("alice")), 30), \
            active_jobs("alice")
        hub.stop("bob")
        assert wait_for(lambda: not active_jobs("bob"), 30), active_jobs("bob")
    finally:
        if down:
            lab.login_host_up("login")
        stop_hub(process)
        lab.stop_tunnel_service(tmp_path / "tunnels")
        for user in ("alice", "bob"):  # a failed test's jobs must not hold the node
            lab.in_namespace("login", ["scancel", f"--user={user}"], check=False)


def test_check_reports_each_login_node(login2, tmp_path):
    """``python -m hub_spawner check`` with two login nodes: a heading and the steps for each.
    With login1 down its steps fail and login2's pass, the summary says one of two pass, and
    ``--submit`` still runs its test job (through login2) and cleans up."""
    lab = login2
    config = tmp_path / "jupyterhub_config.py"
    config.write_text("\n".join([
        "c = get_config()", f"load_subconfig({str(LAB_CONFIG)!r})",
        "c.SSHBatchSpawner.login_hosts = ['login', 'login2']",
        f"c.SSHBatchSpawner.ssh_connect_timeout = {CONNECT_TIMEOUT}"]) + "\n")

    def check(*extra: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, HUB_STATE_DIR=str(tmp_path), HUB_SCHEDULER="slurm")
        return subprocess.run(
            [sys.executable, "-m", "hub_spawner", "check", "-f", str(config), "--user", "alice",
             *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)

    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\nlogin node login\n" in result.stdout and "\nlogin node login2\n" in result.stdout
    assert "2 of 2 login nodes pass (login, login2)" in result.stdout, result.stdout
    lab.login_host_down("login")
    try:
        result = check("--submit")
    finally:
        lab.login_host_up("login")
    output = result.stdout
    assert "Traceback" not in output + result.stderr, output + result.stderr
    assert result.returncode == 1, output + result.stderr
    assert "1 of 2 login nodes pass (login2)" in output, output
    assert re.search(r"^FAIL +reachable +.*login:22", output, re.MULTILINE), output
    for step in ("job", "tunnel", "server", "cleanup"):
        assert re.search(rf"^ok +{step} ", output, re.MULTILINE), output
    assert active_jobs("alice") == []
