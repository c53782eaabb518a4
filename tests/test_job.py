"""hub_spawner/job.py against a fake connection (no cluster): what the spawn page says while a
job waits, and the one-shot cancel, which counts only on the cancel command's own exit status.
The lab tests drive the same calls through real schedulers (test_slurm_spawn, test_reconciler);
the fake here is only for what the lab cannot make happen on demand (a hung connection)."""

import asyncio
import logging
import shlex
import time

import pytest

from hub_spawner.errors import ClusterUnreachable, SpawnError
from hub_spawner.job import (
    Cleanup,
    JobCalls,
    JobFiles,
    QueueListings,
    ordinal,
    readable_start,
)
from hub_spawner.jobfiles import RemoteEntry
from hub_spawner.schedulers import CommandOutput, JobState, QueuePlace, sge, slurm
from hub_spawner.ssh import SSHTarget

HOSTILE = "/home/alice/.hub-spawner/x'; touch /tmp/pwned; '/server.env"


class FakeConnection:
    """Records each command; answers with ``answer`` (an output, an exception to raise, or
    ``None``: never answers)."""

    def __init__(self, answer):
        self.answer = answer
        self.commands: list[str] = []

    async def run(self, command: str, timeout: float) -> CommandOutput:
        self.commands.append(command)
        if self.answer is None:
            await asyncio.sleep(3600)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def calls_with(connection: FakeConnection, scheduler=slurm) -> JobCalls:
    async def connect(where=None):
        return connection

    async def target(where=None):
        return SSHTarget(host="login", port=22, username="alice", key_path="k",
                         known_hosts_path="kh")

    return JobCalls(scheduler, connect, target, 5.0, logging.getLogger("test"), "alice")


def test_a_pending_message_puts_the_reason_place_and_estimate_in_words():
    calls = calls_with(FakeConnection(None))
    today = time.strftime("%Y-%m-%dT14:05:00")
    message = calls.pending_message("12", "Resources", QueuePlace(2, 3, today), 0)
    assert message == (
        "Job 12 is waiting in the queue: waiting for free cores, memory or GPUs (Slurm: "
        "Resources); 2nd of 3 waiting in its partition; Slurm expects it to start around 14:05")
    later = calls.pending_message("12", "Priority", QueuePlace(1, 1, "2031-01-02T03:04:05"), 130)
    assert later.startswith("Job 12 is still waiting in the queue (2 min): other jobs")
    assert later.endswith("expects it to start around 2031-01-02 03:04")
    assert calls.pending_message("12", "", None, 0) == "Job 12 is waiting in the queue"


@pytest.mark.parametrize("number, text", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"),
                                          (11, "11th"), (12, "12th"), (13, "13th"),
                                          (21, "21st"), (102, "102nd"), (111, "111th")])
def test_ordinals(number, text):
    assert ordinal(number) == text


def test_an_unreadable_start_estimate_is_shown_as_the_scheduler_wrote_it():
    assert readable_start("soon") == "soon"


def cleanup(**fields) -> Cleanup:
    base = dict(job_id="81", job_name="jupyterhub-abcd1234-alice-default-0a1b2c3d",
                by_name=False, secrets_path=HOSTILE, certs_dir="", label="job 81 of alice")
    return Cleanup(**{**base, **fields})


def test_the_cancel_exits_with_the_cancels_own_status_and_quotes_the_paths():
    command = cleanup(certs_dir="/home/alice/certs $(id)").shell_command(slurm, "alice")
    assert command == (
        f"scancel 81; hub_spawner_cancel=$?; rm -f -- {shlex.quote(HOSTILE)}; "
        f"rm -rf -- {shlex.quote('/home/alice/certs $(id)')}; exit $hub_spawner_cancel")
    by_name = cleanup(job_id="", by_name=True, secrets_path="").shell_command(sge, "alice")
    assert by_name.startswith("qdel ") and by_name.endswith("; exit $hub_spawner_cancel")
    assert cleanup(job_id="", secrets_path="").shell_command(slurm, "alice") == (
        "true; hub_spawner_cancel=$?; exit $hub_spawner_cancel")


@pytest.mark.parametrize(("answer", "said"), [
    (CommandOutput(0, "", ""), ""),
    (CommandOutput(1, "", "scancel: error: Unable to contact slurm controller\n"),
     "scancel: error: Unable to contact slurm controller"),
    (CommandOutput(2, "", ""), "exit status 2"),
    (ClusterUnreachable("Cannot connect to login:22"), "Cannot connect to login:22"),
])
def test_a_cancel_counts_as_taken_only_on_its_own_exit_status(answer, said):
    connection = FakeConnection(answer)
    assert asyncio.run(calls_with(connection).cancel(cleanup(), 5.0)) == said
    assert connection.commands[0].startswith("scancel 81;")


def test_a_cancel_that_never_answers_gives_up_within_its_timeout():
    """A login node that takes the connection and then hangs (only a fake can hang on
    demand; the lab's controller-down tests cover a real refusal)."""
    started = time.monotonic()
    said = asyncio.run(calls_with(FakeConnection(None)).cancel(cleanup(), 0.3))
    assert time.monotonic() - started < 2
    assert said == "no answer within 0.3 s"


def test_a_status_that_cannot_be_asked_is_unknown_never_ended():
    calls = calls_with(FakeConnection(ClusterUnreachable("login node down")))
    status = asyncio.run(calls.status("81"))
    assert status.state is JobState.UNKNOWN and status.reason == "login node down"
    assert not status.ended


class FakeFiles:
    """A login node's SFTP side for ``JobFiles``: records what is made and written."""

    def __init__(self, home="/home/alice"):
        self._home, self.dirs, self.files = home, [], {}

    async def home(self):
        return self._home

    async def make_private_dir(self, path):
        self.dirs.append(("private", path))

    async def make_new_private_dir(self, path):
        self.dirs.append(("new", path))
        return RemoteEntry(path.rsplit("/", 1)[1], 0.0, 1000, True, False)

    async def write_private_file(self, path, text):
        self.files[path] = text


def files_on(connection, state_dir=".hub-spawner"):
    return JobFiles(connection, state_dir, 5.0, logging.getLogger("test"), "alice")


def test_a_jobs_files_go_in_a_fresh_directory_of_its_own_under_the_state_dir():
    connection = FakeFiles()
    name = "jupyterhub-prod-alice-default-0a1b2c3d"
    paths, state_dir, entry = asyncio.run(files_on(connection).make_job_dir(name))
    assert state_dir == "/home/alice/.hub-spawner"
    assert paths.directory == f"/home/alice/.hub-spawner/{name}" and entry.name == name
    assert paths.output == f"{paths.directory}/job.out"
    assert connection.dirs == [("private", state_dir), ("new", paths.directory)]


@pytest.mark.parametrize("state_dir", ["x'; touch /tmp/pwned; '", "../$(id)", "a b"])
def test_a_state_dir_that_is_not_a_plain_path_is_a_clear_spawn_error(state_dir):
    connection = FakeFiles()
    with pytest.raises(SpawnError, match="remote_state_dir"):
        asyncio.run(files_on(connection, state_dir).make_job_dir("jupyterhub-x-0a1b2c3d"))
    assert connection.dirs == []


def test_the_servers_certificates_go_in_a_fresh_private_directory(tmp_path):
    local = {}
    for kind in ("keyfile", "certfile", "cafile"):
        (tmp_path / kind).write_text(f"{kind} text")
        local[kind] = str(tmp_path / kind)
    connection = FakeFiles()
    directory, remote = asyncio.run(files_on(connection).put_certs("certs-alice-default",
                                                                   local))
    assert directory.startswith("/home/alice/.hub-spawner/certs-alice-default-")
    assert ("new", directory) in connection.dirs
    assert remote["keyfile"] == f"{directory}/keyfile.pem"
    assert connection.files[remote["cafile"]] == "cafile text"


# --- the queue place: one listing of pending jobs per cluster ---------------------------------

PENDING = CommandOutput(0, "30|debug|100|N/A\n31|debug|900|2026-12-07T10:00:00\n"
                           "32|debug|500|N/A\n", "")


def calls_of(user: str, connection: FakeConnection, listings: QueueListings) -> JobCalls:
    async def connect(where=None):
        return connection

    async def target(where=None):
        return SSHTarget(host="login", port=22, username=user, key_path="k",
                         known_hosts_path="kh")

    return JobCalls(slurm, connect, target, 5.0, logging.getLogger("test"), user, listings)


def test_ten_waiting_spawns_share_one_listing_of_the_queue():
    """Issue 28: each waiting spawn ran its own ``squeue --states=PENDING`` of the whole
    cluster every few seconds; now one listing serves them all for a minute."""
    async def scenario():
        listings = QueueListings()
        connections = [FakeConnection(PENDING) for _ in range(10)]
        submitted = time.time() - 1  # before the listing: it shows them
        places = await asyncio.gather(*(
            calls_of(f"user{n}", connection, listings).queue_place(
                ("30", "31", "32")[n % 3], submitted)
            for n, connection in enumerate(connections)))
        for _ in range(5):  # later waits of the same spawns
            await calls_of("user1", connections[1], listings).queue_place("31", submitted)
        return places, sum(len(c.commands) for c in connections), listings.fetches

    places, commands, fetches = asyncio.run(scenario())
    assert (commands, fetches) == (1, 1)
    assert places[1] == QueuePlace(1, 3, "2026-12-07T10:00:00") and places[0].position == 3


def test_a_job_newer_than_the_listing_gets_a_new_one_but_not_at_every_look(monkeypatch):
    async def scenario():
        listings = QueueListings()
        connection = FakeConnection(PENDING)
        calls = calls_of("alice", connection, listings)
        await calls.queue_place("30", time.time() - 1)
        await calls.queue_place("33", time.time() + 1)  # newer, but the listing is 0 s old
        first = len(connection.commands)
        monkeypatch.setattr("hub_spawner.job.QUEUE_REFRESH_SECONDS", 0.0)
        await calls.queue_place("33", time.time() + 1)
        return first, len(connection.commands)

    assert asyncio.run(scenario()) == (1, 2)


def test_a_listing_that_hides_the_users_job_is_followed_by_her_own():
    """Slurm's ``PrivateData=jobs``: bob's listing shows only bob's jobs."""
    async def scenario():
        listings = QueueListings()
        bobs = FakeConnection(CommandOutput(0, "40|debug|100|N/A\n", ""))
        alices = FakeConnection(CommandOutput(0, "41|debug|100|N/A\n", ""))
        await calls_of("bob", bobs, listings).queue_place("40", time.time() - 1)
        place = await calls_of("alice", alices, listings).queue_place("41", time.time() - 1)
        return place, len(bobs.commands), len(alices.commands)

    assert asyncio.run(scenario()) == (QueuePlace(1, 1, ""), 1, 1)


def test_a_queue_listing_that_fails_is_no_place_not_an_error():
    async def scenario():
        listings = QueueListings()
        broken = FakeConnection(ClusterUnreachable("login down"))
        return await calls_of("alice", broken, listings).queue_place("30", time.time())

    assert asyncio.run(scenario()) is None


def test_a_failed_shared_listing_is_not_kept_and_the_user_lists_her_own():
    """bob's key is broken: his failed listing hides nobody's place, and is tried again."""
    async def scenario():
        listings = QueueListings()
        broken = FakeConnection(ClusterUnreachable("bob's key is refused"))
        alices = FakeConnection(PENDING)
        assert await calls_of("bob", broken, listings).queue_place("30", time.time()) is None
        assert await calls_of("bob", broken, listings).queue_place("30", time.time()) is None
        place = await calls_of("alice", alices, listings).queue_place("31", time.time() - 1)
        return place, len(broken.commands), len(alices.commands)

    place, bobs, alices = asyncio.run(scenario())
    assert place == QueuePlace(1, 3, "2026-12-07T10:00:00") and (bobs, alices) == (2, 1)
