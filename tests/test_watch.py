"""hub_spawner/watch.py: one listing per cluster per cycle, answers from memory.

The SSH pool here is a stand-in that records each command and answers with recorded scheduler
output (no sshd is reachable from unit tests); tests/integration/test_status_watch.py drives
the same watch through the lab's sshd and real schedulers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hub_spawner.errors import ClusterUnreachable
from hub_spawner.schedulers import (
    CommandOutput,
    JobState,
    SchedulerUnavailable,
    sge,
    slurm,
    statuses_of,
    torque,
)
from hub_spawner.ssh import LoginRefused, SSHTarget
from hub_spawner.watch import Watch
from tests.fixture_output import recorded


def target(user: str) -> SSHTarget:
    return SSHTarget(host="login", port=22, username=user, key_path=f"/k/{user}",
                     known_hosts_path="/kh", connect_timeout=5)


class RecordingPool:
    """Answers every command with ``answer(command)``; records (user, command)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.commands: list[tuple[str, str]] = []

    async def get(self, target: SSHTarget):
        pool = self

        class Connection:
            async def run(self, command: str, timeout: float = 60) -> CommandOutput:
                pool.commands.append((target.username, command))
                result = pool.answer(command)
                if isinstance(result, Exception):
                    raise result
                return result

        return Connection()


SQUEUE = CommandOutput(0, "11|RUNNING|compute|None|alice|jupyterhub-a1-alice--0a1b2c3d\n"
                           "12|PENDING||Resources|bob|my own job\n", "")


async def test_one_listing_serves_every_job_with_a_status_identity():
    # The listing (``%i`` in its format), and job 13's owner confirming that it has ended.
    pool = RecordingPool(lambda command: SQUEUE if "%i" in command else CommandOutput(0, "", ""))
    watch = Watch(slurm, pool, interval=0.05, status_target=target("status"))
    for job_id, user in (("11", "alice"), ("12", "bob"), ("13", "alice")):
        watch.track(job_id, target(user))
    statuses = {job: await watch.status(job) for job in ("11", "12", "13")}
    assert statuses["11"].state is JobState.RUNNING and statuses["11"].node == "compute"
    assert statuses["12"].state is JobState.PENDING and statuses["12"].reason == "Resources"
    assert statuses["13"].state is JobState.DONE  # squeue answered and does not list it
    first = len(pool.commands)
    for _ in range(20):
        await watch.status("11")  # from memory
    assert len(pool.commands) == first
    assert pool.commands[0][0] == "status"
    assert "--users=alice,bob" in pool.commands[0][1]
    await asyncio.sleep(0.12)
    listings = [user for user, command in pool.commands if "%i" in command]
    assert len(listings) >= 2 and set(listings) == {"status"}  # one listing per cycle
    assert {user for user, command in pool.commands if "%i" not in command} == {"alice"}
    for job in ("11", "12", "13"):
        watch.untrack(job)


async def test_without_a_status_identity_jobs_are_listed_per_user():
    pool = RecordingPool(lambda command: SQUEUE)
    watch = Watch(slurm, pool, interval=10)
    watch.track("11", target("alice"))
    watch.track("12", target("bob"))
    await watch.status("11")
    users = sorted(user for user, _ in pool.commands)
    assert users == ["alice", "bob"]
    watch.untrack("11")
    watch.untrack("12")


async def test_a_failing_scheduler_makes_entries_unknown_once_stale_never_gone():
    answers = [SQUEUE]
    pool = RecordingPool(lambda command: answers[-1])
    watch = Watch(slurm, pool, interval=0.05, max_interval=0.1, stale_after=0.3)
    watch.track("11", target("alice"))
    assert (await watch.status("11")).state is JobState.RUNNING
    answers.append(CommandOutput(1, "", "slurm_load_jobs error: Unable to contact slurm "
                                        "controller (connect failure)"))
    await asyncio.sleep(0.15)
    assert (await watch.status("11")).state is JobState.RUNNING  # not stale yet
    await asyncio.sleep(0.4)
    status = await watch.status("11")
    assert status.state is JobState.UNKNOWN
    assert "listing is" in status.reason and "Unable to contact slurm controller" in status.reason
    answers.append(ClusterUnreachable("login node down"))
    await asyncio.sleep(0.2)
    assert (await watch.status("11")).state is JobState.UNKNOWN
    answers.append(SQUEUE)
    await asyncio.sleep(0.3)
    assert (await watch.status("11")).state is JobState.RUNNING
    assert watch.failing == ""
    watch.untrack("11")


async def test_a_job_no_listing_covered_yet_waits_for_one_and_then_is_unknown():
    pool = RecordingPool(lambda command: ClusterUnreachable("no route"))
    watch = Watch(slurm, pool, interval=5)
    watch.track("11", target("alice"))
    status = await watch.status("11", wait=0.2)
    assert status.state is JobState.UNKNOWN and "no route" in status.reason
    with pytest.raises(KeyError):
        await watch.status("99")
    watch.untrack("11")


def test_slurm_list_parsing():
    jobs = slurm.parse_list_output(SQUEUE)
    assert [(j.job_id, j.owner, j.name, j.status.state) for j in jobs] == [
        ("11", "alice", "jupyterhub-a1-alice--0a1b2c3d", JobState.RUNNING),
        ("12", "bob", "my own job", JobState.PENDING),
    ]
    assert jobs[0].status.node == "compute" and jobs[1].status.reason == "Resources"
    with pytest.raises(SchedulerUnavailable, match="Socket timed out"):
        slurm.parse_list_output(CommandOutput(1, "", "slurm_load_jobs error: Socket timed out"))
    with pytest.raises(SchedulerUnavailable, match="unreadable"):
        slurm.parse_list_output(CommandOutput(0, "11|RUNNING\n", ""))
    banner = slurm.parse_list_output(CommandOutput(0, "Welcome to the cluster\n", ""))
    assert banner == []
    name_with_bars = slurm.parse_list_output(CommandOutput(0, "7|RUNNING|n|None|al|a|b\n", ""))
    assert name_with_bars[0].name == "a|b"
    assert slurm.list_command(["bob", "alice", "bob"]) == (
        "squeue --noheader --states=all --users=alice,bob --format='%i|%T|%N|%r|%u|%j'")
    with pytest.raises(ValueError):
        slurm.list_command(["alice;id"])
    with pytest.raises(ValueError):
        slurm.list_command([])


def test_sge_list_parsing_and_command():
    xml = """<?xml version='1.0'?>
<job_info>
  <queue_info>
    <job_list state="running"><JB_job_number>7</JB_job_number><JB_name>jupyterhub-a1-x</JB_name>
      <JB_owner>alice</JB_owner><state>r</state>
      <queue_name>all.q@compute</queue_name></job_list>
  </queue_info>
  <job_info>
    <job_list state="pending"><JB_job_number>8</JB_job_number><JB_name>mine</JB_name>
      <JB_owner>bob</JB_owner><state>qw</state>
      <queue_name></queue_name></job_list>
  </job_info>
</job_info>
"""
    jobs = sge.parse_list_output(CommandOutput(0, xml, ""))
    assert [(j.job_id, j.owner, j.name, j.status.state) for j in jobs] == [
        ("7", "alice", "jupyterhub-a1-x", JobState.RUNNING), ("8", "bob", "mine", JobState.PENDING)]
    assert jobs[0].status.node == "compute"
    assert sge.list_command(["bob", "alice"]) == "qstat -xml -u alice,bob"
    with pytest.raises(ValueError):
        sge.list_command(["alice;id"])
    with pytest.raises(SchedulerUnavailable):
        sge.parse_list_output(CommandOutput(1, "", "error: commlib error"))
    with pytest.raises(SchedulerUnavailable):
        sge.parse_list_output(CommandOutput(0, "<job_info", ""))


def test_torque_list_parsing_keeps_owner_and_name_and_fails_loudly():
    text = ("Job Id: 21.login\n    Job_Name = jupyterhub-a1-x\n    Job_Owner = alice@login\n"
            "    job_state = R\n    exec_host = compute/0\n\n"
            "Job Id: 22.login\n    Job_Name = mine\n    Job_Owner = bob@login\n"
            "    job_state = Q\n")
    jobs = torque.parse_list_output(CommandOutput(0, text, ""))
    assert [(j.job_id, j.owner, j.name, j.status.state) for j in jobs] == [
        ("21.login", "alice", "jupyterhub-a1-x", JobState.RUNNING),
        ("22.login", "bob", "mine", JobState.PENDING)]
    assert torque.parse_list_output(CommandOutput(0, "", "")) == []
    assert torque.list_command(["alice"]) == "qstat -f"
    with pytest.raises(SchedulerUnavailable, match="cannot connect"):
        torque.parse_list_output(CommandOutput(1, "", "cannot connect to server"))
    assert torque.job_key("21.login") == torque.job_key("21") == "21"


async def test_a_pbs_pro_job_that_finishes_during_the_listing_is_done_not_unknown():
    """PBS Pro's qstat exits 35 with ``Job has finished`` for a job that ended while it
    printed; the others' blocks are still there. ``poll()`` reads the watch: the finished job
    is DONE (else its server stays "running" for ever), the other one RUNNING."""
    output = recorded("torque", "pbspro_list_one_finished")
    jobs = torque.parse_list_output(output)
    assert [(j.job_id, j.owner, j.status.state) for j in jobs] == [
        ("5678.pbs-server", "bob", JobState.RUNNING)]
    pool = RecordingPool(lambda command: output)
    watch = Watch(torque, pool, interval=0.05)
    for job_id in ("5678.pbs-server", "5680.pbs-server"):
        watch.track(job_id, target("bob"))
    assert (await watch.status("5680.pbs-server")).state is JobState.DONE
    assert (await watch.status("5678.pbs-server")).state is JobState.RUNNING
    for job_id in ("5678.pbs-server", "5680.pbs-server"):
        watch.untrack(job_id)
    # An error line about anything else is still a failed listing.
    with pytest.raises(SchedulerUnavailable):
        torque.parse_list_output(CommandOutput(35, output.stdout, output.stderr +
                                               "qstat: cannot connect to server\n"))


def test_statuses_of_a_listing_call_an_unlisted_job_done():
    jobs = torque.parse_list_output(CommandOutput(
        0, "Job Id: 21.login\n    job_state = R\n    Job_Owner = alice@login\n", ""))
    statuses = statuses_of(jobs, ["21", "23"], torque.job_key, "gone")
    assert statuses["21"].state is JobState.RUNNING
    assert statuses["23"].state is JobState.DONE and statuses["23"].reason == "gone"


async def test_an_end_seen_only_by_the_status_identity_is_confirmed_by_the_owner(caplog):
    """A site that hides other users' jobs (Slurm PrivateData=jobs) lists nothing of bob's to
    the status identity; bob's own squeue still sees his job running, so it is not ended."""
    def answer(command: str) -> CommandOutput:
        if "--users=" in command:
            return CommandOutput(0, "", "")  # the status identity's listing: nothing
        return CommandOutput(0, "RUNNING|compute|None\n", "")  # bob's own status_command

    pool = RecordingPool(answer)
    watch = Watch(slurm, pool, interval=10, status_target=target("status"))
    watch.track("21", target("bob"))
    status = await watch.status("21")
    assert status.state is JobState.RUNNING, status
    assert [user for user, _ in pool.commands] == ["status", "bob"]
    assert "cannot see other users' jobs" in caplog.text
    watch.untrack("21")


async def test_a_user_listed_only_for_the_reconciler_who_fails_does_not_back_off_the_servers():
    """carol has no server (she is listed for the reconciler) and her listing fails (say her
    key was removed): alice's server's listing still runs every cycle, nothing backs off."""

    class Pool(RecordingPool):
        async def get(self, where: SSHTarget):
            if where.username == "carol":
                raise ClusterUnreachable("the login node refused carol's SSH key")
            return await super().get(where)

    pool = Pool(lambda command: SQUEUE)
    watch = Watch(slurm, pool, interval=0.05)
    watch.track("11", target("alice"))
    watch.list_users({"carol": target("carol")})
    assert await watch.list_once() is True
    assert watch.failing == "" and (await watch.status("11")).state is JobState.RUNNING
    assert "carol" not in watch.listed and "alice" in watch.listed
    watch.untrack("11")
    watch.list_users({})


async def test_an_unreachable_login_node_backs_off_to_30_s_a_failing_scheduler_to_120_s():
    """A refused connection costs the cluster nothing: the watch retries it at least every
    30 s, so the reconciler converges soon after the node is back; squeue failing (an
    overloaded slurmctld) is pressed at most every 120 s."""
    down = {"login": True}

    class Pool(RecordingPool):
        async def get(self, where: SSHTarget):
            if down["login"]:
                raise ClusterUnreachable("Cannot reach the login node login:22: refused")
            return await super().get(where)

    controller_down = CommandOutput(1, "", "slurm_load_jobs error: Unable to contact slurm "
                                           "controller (connect failure)\n")
    watch = Watch(slurm, Pool(lambda command: controller_down), interval=10)
    watch.track("11", target("alice"))
    delays, delay = [], watch.interval
    for _ in range(6):
        assert await watch.list_once() is False
        delay = watch.next_delay(delay, False)
        delays.append(delay)
    assert delays == [20, 30, 30, 30, 30, 30]
    down["login"] = False
    for _ in range(3):
        assert await watch.list_once() is False
        delay = watch.next_delay(delay, False)
        delays.append(delay)
    assert delays[6:] == [60, 120, 120]
    assert watch.next_delay(delay, True) == 10
    watch.untrack("11")


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "torque"])
def test_each_schedulers_recorded_listing_gives_the_running_and_the_pending_job(scheduler):
    """``list_command`` as the lab's real scheduler answered it (tests/fixtures/<scheduler>/
    list_running_pending.*, re-recorded by ``python -m tests.fixtures.record_lab_output
    lists``): alice's two jobs, named as a hub names them, one running on the compute host
    and one waiting."""
    fixtures = Path(__file__).parent / "fixtures" / scheduler
    rc, stdout, stderr = ((fixtures / f"list_running_pending.{part}").read_text()
                          for part in ("rc", "stdout", "stderr"))
    output = CommandOutput(int(rc), stdout, stderr)
    module = {"slurm": slurm, "sge": sge, "torque": torque}[scheduler]
    listed = module.parse_list_output(output)
    # Torque's ``qstat -f`` (here Slurm's wrapper) also lists ended jobs (state C): the
    # Slurm recording's two, cancelled a moment before.
    jobs = [job for job in listed if not job.status.ended]
    assert len(listed) == (4 if scheduler == "torque" else 2), listed
    name = "jupyterhub-0a1b2c3d-alice-default-00c0ffee"  # record_lab_output.LISTED_JOB_NAME
    assert [(job.owner, job.name) for job in jobs] == [("alice", name)] * 2
    states = {job.status.state: job for job in jobs}
    assert set(states) == {JobState.RUNNING, JobState.PENDING}
    assert states[JobState.RUNNING].status.node == "compute"


async def test_a_status_identity_that_cannot_log_in_is_left_aside_and_users_list_their_own(
        caplog):
    """The status account's key is refused: the same cycle lists alice's and bob's jobs over
    their own connections, the log says why and what to check, and the next cycles do not try
    the status account again (for ``STATUS_RETRY_SECONDS``)."""

    class Pool(RecordingPool):
        refusal: Exception = LoginRefused("login refused the SSH key /k/status")

        async def get(self, where: SSHTarget):
            if where.username == "status":
                raise self.refusal
            return await super().get(where)

    pool = Pool(lambda command: SQUEUE)
    watch = Watch(slurm, pool, interval=10, status_target=target("status"))
    watch.track("11", target("alice"))
    watch.track("12", target("bob"))
    # An outage is not a refusal: the status identity stays (the listing just fails).
    pool.refusal = ClusterUnreachable("None of the cluster's 2 login nodes answers")
    assert await watch.list_once() is False
    assert watch.usable_status_target() is not None and not pool.commands
    pool.refusal = LoginRefused("login refused the SSH key /k/status")
    assert await watch.list_once() is True
    assert (await watch.status("11")).state is JobState.RUNNING
    assert (await watch.status("12")).state is JobState.PENDING
    assert sorted(user for user, _ in pool.commands) == ["alice", "bob"]
    assert "the status identity status cannot log in" in caplog.text
    assert "Check status_cluster_username" in caplog.text
    pool.commands.clear()
    assert await watch.list_once() is True
    assert sorted(user for user, _ in pool.commands) == ["alice", "bob"]
    for job in ("11", "12"):
        watch.untrack(job)
