"""A cancel that could not be sent survives a hub restart: login node down, stop, hub restart,
login node back, and the job is cancelled (by the tunnel service, which keeps the cancel on
disk; the restarted hub remembers nothing of it). Real hub, sshd, Slurm and tunnel service."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal

from hub_spawner.tunnels.client import TunnelClient

from .conftest import active_jobs, processes_on, start_hub, stop_hub, wait_for

PORT = 29000


def test_a_cancel_sent_during_a_login_node_outage_survives_a_hub_restart(lab, tmp_path):
    tunnels = TunnelClient(tmp_path / "tunnels")
    hub, process = start_hub(tmp_path, PORT, secrets.token_hex(24))
    sshd_down = False
    job_id = ""
    try:
        hub.api("POST", "/users/alice")
        events, _ = hub.spawn("alice")
        assert events[-1].get("ready"), events
        job_id = active_jobs("alice")[0].split()[0]

        lab.stop_sshd()
        sshd_down = True
        # Its sessions too (the hub's pooled connection, the tunnel service's master): with
        # the listener gone, the login node is unreachable.
        for pid in processes_on("login", "alice", "sshd"):
            os.kill(pid, signal.SIGTERM)
        hub.stop("alice")  # stop() cannot reach the login node
        assert any(line.startswith(job_id + " ") for line in active_jobs("alice"))
        handed = asyncio.run(tunnels.cancels())
        assert any(f"job {job_id} " in label for label in handed), handed
        assert "the tunnel service also retries the cancel" in hub.log()

        stop_hub(process)  # the hub's in-memory retrier ends with it
        hub, process = start_hub(tmp_path, PORT, secrets.token_hex(24))
        lab.start_sshd()
        sshd_down = False
        assert wait_for(lambda: not active_jobs("alice"), 40), active_jobs("alice")
        assert asyncio.run(tunnels.cancels()) == []
        service_log = (tmp_path / "tunnels" / "service.log").read_text()
        assert f"cancelled job {job_id} " in service_log, service_log[-2000:]
    finally:
        if sshd_down:
            lab.start_sshd()
        stop_hub(process)
        lab.stop_tunnel_service(tmp_path / "tunnels")
        if job_id:
            lab.in_namespace("login", ["scancel", job_id], check=False)
