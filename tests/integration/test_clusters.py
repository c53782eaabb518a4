"""Several clusters behind one hub (``clusters``, ``HUB_MULTI_CLUSTER=1`` in the lab config):
the lab's Slurm for everyone and its Grid Engine for the group ``grid-engine`` (alice), each
with its own scheduler and choices, on one form; the chosen cluster runs the job."""

from __future__ import annotations

import pytest

from .conftest import active_jobs, login, wait_for
from .test_browser import PASSWORDS, logged_in, submit


@pytest.fixture(scope="module")
def clusters_hub(hub_for):
    return hub_for("clusters")


def test_each_user_sees_only_their_clusters_with_each_ones_own_choices_and_load(clusters_hub):
    alice = login(clusters_hub, "alice", PASSWORDS["alice"]).get(
        f"{clusters_hub.url}/hub/spawn", timeout=60).text
    bob = login(clusters_hub, "bob", PASSWORDS["bob"]).get(
        f"{clusters_hub.url}/hub/spawn", timeout=60).text
    for fragment in ('name="cluster"', 'value="slurm" checked', 'name="slurm--partition"',
                     'name="sge--partition"', "Lab Grid Engine", "all.q", "debug"):
        assert fragment in alice, fragment
    assert 'name="slurm--partition"' in bob and "sge--" not in bob
    assert "Lab Grid Engine" not in bob


def test_a_cluster_the_user_may_not_use_is_refused_and_nothing_is_submitted(clusters_hub):
    events, _ = clusters_hub.spawn("bob", options={"cluster": "sge", "cpus": 1})
    assert events[-1].get("failed"), events
    assert "Cluster 'sge' is not offered to you. Choose one of: slurm." in events[-1]["message"]
    assert active_jobs("bob", "sge") == [] and active_jobs("bob") == []


def test_alice_chooses_grid_engine_in_the_browser_and_her_job_runs_there(clusters_hub):
    """The form's cluster choice in a real browser: Grid Engine's part opens (its script), its
    preset is posted, and the job is Grid Engine's, not Slurm's; stop cancels it there."""
    hub = clusters_hub
    with logged_in(hub, "alice") as page:
        # The script shows only the chosen cluster's part: Slurm's, the first, at first.
        assert page.is_visible("#hub-spawner-slurm--presets")
        assert not page.is_visible("#hub-spawner-sge--presets")
        page.check("#hub-spawner-cluster-sge")
        assert wait_for(lambda: page.is_visible("#hub-spawner-sge--presets"), 5)
        assert not page.is_visible("#hub-spawner-slurm--presets")
        assert page.is_checked("#hub-spawner-sge--preset-small")
        submit(page)  # Grid Engine's first preset ("Small")
        page.wait_for_url("**/user/alice/lab**", timeout=150_000)
    try:
        jobs = active_jobs("alice", "sge")
        assert len(jobs) == 1, jobs
        assert active_jobs("alice") == []  # nothing on Slurm
        server = hub.api("GET", "/users/alice").json()["servers"][""]
        state = server["state"]
        assert (state["cluster_key"], state["scheduler"], state["cluster"]) == (
            "sge", "sge", "lab (sge)"), state
        assert state["job_id"] == jobs[0].split()[0]
        assert server["user_options"]["cluster"] == "sge"
        assert server["user_options"]["profile"] == "Lab Grid Engine · Small", server
        assert hub.api_server("GET", "alice", "/api/status").status_code == 200
    finally:
        hub.stop("alice")
    assert wait_for(lambda: not active_jobs("alice", "sge"), 30), active_jobs("alice", "sge")


def test_a_clusters_own_start_timeout_and_command_are_the_ones_jupyterhub_uses(clusters_hub):
    """The test cluster ``patient`` (hub_config.py) sets JupyterHub's own options: its command
    never listens, and its start_timeout (130 s) is longer than the hub's (120 s). JupyterHub
    reads start_timeout from the spawner before start(): the spawn must end after the
    cluster's 130 s with our message, not after the hub's 120 s with JupyterHub's bare
    "Spawn failed: ", and the job must be cancelled."""
    events, seconds = clusters_hub.spawn("alice", "patient", options={"cluster": "patient"},
                                         timeout=200)
    try:
        assert events[-1].get("failed"), events
        message = events[-1]["message"]
        assert "not ready within start_timeout (130 s)" in message, message
        assert "Last step: Job" in message or "Last step: Server" in message, message
        assert 122 < seconds < 160, seconds
        assert wait_for(lambda: active_jobs("alice") == [], 60), active_jobs("alice")
    finally:
        clusters_hub.stop("alice", "patient")
