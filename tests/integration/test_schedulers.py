"""The skeleton's end-to-end paths on all three schedulers, through the real parts: JupyterHub +
configurable-http-proxy + the ``slurm-ssh`` / ``sge-ssh`` / ``torque-ssh`` spawner + the lab's
sshd, with the real Slurm, the real Grid Engine, and Torque/PBS commands (Slurm's wrappers, on
the login host's second sshd). The compute host is reachable only through the login host."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import time
from pathlib import Path

import pytest

from hub_spawner.spawner import derived_hub_id

from .conftest import SCHEDULERS, active_jobs, run_in_kernel, user_processes, wait_for

DISPLAY_NAMES = {"slurm": "Slurm", "sge": "Grid Engine", "torque": "Torque/PBS"}

#: What each scheduler says about a queue it does not have (its own words).
UNKNOWN_QUEUE_MESSAGES = {
    "slurm": "Invalid partition name specified",
    "sge": 'Job was rejected because job requests unknown queue "nosuch"',
    "torque": "invalid partition specified: nosuch",
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_spawn_runs_on_compute_as_the_user_and_stop_leaves_nothing(scheduler, hub_for, lab):
    hub = hub_for(scheduler)
    events, seconds = hub.spawn("alice")
    messages = [event.get("message", "") for event in events]
    assert events[-1].get("ready"), messages
    assert any(m.startswith("Submitted job") and DISPLAY_NAMES[scheduler] in m
               for m in messages), messages
    assert any("is running on compute" in message for message in messages), messages
    assert any(message.startswith("Tunnel open") for message in messages), messages

    # Through the proxy, which routes to the hub-side tunnel, not to the compute host.
    status = hub.get("/user/alice/api/status")
    assert status.status_code == 200, status.text
    output = run_in_kernel(hub, "alice",
                           "import os, socket; print(socket.gethostname(), os.getuid())")
    assert output.split() == ["compute", str(pwd.getpwnam("alice").pw_uid)]

    # bob may not use alice's server.
    bob_token = hub.api("POST", "/users/bob/tokens", json={"note": "lab test"}).json()["token"]
    assert hub.get("/user/alice/api/status", token=bob_token).status_code == 403

    # The job's own 0700 directory, named after the job: its script and output, and the
    # secrets file already gone (the job read and deleted it).
    state = hub.api("GET", "/users/alice").json()["servers"][""]["state"]
    job_dir = Path(state["output_path"]).parent
    assert job_dir.name == state["job_name"] and job_dir.parent.name == ".hub-spawner", state
    assert sorted(os.listdir(job_dir)) == ["job.out", "job.sh"]
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
    assert job_dir.stat().st_uid == pwd.getpwnam("alice").pw_uid

    jobs = active_jobs("alice", scheduler)
    assert len(jobs) == 1, jobs
    # The job's name carries this hub's id (from its cookie secret), and the scheduler has it.
    secret = bytes.fromhex((hub.log_path.parent / "jupyterhub_cookie_secret").read_text().strip())
    assert state["job_name"].startswith(f"jupyterhub-{derived_hub_id(secret)}-alice-default-")
    views = job_views(lab, scheduler, jobs[0].split()[0])
    assert any(state["job_name"] in text for text in views.values()), state["job_name"]
    assert_server_token_does_not_leak(hub, lab, scheduler, job_id=jobs[0].split()[0])
    hub.stop("alice")
    assert wait_for(lambda: not active_jobs("alice", scheduler), 30), active_jobs("alice",
                                                                                   scheduler)
    assert wait_for(lambda: not user_processes("alice", "jupyterhub-singleuser"), 20)
    print(f"{scheduler}: spawn took {seconds:.1f} s")


def job_views(lab, scheduler: str, job_id: str) -> dict[str, str]:
    """Where the scheduler shows a job's details and script, as root on the login host."""
    if scheduler == "sge":
        views = {"qstat -j": lab.sge_command(f"qstat -j {job_id}").stdout}
        spools = [lab.LAB_DIR / "sge" / "qmaster" / "job_scripts",
                  lab.LAB_DIR / "sge" / "execd" / "compute" / "job_scripts"]
        for spool in spools:
            for path in spool.glob("*"):
                views[str(path)] = path.read_text(errors="replace")
        assert any("#$ -N jupyterhub-" in text for text in views.values())  # can fail
        return views
    views = {
        "scontrol show job": lab.in_namespace("login", ["scontrol", "-dd", "show", "job",
                                                        job_id]).stdout,
        "stored batch script": lab.in_namespace("login", ["scontrol", "write", "batch_script",
                                                          job_id, "-"]).stdout,
    }
    if scheduler == "torque":
        qstat = str(lab.TORQUE_WRAPPERS / "qstat")
        views["qstat -f"] = lab.in_namespace("login", [qstat, "-f", job_id]).stdout
    prefix = "#PBS" if scheduler == "torque" else "#SBATCH"
    assert prefix in views["stored batch script"]  # the check below can fail
    return views


def assert_server_token_does_not_leak(hub, lab, scheduler: str, job_id: str) -> None:
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
    assert not list(state_dir.glob("*.env")) and not list(state_dir.glob("*/server.env"))
    for job_dir in state_dir.glob("jupyterhub-*/"):
        assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700, job_dir
    places = {
        "process list": subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                       text=True).stdout,
        "hub log": hub.log(),
        **job_views(lab, scheduler, job_id),
    }
    for path in state_dir.rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_text(errors="replace")
    for place, text in places.items():
        assert token not in text, f"the server's API token leaks into the {place}"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_rejected_submission_fails_fast_with_the_schedulers_message(scheduler, hub_for):
    hub = hub_for(scheduler)
    events, seconds = hub.spawn("alice", options={"partition": "nosuch"})
    assert events[-1].get("failed"), events
    message = events[-1]["message"]
    assert f"{DISPLAY_NAMES[scheduler]} rejected the job" in message, message
    assert UNKNOWN_QUEUE_MESSAGES[scheduler] in message, message
    assert seconds < 15
    assert active_jobs("alice", scheduler) == []
    assert UNKNOWN_QUEUE_MESSAGES[scheduler] in hub.log()


def test_grid_engine_gpu_request_is_rejected_with_its_message(hub_for):
    """The lab defines no GPU complex: Grid Engine refuses ``-l gpu=1`` itself."""
    hub = hub_for("sge")
    events, _ = hub.spawn("alice", options={"gpus": 1})
    assert events[-1].get("failed"), events
    assert 'Grid Engine rejected the job: Unable to run job: unknown resource "gpu"' in (
        events[-1]["message"])
    assert active_jobs("alice", "sge") == []


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_job_that_dies_before_ready_fails_at_once_with_its_last_output(scheduler, hub_for):
    hub = hub_for(scheduler)
    events, seconds = hub.spawn("alice", "dies-early")
    assert events[-1].get("failed"), events
    message = events[-1]["message"]
    assert "ended before the server was ready" in message, message
    assert "lab scenario: giving up on purpose" in message, message
    assert "exited with status 3 before it listened" in message, message
    assert seconds < 30  # not start_timeout (120 s)
    assert wait_for(lambda: not active_jobs("alice", scheduler), 20)


def test_grid_engine_error_state_fails_at_once_with_the_reason_and_deletes_the_job(hub_for):
    hub = hub_for("sge")
    events, seconds = hub.spawn("alice", "error-state")
    assert events[-1].get("failed"), events
    message = events[-1]["message"]
    assert "cannot run: Grid Engine put it in error state Eqw" in message, message
    assert "being deleted" in message, message
    assert "can't chdir to /nonexistent-dir: No such file or directory" in message, message
    assert seconds < 20
    assert wait_for(lambda: not active_jobs("alice", "sge"), 20), active_jobs("alice", "sge")
    assert "cancelling job" in hub.log()


def test_grid_engine_held_job_says_so_then_starts_once_released(hub_for, lab):
    hub = hub_for("sge")
    response = hub.api("POST", "/users/alice/servers/held", json={"cpus": 1})
    assert response.status_code in (201, 202), response.text
    assert wait_for(lambda: any(" hqw " in job for job in active_jobs("alice", "sge")), 20)
    time.sleep(3)  # let a status check see the hold
    job_id = active_jobs("alice", "sge")[0].split()[0]
    lab.sge_command(f"qrls {job_id}")
    events = hub.progress("alice", "held")  # the whole stream, from the first event
    messages = [event.get("message", "") for event in events]
    try:
        assert any("is waiting in the queue: the job is held" in m for m in messages), messages
        assert events[-1].get("ready"), messages
    finally:
        hub.stop("alice", "held")
    assert wait_for(lambda: not active_jobs("alice", "sge"), 30), active_jobs("alice", "sge")


def test_walltime_end_stops_the_server_and_says_why_on_grid_engine_and_torque(hub_for):
    """Both at once (Slurm's own walltime test is in test_slurm_spawn.py). Grid Engine's reason
    comes from its accounting (qacct); the lab's Torque wrappers report only "finished" (state
    C, no exit status): real Torque's exit_status -11 is covered by the parser tests."""
    hubs = {scheduler: hub_for(scheduler) for scheduler in ("sge", "torque")}
    for scheduler, hub in hubs.items():
        events, _ = hub.spawn("alice", "short-walltime", options={"walltime": "1"})
        assert events[-1].get("ready"), (scheduler, events)

    def stopped(hub) -> bool:
        servers = hub.api("GET", "/users/alice").json()["servers"]
        return "short-walltime" not in servers or not servers["short-walltime"]["ready"]

    for scheduler, hub in hubs.items():
        assert wait_for(lambda hub=hub: stopped(hub), timeout=180, interval=2), scheduler
        assert wait_for(lambda s=scheduler: not active_jobs("alice", s), 30), scheduler
    assert "has ended: it reached its walltime limit (or another hard limit" in (
        hubs["sge"].log())
    assert "has ended: it has finished (its output file has the details) (job state C)" in (
        hubs["torque"].log())


def occupy_the_grid_engine_node(lab) -> str:
    """bob's job takes both slots. Submitted again if it does not stay running: once, in a full
    run, Grid Engine's execd killed a fresh job (KILL, "failed 100") a moment after starting it,
    right after it had killed an earlier job at its walltime."""
    for _ in range(3):
        blocker = lab.sge_command(
            "su bob -c 'echo sleep 300 | qsub -terse -pe smp 2 -o /dev/null -j y'"
        ).stdout.strip()
        if wait_for(lambda: any(" r " in job for job in active_jobs("bob", "sge")), 20):
            time.sleep(3)
            if any(" r " in job for job in active_jobs("bob", "sge")):
                return blocker
        print(f"bob's blocking job {blocker} did not stay running; submitting another")
        lab.sge_command(f"qdel {blocker}", check=False)
    raise AssertionError("bob's blocking job did not stay running")


def test_grid_engine_waiting_job_shows_the_schedulers_reason_then_starts(hub_for, lab):
    """bob's job takes both slots; alice's spawn waits with Grid Engine's scheduling info."""
    hub = hub_for("sge")
    blocker = occupy_the_grid_engine_node(lab)
    try:
        response = hub.api("POST", "/users/alice/server", json={"cpus": 1})
        assert response.status_code in (201, 202), response.text  # 201 is JupyterHub's race
        assert wait_for(lambda: any(" qw " in job for job in active_jobs("alice", "sge")), 20)
        time.sleep(3)  # let a status check read the reason
        lab.sge_command(f"qdel {blocker}")
        events = hub.progress("alice")
        messages = [event.get("message", "") for event in events]
        assert any("is waiting in the queue: waiting for free slots" in m
                   and "(Grid Engine: " in m and "all.q@compute" in m for m in messages), messages
        assert events[-1].get("ready"), messages
        hub.stop("alice")
        assert wait_for(lambda: not active_jobs("alice", "sge"), 30)
    finally:
        lab.sge_command(f"qdel {blocker}", check=False)
