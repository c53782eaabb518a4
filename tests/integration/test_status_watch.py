"""The shared status watch against the real Slurm: one ``squeue`` per cycle for every running
server of the hub, counted by slurmctld itself (``sdiag``'s RPC statistics), a job cancelled
behind the hub's back noticed from the listing, and a scheduler outage that leaves servers
"unknown", never gone."""

from __future__ import annotations

import re
import secrets
import time

import pytest

from .conftest import active_jobs, processes_on, start_hub, stop_hub, wait_for

PORT = 28900
INTERVAL = 2.0


def job_info_rpcs(lab) -> tuple[int, dict[str, int]]:
    """slurmctld's count of job-listing RPCs since the last reset, and its RPC count per user."""
    text = lab.in_namespace("login", ["sdiag"]).stdout
    listing = sum(int(count) for count in re.findall(
        r"^\s*REQUEST_JOB_INFO(?:_SINGLE)?\s+\(\s*\d+\)\s+count:(\d+)", text, re.M))
    by_user = dict(re.findall(r"^\s*(\w+)\s+\(\s*\d+\)\s+count:(\d+)", text.split(
        "by user")[1], re.M)) if "by user" in text else {}
    return listing, {user: int(count) for user, count in by_user.items()}


@pytest.fixture(scope="module")
def watched_hub(lab, tmp_path_factory):
    """A hub whose servers are polled every second, and whose watch lists every 2 s as alice
    (the status identity: Slurm shows her bob's jobs too)."""
    hub, process = start_hub(tmp_path_factory.mktemp("watched-hub"), PORT, secrets.token_hex(24),
                             {"HUB_POLL_INTERVAL": "1", "HUB_STATUS_USER": "alice",
                              "HUB_CLUSTER_STATUS_INTERVAL": str(INTERVAL), "HUB_DEBUG": "1"})
    for user in ("alice", "bob"):
        hub.api("POST", f"/users/{user}")
    yield hub
    stop_hub(process)
    lab.stop_tunnel_service(hub.log_path.parent / "tunnels")


def test_one_scheduler_listing_per_cycle_answers_every_servers_poll(watched_hub, lab):
    hub = watched_hub
    for user in ("alice", "bob"):
        events, _ = hub.spawn(user)
        assert events[-1].get("ready"), (user, events)
    try:
        time.sleep(INTERVAL)  # past the spawns' own status queries
        lab.in_namespace("login", ["sdiag", "--reset"])
        before = len(hub.log())
        seconds = 12
        time.sleep(seconds)
        listings, by_user = job_info_rpcs(lab)
        ours = re.findall(r"Slurm at \S+: squeue for \d+ user\(s\), \d+ job\(s\) of ours, "
                          r"as (\w+):", hub.log()[before:])
        cycles = seconds / INTERVAL
        # JupyterHub polled each of the two servers about 12 times; this hub ran one listing
        # per cycle, all as the status identity. (slurmctld's own count also holds the other
        # hubs of the session, which list the users they have on record: bounded, not exact.)
        print(f"{len(ours)} listings of this hub in {seconds} s ({cycles:.0f} cycles); "
              f"slurmctld: {listings} job listings, by user {by_user}")
        assert cycles - 2 <= len(ours) <= cycles + 2, (ours, by_user)
        assert set(ours) == {"alice"}, ours
        assert listings >= len(ours) - 1, (listings, ours)
        assert "cannot tell whether job" not in hub.log()
    finally:
        for user in ("alice", "bob"):
            hub.stop(user)
    assert wait_for(lambda: not active_jobs("alice") and not active_jobs("bob"), 30)


def test_a_job_cancelled_behind_the_hubs_back_ends_its_server(watched_hub, lab):
    hub = watched_hub
    events, _ = hub.spawn("bob")
    assert events[-1].get("ready"), events
    job_id = active_jobs("bob")[0].split()[0]
    lab.in_namespace("login", ["scancel", job_id])
    assert wait_for(lambda: "" not in hub.api("GET", "/users/bob").json()["servers"],
                    5 * INTERVAL + 5), "the hub still lists bob's server"
    assert f"job {job_id} has ended" in hub.log()


def test_a_scheduler_outage_leaves_the_server_unknown_and_it_carries_on(watched_hub, lab):
    hub = watched_hub
    events, _ = hub.spawn("alice")
    assert events[-1].get("ready"), events
    try:
        time.sleep(2 * INTERVAL)  # the watch has listed the new job
        lab.stop_slurmctld()
        try:
            # Stale after 3 intervals and a second; JupyterHub polls every second meanwhile.
            assert wait_for(lambda: "the last scheduler listing is" in hub.log(), 20)
            time.sleep(5)  # JupyterHub polls on, and hears "unknown", never "gone"
            assert "" in hub.api("GET", "/users/alice").json()["servers"]
        finally:
            lab.start_slurmctld()

        def unknown_answers() -> int:
            return hub.log().count("cannot tell whether job")

        def settled() -> bool:  # polls answer from fresh listings again
            before = unknown_answers()
            time.sleep(3)
            return unknown_answers() == before

        assert wait_for(settled, 90), hub.log()[-2000:]
        assert "" in hub.api("GET", "/users/alice").json()["servers"]
        assert hub.get("/user/alice/api/status").status_code == 200
    finally:
        hub.stop("alice")
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")


def test_a_running_servers_own_ssh_connection_closes_when_idle(lab, tmp_path):
    """With the status identity listing and ``ssh_idle_timeout`` = 4 s, bob's running server
    needs only the tunnel service's master on the login node: the hub's own connection of his
    closes, and the server works on."""
    hub, process = start_hub(tmp_path, PORT + 10, secrets.token_hex(24),
                             {"HUB_POLL_INTERVAL": "1", "HUB_STATUS_USER": "alice",
                              "HUB_CLUSTER_STATUS_INTERVAL": str(INTERVAL),
                              "HUB_SSH_IDLE_TIMEOUT": "4"})
    try:
        hub.api("POST", "/users/bob")
        events, _ = hub.spawn("bob")
        assert events[-1].get("ready"), events
        during = len(processes_on("login", "bob", "sshd"))
        assert during >= 2, during  # the hub's connection and the tunnel service's master
        assert wait_for(lambda: len(processes_on("login", "bob", "sshd")) == during - 1, 20), (
            during, len(processes_on("login", "bob", "sshd")))
        time.sleep(2 * INTERVAL)
        # the watch needs none of bob's connections
        assert len(processes_on("login", "bob", "sshd")) == during - 1
        assert hub.get("/user/bob/api/status").status_code == 200
        print(f"bob's sshd sessions on the login node: {during} while spawning, "
              f"{during - 1} once idle")
        hub.stop("bob")  # re-opens bob's connection for the cancel
        assert wait_for(lambda: not active_jobs("bob"), 30), active_jobs("bob")
    finally:
        stop_hub(process)
        lab.stop_tunnel_service(tmp_path / "tunnels")
        lab.in_namespace("login", ["scancel", "--user=bob"], check=False)


def test_a_status_identity_that_cannot_log_in_leaves_each_user_listing_their_own(lab, tmp_path):
    """``status_cluster_username`` names an account the hub has no key for (``carol``): the
    hub says so once, lists bob's jobs over his own connection, and his spawn, poll and stop
    work as without a status identity."""
    hub, process = start_hub(tmp_path, PORT + 20, secrets.token_hex(24),
                             {"HUB_POLL_INTERVAL": "1", "HUB_STATUS_USER": "carol",
                              "HUB_CLUSTER_STATUS_INTERVAL": str(INTERVAL), "HUB_DEBUG": "1"})
    try:
        hub.api("POST", "/users/bob")
        events, _ = hub.spawn("bob")
        assert events[-1].get("ready"), events
        time.sleep(3 * INTERVAL)
        log = hub.log()
        assert log.count("the status identity carol cannot log in") == 1, log[-3000:]
        assert "Check status_cluster_username" in log
        assert re.search(r"squeue for 1 user\(s\), 1 job\(s\) of ours, as bob:", log)
        assert not re.search(r"job\(s\) of ours, as carol:", log)
        assert hub.get("/user/bob/api/status").status_code == 200
        hub.stop("bob")
        assert wait_for(lambda: not active_jobs("bob"), 30), active_jobs("bob")
    finally:
        stop_hub(process)
        lab.stop_tunnel_service(tmp_path / "tunnels")
