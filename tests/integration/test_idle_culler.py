"""jupyterhub-idle-culler, run by the hub as the lab config's service (as in the example
configs), with short timeouts: a server nobody uses is stopped, and its job is cancelled; the
hub's log says the culler stopped it."""

from __future__ import annotations

import secrets

from .conftest import active_jobs, start_hub, stop_hub, wait_for

CULLER_HUB_PORT = 18800


def test_an_idle_server_is_culled_and_its_job_cancelled(lab, tmp_path):
    hub, process = start_hub(tmp_path, CULLER_HUB_PORT, secrets.token_hex(24), {
        "HUB_SCHEDULER": "slurm", "HUB_CULL_TIMEOUT": "20", "HUB_CULL_EVERY": "5",
    })
    try:
        hub.api("POST", "/users/bob")
        events, _ = hub.spawn("bob", "idle", options={"cpus": 1})
        assert events[-1].get("ready"), events
        assert len(active_jobs("bob")) == 1
        # Nobody touches it: stopped within the timeout plus a few culler cycles.
        assert wait_for(
            lambda: "idle" not in hub.api("GET", "/users/bob").json()["servers"], 90, 1
        ), hub.api("GET", "/users/bob").json()
        assert wait_for(lambda: not active_jobs("bob"), 30), active_jobs("bob")
        log = hub.log()
        assert "DELETE /hub/api/users/bob/servers/idle" in log and "idle-culler" in log
    finally:
        stop_hub(process)
