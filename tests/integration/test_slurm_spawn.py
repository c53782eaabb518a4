"""End to end on the real parts: JupyterHub + configurable-http-proxy + the slurm-ssh spawner +
the lab's sshd and Slurm, with the compute host reachable only through the login host.

The paths every scheduler shares (spawn, kernel, stop; rejected; dies early) are in
``test_schedulers.py``, parametrized over Slurm, Grid Engine and Torque/PBS; these are the rest,
run once, on Slurm."""

from __future__ import annotations

import pwd
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .conftest import (
    active_jobs,
    login,
    processes_on,
    run_in_kernel,
    user_processes,
    wait_for,
)


def test_lab_topology_hub_cannot_reach_compute_and_compute_cannot_reach_hub(lab):
    with socket.socket() as probe:
        probe.settimeout(3)
        assert probe.connect_ex((lab.COMPUTE_IP, 6818)) != 0
    reach_hub = lab.in_namespace(
        "compute", ["bash", "-c", f"exec 3<>/dev/tcp/{lab.HUB_IP}/22"], check=False, timeout=10
    )
    assert reach_hub.returncode != 0
    reach_compute = lab.in_namespace(
        "login", ["bash", "-c", f"exec 3<>/dev/tcp/{lab.COMPUTE_IP}/6818"], check=False
    )
    assert reach_compute.returncode == 0


def test_the_jobs_output_wakes_the_spawn_without_a_status_poll(hub, lab):
    """With status checks 20 s and then 30 s apart, the spawn still ends within a few seconds:
    the hub follows the job's output over its SSH connection (one ``tail -F`` on the login
    node), and the job's first line and its ready line wake it. The ``tail`` ends with the
    spawn."""
    events, seconds = hub.spawn("alice", "slow-polling")
    try:
        assert events[-1].get("ready"), events
        messages = [event.get("message", "") for event in events]
        assert any("is running on compute" in message for message in messages), messages
        assert seconds < 15, (seconds, messages)  # polling alone: >= 30 s
        assert wait_for(lambda: not processes_on("login", "alice", "tail"), 10)
    finally:
        hub.stop("alice", "slow-polling")
    assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")


def test_the_spawn_form_warms_up_the_ssh_logins(hub, lab):
    """Showing bob the spawn form opens his SSH connection and has the tunnel service log in
    (a master for bob), so that Start waits for neither; unused, the master goes again."""
    def bobs_masters() -> list[str]:
        result = subprocess.run(["pgrep", "-a", "-x", "ssh"], capture_output=True, text=True)
        return [line for line in result.stdout.splitlines() if " -M " in line and "bob@" in line]

    assert wait_for(lambda: not bobs_masters(), 15), bobs_masters()
    session = login(hub, "bob", "lab-demo-password")
    page = session.get(f"{hub.url}/hub/spawn/bob/form-view", timeout=30)
    assert 'name="cpus"' in page.text
    assert wait_for(bobs_masters, 10)
    assert processes_on("login", "bob", "sshd")
    assert wait_for(lambda: not bobs_masters(), 15), "the warmed master stays unused"


def test_start_timeout_cancels_the_job(hub):
    events, seconds = hub.spawn("alice", "never-ready")
    assert events[-1].get("failed"), events
    assert 13 < seconds < 45
    # Said by us a moment before JupyterHub's own timeout (whose message is "Spawn failed: ").
    message = events[-1]["message"]
    assert "The server was not ready within start_timeout (15 s)" in message, message
    assert "its server did not start in time; its output is in /home/alice/" in message
    assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")
    assert wait_for(lambda: not user_processes("alice", "sleep 600"), 20)
    assert "cancelling job" in hub.log()


def test_unreachable_login_node_fails_the_spawn_with_what_to_do(hub):
    events, seconds = hub.spawn("alice", "login-down")
    assert events[-1].get("failed"), events
    assert "Cannot reach the login node 10.77.1.2:2299" in events[-1]["message"]
    assert "tell an administrator" in events[-1]["message"]
    assert seconds < 15
    assert "Cannot reach the login node 10.77.1.2:2299" in hub.log()


def test_unknown_host_key_fails_the_spawn_and_is_never_accepted(hub):
    events, _ = hub.spawn("alice", "unknown-host-key")
    assert events[-1].get("failed"), events
    assert "is not in /dev/null" in events[-1]["message"]
    assert "Refusing to connect" in events[-1]["message"]
    assert active_jobs("alice") == []


def test_walltime_end_stops_the_server_and_says_why(hub):
    events, _ = hub.spawn("alice", "short-walltime", options={"walltime": "1"})
    assert events[-1].get("ready"), events
    state = hub.api("GET", "/users/alice").json()["servers"]["short-walltime"]["state"]
    assert state["walltime_seconds"] == 60 and state["ends_at"].endswith("Z"), state
    # Less than walltime_warning (10 min) is left from the start: the first poll says so.
    assert wait_for(lambda: re.search(
        rf"short-walltime.*: job {state['job_id']} reaches its walltime at "
        rf"{state['ends_at']} \(in 0 min\); Slurm will stop the server then", hub.log()), 30)

    def stopped() -> bool:
        servers = hub.api("GET", "/users/alice").json()["servers"]
        return "short-walltime" not in servers or not servers["short-walltime"]["ready"]

    assert wait_for(stopped, timeout=180, interval=2)
    assert "reached its walltime limit; start a new server, with a longer walltime" in hub.log()
    assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")


def test_hostile_option_is_refused_before_anything_reaches_the_cluster(hub):
    pwned = Path("/tmp/hub-spawner-pwned")
    pwned.unlink(missing_ok=True)
    events, _ = hub.spawn("alice", options={"partition": f"debug; touch {pwned}"})
    assert events[-1].get("failed"), events
    assert "not a valid name" in events[-1]["message"]
    events, _ = hub.spawn("alice", options={"account": "x\n#SBATCH --uid=0"})
    assert "not a valid name" in events[-1]["message"]
    assert not pwned.exists()
    assert active_jobs("alice") == []


def occupy_the_compute_node(lab) -> str:
    """bob's job takes both cores for at most 10 minutes, so the next job waits with reason
    'Resources' and the backfill scheduler can estimate when it starts."""
    result = lab.in_namespace("login", ["runuser", "-u", "bob", "--", "sbatch", "--parsable",
                                        "--cpus-per-task=2", "--time=10", "--output=/dev/null",
                                        "--wrap=sleep 300"])
    job_id = result.stdout.strip()
    if not wait_for(lambda: any(" RUNNING " in job for job in active_jobs("bob")), 20):
        lab.in_namespace("login", ["scancel", job_id], check=False)
        raise AssertionError(f"bob's job {job_id} did not start: something holds the node\n"
                             + lab.in_namespace("login", ["squeue"], check=False).stdout)
    return job_id


def test_pending_job_shows_the_queue_reason_place_and_start_estimate_then_starts(hub, lab):
    blocker = occupy_the_compute_node(lab)
    before = len(hub.log())  # the session hub's log: only what this spawn adds counts
    try:
        with ThreadPoolExecutor(1) as pool:
            spawn = pool.submit(hub.spawn, "alice")
            assert wait_for(lambda: any(" PENDING " in job for job in active_jobs("alice")), 30)
            # The lab's backfill pass (bf_interval=5) sets the estimate; a poll then says it.
            said = ("(Slurm: Resources); 1st of 1 waiting in its partition; Slurm expects it "
                    "to start around")
            assert wait_for(lambda: said in hub.log()[before:], 40), (
                hub.log()[before:][-3000:], pending_jobs(lab))
            lab.in_namespace("login", ["scancel", blocker])
            events, _ = spawn.result(timeout=150)
        messages = [event.get("message", "") for event in events]
        waiting = [m for m in messages if "is waiting in the queue: " in m]
        assert any("waiting for free cores, memory or GPUs (Slurm: Resources); 1st of 1 "
                   "waiting in its partition" in m for m in waiting), messages
        assert any(re.search(r"Slurm expects it to start around \d\d:\d\d", m)
                   for m in waiting), messages
        # The bar moves while the job waits, and never backwards.
        progress = [event["progress"] for event in events if "progress" in event]
        assert progress == sorted(progress), progress
        assert len({event["progress"] for event in events
                    if "is waiting in the queue" in event.get("message", "")}) >= 2, events
        assert events[-1].get("ready"), messages
    finally:
        lab.in_namespace("login", ["scancel", blocker], check=False)
        hub.stop("alice")  # also after a failure: the next tests need the node free
    assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")


def pending_jobs(lab) -> str:
    """Every pending job in the lab's Slurm, whoever's: what a place in the queue counts."""
    return lab.in_namespace("login", ["squeue", "--states=PENDING", "--format=%i %u %j %r"],
                            check=False).stdout


def test_cancelling_a_pending_spawn_cancels_its_job(hub, lab):
    blocker = occupy_the_compute_node(lab)
    before = len(hub.log())
    try:
        response = hub.api("POST", "/users/alice/server", json={"cpus": 1})
        assert response.status_code in (201, 202), response.text  # 201: JupyterHub race
        assert wait_for(lambda: any(" PENDING " in job for job in active_jobs("alice")), 30)
        hub.stop("alice")  # what the spawn page's cancel does: DELETE while pending
        assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")
        assert "cancelling job" in hub.log()[before:]
    finally:
        lab.in_namespace("login", ["scancel", blocker], check=False)
        hub.stop("alice")


def test_alice_and_bob_spawn_at_once_and_each_kernel_runs_as_its_owner(hub, lab):
    with ThreadPoolExecutor(2) as pool:
        spawns = {user: pool.submit(hub.spawn, user) for user in ("alice", "bob")}
        results = {user: spawn.result(timeout=180) for user, spawn in spawns.items()}
    try:
        for user, (events, _) in results.items():
            assert events[-1].get("ready"), (user, events)
            output = run_in_kernel(hub, user,
                                   "import os, socket; print(socket.gethostname(), os.getuid())")
            assert output.split() == ["compute", str(pwd.getpwnam(user).pw_uid)]
        assert len(active_jobs("alice")) == 1 and len(active_jobs("bob")) == 1
    finally:
        for user in ("alice", "bob"):
            hub.stop(user)
    assert wait_for(lambda: not active_jobs("alice") and not active_jobs("bob"), 20)


def test_the_server_listens_only_on_the_nodes_cluster_address(hub, lab):
    """The server binds the address the compute host uses towards the login host (the route
    to hub_api_tunnel_host), not 0.0.0.0: the tunnel works, and nothing of alice's listens on
    the node's other addresses (loopback here)."""
    events, _ = hub.spawn("alice", "listen-address")
    assert events[-1].get("ready"), events
    try:
        state = hub.api("GET", "/users/alice").json()["servers"]["listen-address"]["state"]
        port = state["remote_port"]
        listeners = lab.in_namespace("compute", ["ss", "-Hltn", f"sport = :{port}"]).stdout
        addresses = [row.split()[3] for row in listeners.splitlines()]
        assert addresses == [f"{lab.COMPUTE_IP}:{port}"], listeners
        assert hub.get("/user/alice/listen-address/api/status").status_code == 200
    finally:
        hub.stop("alice", "listen-address")
    assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")
