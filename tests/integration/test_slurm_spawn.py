"""End to end on the real parts: JupyterHub + configurable-http-proxy + the slurm-ssh spawner +
the lab's sshd and Slurm, with the compute host reachable only through the login host."""

from __future__ import annotations

import json
import pwd
import socket
import stat
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import websocket

from .conftest import active_jobs, user_processes, wait_for


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


def run_in_kernel(hub, user: str, code: str) -> str:
    """Start a kernel through the proxy, run ``code`` over the websocket, return its stdout."""
    kernel = hub.api_server("POST", user, "/api/kernels", json={}).json()
    ws_url = hub.url.replace("http", "ws") + f"/user/{user}/api/kernels/{kernel['id']}/channels"
    connection = websocket.create_connection(
        ws_url, header=[f"Authorization: token {hub.token}"], timeout=60
    )
    msg_id = uuid.uuid4().hex
    connection.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }))
    output = []
    try:
        while True:
            message = json.loads(connection.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                output.append(message["content"]["text"])
            elif message["msg_type"] == "error":
                raise AssertionError(f"kernel error: {message['content']}")
            elif message["msg_type"] == "status":
                if message["content"]["execution_state"] == "idle":
                    break
    finally:
        connection.close()
    hub.api_server("DELETE", user, f"/api/kernels/{kernel['id']}")
    return "".join(output)


def test_alice_spawns_on_compute_through_the_tunnel_and_stop_leaves_nothing(hub, lab):
    events, seconds = hub.spawn("alice")
    messages = [event.get("message", "") for event in events]
    assert events[-1].get("ready"), messages
    assert any(message.startswith("Submitted job") for message in messages), messages
    assert any("is running on compute" in message for message in messages), messages
    assert any(message.startswith("Tunnel open") for message in messages), messages

    # The proxy routes to the hub-side tunnel, not to the compute host.
    routes = hub.api("GET", "/users/alice").json()["servers"][""]
    assert routes["ready"]
    status = hub.get("/user/alice/api/status")
    assert status.status_code == 200, status.text
    assert "/user/alice/" in hub.log() and "-> compute:" in hub.log()

    output = run_in_kernel(hub, "alice",
                           "import os, socket; print(socket.gethostname(), os.getuid())")
    assert output.split() == ["compute", str(pwd.getpwnam("alice").pw_uid)]

    # bob may not use alice's server.
    bob_token = hub.api("POST", "/users/bob/tokens", json={"note": "lab test"}).json()["token"]
    assert hub.get("/user/alice/api/status", token=bob_token).status_code == 403

    job = active_jobs("alice")
    assert len(job) == 1 and " RUNNING " in job[0], job
    assert_server_token_does_not_leak(hub, lab, job_id=job[0].split()[0])
    hub.stop("alice")
    assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")
    assert wait_for(lambda: not user_processes("alice", "jupyterhub-singleuser"), 20)
    print(f"spawn took {seconds:.1f} s")


def assert_server_token_does_not_leak(hub, lab, job_id: str) -> None:
    """The server's API token (read, as root, from the running server's environment) appears in
    no command line, no job listing or stored job script, no file the job left, no hub log line;
    the environment file it came in is gone and its directory is private."""
    server_pids = user_processes("alice", "jupyterhub-singleuser")
    assert server_pids, "no server process"
    environ = Path(f"/proc/{server_pids[0].split()[0]}/environ").read_bytes().split(b"\0")
    token = next(item.split(b"=", 1)[1].decode() for item in environ
                 if item.startswith(b"JUPYTERHUB_API_TOKEN="))
    assert len(token) >= 32

    state_dir = Path(pwd.getpwnam("alice").pw_dir) / ".hub-spawner"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert not list(state_dir.glob("*.env"))
    places = {
        "process list": subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                       text=True).stdout,
        "scontrol show job": lab.in_namespace("login", ["scontrol", "-dd", "show", "job",
                                                        job_id]).stdout,
        "stored batch script": lab.in_namespace("login", ["scontrol", "write", "batch_script",
                                                          job_id, "-"]).stdout,
        "hub log": hub.log(),
    }
    for path in state_dir.iterdir():
        places[str(path)] = path.read_text(errors="replace")
    assert "#SBATCH" in places["stored batch script"]  # the check below can fail
    for place, text in places.items():
        assert token not in text, f"the server's API token leaks into the {place}"


def test_rejected_submission_fails_fast_with_slurms_message(hub):
    events, seconds = hub.spawn("alice", options={"partition": "nosuch"})
    assert events[-1].get("failed"), events
    assert "Slurm rejected the job" in events[-1]["message"]
    assert "Invalid partition name specified" in events[-1]["message"]
    assert seconds < 15
    assert active_jobs("alice") == []
    assert "Invalid partition name specified" in hub.log()
    assert "cancelling job" not in hub.log().split("nosuch")[-1]  # nothing to cancel


def test_job_that_dies_before_ready_fails_at_once_with_its_last_output(hub):
    events, seconds = hub.spawn("alice", "dies-early")
    assert events[-1].get("failed"), events
    message = events[-1]["message"]
    assert "ended before the server was ready: it failed" in message, message
    assert "lab scenario: giving up on purpose" in message
    assert "exited with status 3 before it listened" in message
    assert seconds < 30  # not start_timeout (120 s)
    assert active_jobs("alice") == []


def test_start_timeout_cancels_the_job(hub):
    events, seconds = hub.spawn("alice", "never-ready")
    assert events[-1].get("failed"), events
    assert 14 < seconds < 45
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
    """bob's job takes both cores, so the next job waits with reason 'Resources'."""
    result = lab.in_namespace("login", ["runuser", "-u", "bob", "--", "sbatch", "--parsable",
                                        "--cpus-per-task=2", "--output=/dev/null",
                                        "--wrap=sleep 300"])
    job_id = result.stdout.strip()
    assert wait_for(lambda: any(" RUNNING " in job for job in active_jobs("bob")), 20)
    return job_id


def test_pending_job_shows_the_queue_reason_then_starts(hub, lab):
    blocker = occupy_the_compute_node(lab)
    try:
        with ThreadPoolExecutor(1) as pool:
            spawn = pool.submit(hub.spawn, "alice")
            assert wait_for(lambda: any(" PENDING " in job for job in active_jobs("alice")), 30)
            time.sleep(2)  # let a status poll see the reason
            lab.in_namespace("login", ["scancel", blocker])
            events, _ = spawn.result(timeout=150)
        messages = [event.get("message", "") for event in events]
        assert any("is waiting in the queue: Resources" in message for message in messages), \
            messages
        assert events[-1].get("ready"), messages
        hub.stop("alice")
        assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")
    finally:
        lab.in_namespace("login", ["scancel", blocker], check=False)


def test_cancelling_a_pending_spawn_cancels_its_job(hub, lab):
    blocker = occupy_the_compute_node(lab)
    try:
        response = hub.api("POST", "/users/alice/server", json={"cpus": 1})
        assert response.status_code == 202, response.text
        assert wait_for(lambda: any(" PENDING " in job for job in active_jobs("alice")), 30)
        hub.stop("alice")  # what the spawn page's cancel does: DELETE while pending
        assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")
        assert "cancelling job" in hub.log()
    finally:
        lab.in_namespace("login", ["scancel", blocker], check=False)


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
