"""Socket mode (``server_transport = "socket"``): no open port on the compute node.

The server listens on a Unix socket in a 0700 directory of alice's on the compute host, and the
tunnel service reaches it through a second SSH hop: its master to the login host carries a
stdio forward to the compute host's own sshd (``tests/lab/lab.py`` starts one; the hub cannot
reach it directly). All through the real parts: JupyterHub, configurable-http-proxy, the tunnel
service's OpenSSH masters, both sshds, and each of the three schedulers.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import stat
import subprocess

import pytest

from hub_spawner.tunnels.client import TunnelClient

from .conftest import SCHEDULERS, active_jobs, execute, open_kernel, processes_on, wait_for


def _tcp_listener_owners(lab) -> dict[str, int]:
    """Every TCP listener on the compute host (``ss -ltnp``) -> the uid of its process."""
    owners = {}
    for row in lab.in_namespace("compute", ["ss", "-Hltnp"]).stdout.splitlines():
        for pid in re.findall(r"pid=(\d+)", row):
            try:
                owners[row.split()[3]] = os.stat(f"/proc/{pid}").st_uid
            except OSError:
                pass
    return owners


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_socket_mode_serves_through_the_node_hop_with_no_port_open_on_the_node(
        scheduler, hub_for, lab):
    hub = hub_for(scheduler)
    alice = pwd.getpwnam("alice").pw_uid
    events, _ = hub.spawn("alice", "socket")
    messages = [event.get("message", "") for event in events]
    assert events[-1].get("ready"), messages
    try:
        state = hub.api("GET", "/users/alice").json()["servers"]["socket"]["state"]
        path = state["remote_socket"]
        assert state["remote_port"] == 0 and path.endswith("/server.sock"), state
        assert any(m.startswith("Tunnel open") and path in m for m in messages), messages

        # The socket and its directory: alice's, 0600 in 0700 (the hosts share one filesystem).
        directory = os.path.dirname(path)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert os.stat(directory).st_uid == alice == os.stat(path).st_uid

        # No TCP listener of alice's on the compute host; the Unix socket is listening.
        owners = _tcp_listener_owners(lab)
        assert owners and alice not in owners.values(), owners  # root's sshd/slurmd are there
        unix = lab.in_namespace("compute", ["ss", "-Hlx"]).stdout
        assert path in unix, unix

        # The tunnel service reaches it through a master to the node via the login node's.
        forwards = asyncio.run(TunnelClient(hub.log_path.parent / "tunnels").forwards())
        forward = forwards["alice/socket"]
        assert forward["destination"] == path and forward["up"], forward
        # The scheduler's name for the node: Grid Engine knows the lab's by its full name.
        node = lab.COMPUTE_FQDN if scheduler == "sge" else "compute"
        assert forward["login"].startswith(f"alice@{node}:22 via alice@10.77.1.2:"), forward
        assert processes_on("compute", "alice", "sshd"), "no node-hop session on compute"

        # Through the proxy, the hub-side tunnel and both hops: the API and a kernel.
        assert hub.get("/user/alice/socket/api/status").status_code == 200
        kernel_id, connection = open_kernel(hub, "alice", "socket")
        try:
            output = execute(connection, "import os, socket; print(socket.gethostname(), "
                                         "os.getuid())")
        finally:
            connection.close()
        assert output.split() == ["compute", str(alice)]
        hub.api_server("DELETE", "alice", f"/api/kernels/{kernel_id}", server="socket")
    finally:
        hub.stop("alice", "socket")
    assert wait_for(lambda: not active_jobs("alice", scheduler), 30), active_jobs("alice",
                                                                                   scheduler)
    # Nothing left: the socket's directory, the node-hop SSH session, the forward.
    assert wait_for(lambda: not os.path.exists(directory), 20), directory
    assert wait_for(lambda: not processes_on("compute", "alice", "sshd"), 20)
    forwards = asyncio.run(TunnelClient(hub.log_path.parent / "tunnels").forwards())
    assert "alice/socket" not in forwards, forwards


def test_socket_mode_refuses_a_node_whose_host_key_is_unknown_and_cancels_the_job(hub, lab):
    events, _ = hub.spawn("alice", "socket-unknown-node-key")
    assert events[-1].get("failed"), events
    message = events[-1]["message"]
    assert "Host key verification failed" in message, message
    assert "compute's host key must be in" in message and "known_hosts-login-only" in message
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")
    assert wait_for(lambda: not processes_on("compute", "alice", "sshd"), 20)
    # The server the job started is gone with the job (its socket directory with it).
    leftover = subprocess.run(["pgrep", "-u", "alice", "-f", "jupyterhub-singleuser"],
                              capture_output=True, text=True).stdout
    assert wait_for(lambda: not subprocess.run(
        ["pgrep", "-u", "alice", "-f", "jupyterhub-singleuser"]).returncode == 0, 20), leftover


def test_the_listener_check_above_does_see_a_tcp_listener_of_alice(lab):
    """The control for the "no TCP listener of alice's" assertion: one she opens is found."""
    alice = pwd.getpwnam("alice").pw_uid
    listener = subprocess.Popen(
        ["nsenter", "--net=/run/netns/hsl-compute", "setpriv", f"--reuid={alice}",
         f"--regid={pwd.getpwnam('alice').pw_gid}", "--clear-groups", "/usr/bin/python3", "-c",
         "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
         "time.sleep(60)"])
    try:
        assert wait_for(lambda: alice in _tcp_listener_owners(lab).values(), 10), (
            _tcp_listener_owners(lab))
    finally:
        listener.kill()
        listener.wait()
