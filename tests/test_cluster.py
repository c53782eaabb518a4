"""hub_spawner/cluster.py: one listing per cluster per cycle, answers from memory.

The SSH pool here is a stand-in that records each command and answers with recorded scheduler
output (no sshd is reachable from unit tests); tests/integration/test_status_watch.py drives
the same watch through the lab's sshd and real schedulers.
"""

from __future__ import annotations

import asyncio

import pytest

from hub_spawner.cluster import Watch
from hub_spawner.errors import ClusterUnreachable
from hub_spawner.schedulers import CommandOutput, JobState, sge, slurm, torque
from hub_spawner.ssh import SSHTarget

from .fixture_output import recorded


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


SQUEUE = CommandOutput(0, "11|RUNNING|compute|None\n12|PENDING||Resources\n", "")


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
    assert "--jobs=11,12,13" in pool.commands[0][1]
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
    ids = ["11", "12", "13"]
    statuses = slurm.parse_list_output(SQUEUE, ids)
    assert [statuses[i].state for i in ids] == [JobState.RUNNING, JobState.PENDING,
                                                 JobState.DONE]
    failed = slurm.parse_list_output(CommandOutput(1, "", "slurm_load_jobs error: Socket timed "
                                                          "out"), ids)
    assert all(s.state is JobState.UNKNOWN for s in failed.values())
    invalid_one = slurm.parse_list_output(
        CommandOutput(1, "", "slurm_load_jobs error: Invalid job id specified"), ["11"])
    assert invalid_one["11"].state is JobState.DONE
    with pytest.raises(ValueError):
        slurm.list_command(["11", "12; id"], [])


def test_sge_list_parsing_and_command():
    xml = """<?xml version='1.0'?>
<job_info>
  <queue_info>
    <job_list state="running"><JB_job_number>7</JB_job_number><state>r</state>
      <queue_name>all.q@compute</queue_name></job_list>
  </queue_info>
  <job_info>
    <job_list state="pending"><JB_job_number>8</JB_job_number><state>qw</state>
      <queue_name></queue_name></job_list>
  </job_info>
</job_info>
"""
    statuses = sge.parse_list_output(CommandOutput(0, xml, ""), ["7", "8", "9"])
    assert statuses["7"].state is JobState.RUNNING and statuses["7"].node == "compute"
    assert statuses["8"].state is JobState.PENDING
    assert statuses["9"].state is JobState.DONE
    assert sge.list_command(["7", "8"], ["bob", "alice"]) == "qstat -xml -u alice,bob"
    with pytest.raises(ValueError):
        sge.list_command(["7"], ["alice;id"])


def test_torque_list_parsing_names_unknown_jobs_done_and_the_rest_by_block():
    text = ("Job Id: 21.login\n    job_state = R\n    exec_host = compute/0\n\n"
            "Job Id: 22.login\n    job_state = Q\n")
    output = CommandOutput(153, text, "qstat: Unknown Job Id 23.login\n")
    statuses = torque.parse_list_output(output, ["21", "22", "23", "24"])
    assert statuses["21"].state is JobState.RUNNING and statuses["21"].node == "compute"
    assert statuses["22"].state is JobState.PENDING
    assert statuses["23"].state is JobState.DONE
    assert statuses["24"].state is JobState.UNKNOWN  # qstat failed and says nothing of it
    assert torque.list_command(["21", "22.login"], []) == "qstat -f 21 22.login"
    down = torque.parse_list_output(CommandOutput(1, "", "cannot connect to server"), ["21"])
    assert down["21"].state is JobState.UNKNOWN


@pytest.mark.parametrize("scheduler, module, running, pending", [
    ("slurm", slurm, "70", "71"), ("sge", sge, "1", "2"), ("torque", torque, "72", "73"),
])
def test_recorded_lab_listings_of_a_running_a_pending_and_an_unknown_job(
        scheduler, module, running, pending):
    """``python -m tests.fixtures.record_lab_output lists``: each scheduler's real answer to
    its own ``list_command`` (Slurm and the Torque wrappers leave an unknown id out silently)."""
    output = recorded(scheduler, "list_running_pending_unknown")
    statuses = module.parse_list_output(output, [running, pending, "99999"])
    assert statuses[running].state is JobState.RUNNING and statuses[running].node == "compute"
    assert statuses[pending].state is JobState.PENDING
    assert statuses["99999"].state is JobState.DONE


async def test_an_end_seen_only_by_the_status_identity_is_confirmed_by_the_owner(caplog):
    """A site that hides other users' jobs (Slurm PrivateData=jobs) lists nothing of bob's to
    the status identity; bob's own squeue still sees his job running, so it is not ended."""
    def answer(command: str) -> CommandOutput:
        if "--jobs=21" in command and "%i" in command:
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
