"""A hub restart (cleanup_servers = False) keeps the job, and the spawner re-opens both tunnels
on their old ports, so the proxy's route and the server's hub API URL stay valid."""

from __future__ import annotations

import re
import secrets

from .conftest import active_jobs, start_hub, stop_hub, wait_for

PORT = 28000


def test_server_survives_a_hub_restart_through_reopened_tunnels(lab, tmp_path):
    token = secrets.token_hex(24)
    env = {"HUB_KEEP_SERVERS": "1"}
    hub, process = start_hub(tmp_path, PORT, token, env)
    try:
        hub.api("POST", "/users/alice")
        events, _ = hub.spawn("alice", "restart")
        assert events[-1].get("ready"), events
        tunnel_port = re.findall(r"Tunnel open: hub port (\d+)", hub.log())[-1]
        job = active_jobs("alice")
        assert len(job) == 1, job
    finally:
        stop_hub(process)
    # The hub (and its proxy) are gone; the job is not.
    assert active_jobs("alice") == job

    hub, process = start_hub(tmp_path, PORT, token, env)
    try:
        status = hub.get("/user/alice/restart/api/status")
        assert status.status_code == 200, status.text
        log = hub.log().split("Running JupyterHub version")[-1]
        reopened = rf"alice:restart: re-opened the tunnel: hub port {tunnel_port} -> compute:"
        assert re.search(reopened, log)
        assert "alice:restart: re-opened the hub API tunnel" in log
        # The server still talks to the hub through the re-opened reverse tunnel.
        run = hub.api_server("POST", "alice", "/api/kernels", server="restart", json={})
        assert run.status_code == 201
        hub.stop("alice", "restart")
        assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")
    finally:
        stop_hub(process)
