"""The reconciler in a real hub, against the lab's sshd and each real scheduler: a job of this
hub that no server owns is cancelled (submitted by hand; left by a stop while the scheduler's
controller was down, with the hub running or restarted); another hub's jobs and a user's own are
never touched; ``reconcile = "log"`` cancels nothing; a forward that no server owns is closed.

Each test runs its own hub (fixed ``hub_id``, a 2 s listing cycle, a 2 s grace), so that what
it hand-submits cannot touch the session hubs' jobs, and theirs cannot touch its own.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import time
from pathlib import Path

import pytest

from hub_spawner.tunnels.client import TunnelClient
from hub_spawner.tunnels.forwards import Login

from .conftest import SCHEDULERS, active_jobs, start_hub, stop_hub, wait_for

PORTS = {"slurm": 29000, "sge": 29010, "torque": 29020}
INTERVAL = 2.0  # cluster_status_interval
GRACE = 2.0  # reconcile_grace


@pytest.fixture(autouse=True)
def no_alice_job_left(lab):
    """After each test, wait until the schedulers list no job of alice's at all (Slurm's own
    ``squeue`` shows completing jobs too, also those submitted through the Torque wrappers):
    the next module counts alice's jobs."""
    yield
    assert wait_for(lambda: not active_jobs("alice", "slurm") and not active_jobs("alice", "sge"),
                    120), (active_jobs("alice", "slurm"), active_jobs("alice", "sge"))


def hub_env(scheduler: str, **more: str) -> dict[str, str]:
    return {"HUB_SCHEDULER": scheduler, "HUB_ID": f"rt{scheduler[:2]}",
            "HUB_CLUSTER_STATUS_INTERVAL": str(INTERVAL), "HUB_RECONCILE_GRACE": str(GRACE),
            **more}


def submit_by_hand(lab, scheduler: str, user: str, name: str) -> str:
    """A ten-minute sleep job submitted as ``user`` on the login node, named ``name``."""
    if scheduler == "slurm":
        return lab.in_namespace("login", [
            "runuser", "-u", user, "--", "sbatch", "--parsable", f"--job-name={name}",
            "--output=/dev/null", "--wrap", "sleep 600"]).stdout.strip()
    if scheduler == "sge":
        return lab.sge_command(f"runuser -u {user} -- qsub -terse -b y -N {name} -o /dev/null "
                               "-j y /bin/sleep 600").stdout.strip()
    script = Path("/tmp/hub-spawner-reconcile-test.sh")
    script.write_text("#!/bin/sh\nsleep 600\n")
    script.chmod(0o755)
    out = lab.in_namespace("login", [
        "runuser", "-u", user, "--", str(lab.TORQUE_WRAPPERS / "qsub"), "-N", name,
        "-o", "/dev/null", "-j", "oe", str(script)]).stdout
    return re.search(r"\d+", out).group(0)


def listed(job_id: str, user: str, scheduler: str) -> bool:
    return any(line.split()[0].split(".")[0] == job_id for line in active_jobs(user, scheduler))


def ended_or_ending(job_id: str, user: str, scheduler: str) -> bool:
    """Not listed, or (Grid Engine) listed in a deleting state (``dr``): the scheduler took
    the cancel; its execution daemon ends the job when it next hears from the qmaster."""
    for line in active_jobs(user, scheduler):
        fields = line.split()
        if fields[0].split(".")[0] == job_id:
            return scheduler == "sge" and "d" in fields[4]
    return True


def by_whom(job_id: str, log: str) -> str:
    """Who cancelled a job whose stop could not: the reconciler (its log line), or the stop's
    own ``scancel``, still waiting for slurmctld on the login node when it came back."""
    if re.search(rf"cancelling job {job_id}\S* \(jupyterhub-\S+\) of alice", log):
        return "the reconciler"
    return "the stop's own cancel"


def cancel_by_hand(lab, scheduler: str, job_ids: list[str]) -> None:
    for job_id in job_ids:
        if scheduler == "sge":
            lab.sge_command(f"qdel {job_id}", check=False)
        else:
            lab.in_namespace("login", ["scancel", job_id], check=False)


def controller(lab, scheduler: str, up: bool) -> None:
    """Stop or start the scheduler's controller (Torque here is Slurm behind its wrappers)."""
    if scheduler == "sge":
        (lab.start_sge_qmaster if up else lab.stop_sge_qmaster)()
    else:
        (lab.start_slurmctld if up else lab.stop_slurmctld)()


def spawn_and_stop(hub, user: str = "alice") -> None:
    """A server that ran and stopped: the user is on record for this cluster."""
    events, _ = hub.spawn(user)
    assert events[-1].get("ready"), events
    hub.stop(user)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_job_of_this_hub_that_no_server_owns_is_cancelled_and_no_other_job_is(
        lab, tmp_path, scheduler):
    hub, process = start_hub(tmp_path, PORTS[scheduler], secrets.token_hex(24),
                             hub_env(scheduler))
    hub_id = f"rt{scheduler[:2]}"
    by_hand: list[str] = []
    try:
        hub.api("POST", "/users/alice")
        events, _ = hub.spawn("alice")  # a running server, whose job must never be touched
        assert events[-1].get("ready"), events
        server_job = active_jobs("alice", scheduler)[0].split()[0].split(".")[0]

        ours = submit_by_hand(lab, scheduler, "alice", f"jupyterhub-{hub_id}-alice-x-0a1b2c3d")
        other_hub = submit_by_hand(lab, scheduler, "alice",
                                   "jupyterhub-ffffffff-alice-x-0a1b2c3d")
        own = submit_by_hand(lab, scheduler, "alice", "my-analysis")
        by_hand = [ours, other_hub, own]
        started = time.monotonic()
        assert wait_for(lambda: not listed(ours, "alice", scheduler), 60), active_jobs(
            "alice", scheduler)
        took = time.monotonic() - started
        time.sleep(5 * INTERVAL + 1)  # five more cycles
        assert listed(other_hub, "alice", scheduler) and listed(own, "alice", scheduler)
        assert listed(server_job, "alice", scheduler)
        assert hub.api_server("GET", "alice", "/api/status").status_code == 200
        log = hub.log()
        assert re.search(rf"cancelling job {ours}\S* \(jupyterhub-{hub_id}-alice-x-0a1b2c3d\) "
                         r"of alice, \w+: no running or starting server", log), log[-3000:]
        assert f"cancelling job {other_hub}" not in log and f"cancelling job {own}" not in log
        assert f"cancelling job {server_job}" not in log
        print(f"{scheduler}: hand-submitted job cancelled {took:.1f} s after submission "
              f"(grace {GRACE:g} s, cycle {INTERVAL:g} s)")
        hub.stop("alice")
        assert wait_for(lambda: not listed(server_job, "alice", scheduler), 30)
    finally:
        stop_hub(process)
        cancel_by_hand(lab, scheduler, by_hand)


@pytest.mark.parametrize("scheduler", ["slurm"])
def test_log_mode_cancels_nothing_and_logs_each_job_it_would_cancel_once(
        lab, tmp_path, scheduler):
    hub, process = start_hub(tmp_path, PORTS[scheduler], secrets.token_hex(24),
                             hub_env(scheduler, HUB_RECONCILE="log"))
    job_id = ""
    try:
        hub.api("POST", "/users/alice")
        spawn_and_stop(hub)
        job_id = submit_by_hand(lab, scheduler, "alice",
                                f"jupyterhub-rt{scheduler[:2]}-alice-x-0a1b2c3d")
        assert wait_for(lambda: f"would cancel job {job_id}" in hub.log(), 30), hub.log()[-2000:]
        time.sleep(5 * INTERVAL + 1)
        assert listed(job_id, "alice", scheduler)
        log = hub.log()
        assert log.count(f"would cancel job {job_id} ") == 1
        assert f"cancelling job {job_id}" not in log
    finally:
        stop_hub(process)
        cancel_by_hand(lab, scheduler, [job_id] if job_id else [])


@pytest.mark.parametrize("restart", [False, True], ids=["hub-running", "hub-restarted"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_stop_while_the_controller_is_down_answers_and_the_job_goes_when_it_is_back(
        lab, tmp_path, scheduler, restart):
    """The stop answers within 10 s (the server is gone for the user); the job is the
    reconciler's, and is gone (Grid Engine: deleting) within two cycles (plus the grace) of
    the first listing that answers after the controller's return (the watch backs off while
    the controller is down, so that listing comes at most one back-off delay after it)."""
    port = PORTS[scheduler] + 5
    token = secrets.token_hex(24)
    hub, process = start_hub(tmp_path, port, token, hub_env(scheduler))
    controller_down = False
    job_id = ""
    try:
        hub.api("POST", "/users/alice")
        events, _ = hub.spawn("alice")
        assert events[-1].get("ready"), events
        job_id = active_jobs("alice", scheduler)[0].split()[0].split(".")[0]

        controller(lab, scheduler, up=False)
        controller_down = True
        down = started = time.monotonic()
        hub.stop("alice")
        stop_took = time.monotonic() - started
        assert stop_took < 10, stop_took
        assert "the reconciler cancels it" in hub.log()
        if restart:
            stop_hub(process)  # SIGTERM, then SIGKILL if it lingers
            hub, process = start_hub(tmp_path, port, token, hub_env(scheduler))
        time.sleep(3 * INTERVAL)  # listings fail meanwhile: nothing is "gone"
        controller(lab, scheduler, up=True)
        controller_down = False
        back = time.monotonic()
        assert wait_for(lambda: ended_or_ending(job_id, "alice", scheduler), 90), active_jobs(
            "alice", scheduler)
        gone_after = time.monotonic() - back
        assert wait_for(lambda: not listed(job_id, "alice", scheduler), 120), active_jobs(
            "alice", scheduler)
        unlisted_after = time.monotonic() - back
        # The watch doubles its delay while listings fail: the first listing after the
        # return comes at most one delay later, and a delay is at most the outage's length.
        first_answer = back - down + INTERVAL
        by = by_whom(job_id, hub.log())
        print(f"{scheduler} ({'restarted' if restart else 'running'}): stop answered in "
              f"{stop_took:.1f} s; outage {back - down:.1f} s; cancel taken {gone_after:.1f} s "
              f"and job unlisted {unlisted_after:.1f} s after the controller's return, by {by}")
        assert gone_after <= first_answer + 2 * INTERVAL + GRACE + 5, (gone_after, back - down)
        if scheduler == "sge":  # qdel fails at once: nothing but the reconciler can cancel it
            assert by == "the reconciler", hub.log()[-3000:]
    finally:
        if controller_down:
            controller(lab, scheduler, up=True)
        stop_hub(process)
        cancel_by_hand(lab, scheduler, [job_id] if job_id else [])



def test_a_forward_no_server_owns_is_closed_within_two_cycles_and_a_running_ones_never(
        lab, tmp_path):
    """A forward added to the hub's tunnel service by hand (``bob/ghost``, as a stop whose
    close failed would leave) is closed within two cycles; alice's running server keeps both
    of its forwards and answers throughout."""
    hub, process = start_hub(tmp_path, PORTS["slurm"] + 8, secrets.token_hex(24),
                             hub_env("slurm"))
    tunnels = TunnelClient(tmp_path / "tunnels")
    try:
        hub.api("POST", "/users/alice")
        events, _ = hub.spawn("alice")
        assert events[-1].get("ready"), events
        login = Login(lab.LOGIN_IP, 22, "bob", str(lab.KEY_DIR / "bob"), str(lab.KNOWN_HOSTS))
        asyncio.run(tunnels.ensure_local("bob/ghost", login, "127.0.0.1", lab.COMPUTE_IP, 9))
        added = time.monotonic()
        assert wait_for(lambda: "bob/ghost" not in asyncio.run(tunnels.forwards()),
                        2 * INTERVAL + 5, interval=0.2)
        closed_after = time.monotonic() - added
        assert "closing the tunnel service's forward bob/ghost" in hub.log()
        time.sleep(5 * INTERVAL)
        assert {"alice/", "alice//hub-api"} <= set(asyncio.run(tunnels.forwards()))
        assert hub.api_server("GET", "alice", "/api/status").status_code == 200
        assert "forward alice/" not in hub.log()
        print(f"forward added by hand closed {closed_after:.1f} s later (cycle {INTERVAL:g} s)")
        hub.stop("alice")
    finally:
        stop_hub(process)
        lab.stop_tunnel_service(tmp_path / "tunnels")


def test_a_master_left_by_a_killed_service_is_ended_with_no_server_running(lab, tmp_path):
    """The tunnel service is SIGKILLed while it holds a master of bob's that no forward uses
    (his spawn was on its way) and no server runs, so no spawner asks for the service again:
    the hub's forward cycle starts it (masters are left in its directory), and the new service
    ends that master. Seen in the chaos test: a master left logged in to the login node."""
    hub, process = start_hub(tmp_path, PORTS["slurm"] + 9, secrets.token_hex(24),
                             hub_env("slurm"))
    tunnels = TunnelClient(tmp_path / "tunnels")
    try:
        hub.api("POST", "/users/alice")
        spawn_and_stop(hub)  # alice on record: the cluster's cycle runs with no server
        login = Login(lab.LOGIN_IP, 22, "bob", str(lab.KEY_DIR / "bob"), str(lab.KNOWN_HOSTS))
        master = asyncio.run(tunnels.warm(login))
        service = asyncio.run(tunnels.health())["pid"]
        os.kill(service, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for(lambda: not os.path.exists(f"/proc/{master}"), 3 * INTERVAL + 20,
                        interval=0.2), f"bob's master {master} still runs; {hub.log()[-3000:]}"
        ended_after = time.monotonic() - killed
        assert "ssh master(s) it started are left; starting it" in hub.log()
        assert asyncio.run(tunnels.health())["pid"] != service
        assert asyncio.run(tunnels.forwards()) == {}
        print(f"bob's master ended {ended_after:.1f} s after its service was killed "
              f"(cycle {INTERVAL:g} s)")
    finally:
        stop_hub(process)
        lab.stop_tunnel_service(tmp_path / "tunnels")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_server_culled_while_the_controller_is_down_leaves_no_job(lab, tmp_path, scheduler):
    """The idle culler stops a server while the scheduler's controller is down: the stop
    answers, its cancel does not get through, and the job is gone within two cycles (plus the
    first listing's back-off) of the controller's return. On Slurm (and Torque through its
    wrappers) the stop's own ``scancel`` may still be waiting on the login node and get through
    first; otherwise the reconciler cancels it. (A failed spawn takes the same path, ``_release``;
    the lab's failing scenarios end their own jobs, so it is not repeated here.)"""
    env = hub_env(scheduler, HUB_CULL_TIMEOUT="15", HUB_CULL_EVERY="5")
    hub, process = start_hub(tmp_path, PORTS[scheduler] + 3, secrets.token_hex(24), env)
    controller_down = False
    job_id = ""
    try:
        hub.api("POST", "/users/alice")
        events, _ = hub.spawn("alice", "idle")
        assert events[-1].get("ready"), events
        job_id = active_jobs("alice", scheduler)[0].split()[0].split(".")[0]

        controller(lab, scheduler, up=False)
        controller_down = True
        down = time.monotonic()
        assert wait_for(lambda: "idle" not in hub.api("GET", "/users/alice").json()["servers"],
                        90, 1)
        log = hub.log()
        assert "idle-culler" in log and "DELETE /hub/api/users/alice/servers/idle" in log
        assert "the reconciler cancels it" in log, log[-3000:]
        controller(lab, scheduler, up=True)
        controller_down = False
        gone_after, outage = job_gone_after_return(lab, scheduler, hub, job_id, down, "culled")
        assert gone_after <= (outage + INTERVAL) + 2 * INTERVAL + 5
    finally:
        end_of_outage_test(lab, scheduler, process, job_id, controller_down)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_spawn_that_fails_while_the_controller_is_down_leaves_no_job(lab, tmp_path, scheduler):
    """The ``never-ready`` server's job runs, then the scheduler's controller goes down and
    ``start_timeout`` (15 s) fails the spawn: its cancel cannot get through (the spawn's
    error still says what happened), and the job is gone within two cycles (plus the first
    listing's back-off) of the controller's return."""
    port = 29030 + 3 * SCHEDULERS.index(scheduler)  # and port + 1, port + 81
    hub, process = start_hub(tmp_path, port, secrets.token_hex(24), hub_env(scheduler))
    controller_down = False
    job_id = ""
    try:
        hub.api("POST", "/users/alice")
        response = hub.api("POST", "/users/alice/servers/never-ready", json={"cpus": 1})
        assert response.status_code in (201, 202), response.text
        assert wait_for(lambda: "is running on" in hub.log(), 60), hub.log()[-3000:]
        job_id = active_jobs("alice", scheduler)[0].split()[0].split(".")[0]

        controller(lab, scheduler, up=False)
        controller_down = True
        down = time.monotonic()
        assert wait_for(lambda: "never-ready" not in hub.api("GET", "/users/alice").json()[
            "servers"], 60, 1)
        assert "The server was not ready within start_timeout (15 s)" in hub.log()
        # The cancel is tried once, within stop_cancel_timeout (5 s), in the background.
        assert wait_for(lambda: "the reconciler cancels it" in hub.log(), 15), hub.log()[-3000:]
        controller(lab, scheduler, up=True)
        controller_down = False
        gone_after, outage = job_gone_after_return(lab, scheduler, hub, job_id, down,
                                                   "failed spawn")
        assert gone_after <= (outage + INTERVAL) + 2 * INTERVAL + GRACE + 5
    finally:
        end_of_outage_test(lab, scheduler, process, job_id, controller_down)


def job_gone_after_return(lab, scheduler: str, hub, job_id: str, down: float,
                          case: str) -> tuple[float, float]:
    """The controller, stopped at ``down`` (monotonic), is back now: wait until the job is
    gone (Grid Engine: deleting). Returns (seconds from the return until then, the outage)."""
    back = time.monotonic()
    assert wait_for(lambda: ended_or_ending(job_id, "alice", scheduler), 90), active_jobs(
        "alice", scheduler)
    gone_after = time.monotonic() - back
    print(f"{scheduler} ({case}): outage {back - down:.1f} s; cancel taken {gone_after:.1f} s "
          f"after the controller's return, by {by_whom(job_id, hub.log())}")
    return gone_after, back - down


def end_of_outage_test(lab, scheduler: str, process, job_id: str, controller_down: bool) -> None:
    """What an outage test leaves, undone also after a failure: the controller up, its hub
    stopped, its job cancelled."""
    if controller_down:
        controller(lab, scheduler, up=True)
    stop_hub(process)
    cancel_by_hand(lab, scheduler, [job_id] if job_id else [])
