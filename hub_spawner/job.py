"""What the spawner asks the scheduler about its one job, over the job owner's connection:
its status (with the scheduler's reason), why it ended, its output, its place in the queue,
and its cancel (``JobCalls``); the wait for its server's ready line (``ReadyWait``); and its
files on the login node (``JobFiles``). No
JupyterHub here: a ``JobCalls`` is given the scheduler module, a way to connect, and the
timeouts, so each rule below can be tested against a fake connection as well as the lab.

Rules:
- a failure to ask is ``UNKNOWN`` with the reason, never "ended": only the scheduler saying so
  ends a job;
- a cancel is sent once, bounded by its timeout, and counts as taken only on the cancel
  command's own exit status (``...; hub_spawner_cancel=$?; rm ...; exit $hub_spawner_cancel``);
  a cancel that did not get through is the reconciler's (``hub_spawner.reconciler``), which
  believes only a later listing;
- every value in a command is the scheduler module's (validated there) or ``shlex.quote``-d.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import logging
import posixpath
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

from . import jobfiles
from .errors import BadReadyLine, ClusterUnreachable, JobEndedEarly, SpawnError
from .jobscript import ReadyLine, last_lines, parse_ready_line, server_address
from .schedulers import JobState, JobStatus, QueuePlace, read_output
from .ssh import FileFollower, LoginConnection, SSHTarget

Where = tuple[str, int, str]  # (login host, port, cluster user) of a job; empty: the config's

#: Seconds one listing of a cluster's pending jobs serves every spawn waiting there.
QUEUE_LISTING_SECONDS = 60.0
#: A job submitted after the listing was made is looked up in a new one, at most this often.
QUEUE_REFRESH_SECONDS = 5.0


class QueueListings:
    """The listings of pending jobs (Slurm's ``squeue --states=PENDING``, the whole cluster's)
    that the waiting spawns read their place in the queue from: one per cluster, shared by
    all of them for ``QUEUE_LISTING_SECONDS`` (a job newer than it gets a new one, at most
    every ``QUEUE_REFRESH_SECONDS``), and fetched once however many ask at the same moment.
    A user's own listing only where the shared one does not show her job (Slurm's
    ``PrivateData=jobs`` hides other users' jobs)."""

    def __init__(self) -> None:
        # key -> (monotonic time, wall-clock time, who listed, the output or None)
        self._listings: dict[tuple, tuple[float, float, str, Any]] = {}
        self._fetching: dict[tuple, asyncio.Task] = {}
        self.fetches = 0  # listings made (tests, benchmarks)

    async def get(self, key: tuple, username: str,
                  fetch: Callable[[], Awaitable[Any]], newer_than: float) -> tuple[str, Any]:
        """``(who listed, output)``: the listing for ``key``, fetched by ``fetch()`` (as
        ``username``) if none is fresh enough for a job submitted at ``newer_than`` (wall
        clock); the output is ``None`` when it could not be made."""
        entry = self._listings.get(key)
        if entry is not None:
            age = time.monotonic() - entry[0]
            if age < QUEUE_LISTING_SECONDS and (entry[1] >= newer_than
                                                or age < QUEUE_REFRESH_SECONDS):
                return entry[2], entry[3]
        task = self._fetching.get(key)
        if task is None or task.done():
            task = self._fetching[key] = asyncio.ensure_future(
                self._fetch(key, username, fetch))
        return await asyncio.shield(task)

    async def _fetch(self, key: tuple, username: str,
                     fetch: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
        started, wall = time.monotonic(), time.time()
        self.fetches += 1
        try:
            output = await fetch()
        except ClusterUnreachable:
            return username, None  # not kept: the next spawn to ask tries again
        self._listings[key] = (started, wall, username, output)
        return username, output


@dataclasses.dataclass(frozen=True)
class Cleanup:
    """A snapshot of what to cancel and delete for one server, taken out of its state."""

    job_id: str
    job_name: str
    by_name: bool  # the submission went out but no id came back: cancel by the unique name
    secrets_path: str
    certs_dir: str
    label: str
    where: Where = ("", 0, "")

    def shell_command(self, scheduler: ModuleType, username: str) -> str:
        """The cancel, then the deletions, exiting with the cancel's own status."""
        if self.job_id:
            cancel = scheduler.cancel_command(self.job_id)
        elif self.by_name:
            cancel = scheduler.cancel_by_name_command(self.job_name, username)
        else:
            cancel = "true"
        command = f"{cancel}; hub_spawner_cancel=$?"
        if self.secrets_path:
            command += f"; rm -f -- {shlex.quote(self.secrets_path)}"
        if self.certs_dir:
            command += f"; rm -rf -- {shlex.quote(self.certs_dir)}"
        return command + "; exit $hub_spawner_cancel"


@dataclasses.dataclass
class JobCalls:
    """The scheduler calls about one spawner's job. ``connect(where)`` gives the pooled
    connection as the job's owner at ``where`` (``None``: the current job's, or the config's)."""

    scheduler: ModuleType
    connect: Callable[[Where | None], Awaitable[LoginConnection]]
    target: Callable[[Where | None], Awaitable[SSHTarget]]
    command_timeout: float
    log: logging.Logger | logging.LoggerAdapter
    log_name: str
    queue_listings: QueueListings | None = None  # the hub's, shared by every spawn

    async def status(self, job_id: str, where: Where | None = None) -> JobStatus:
        """The job's status; any failure to ask is ``UNKNOWN`` with the reason. A job in an
        error state, or waiting, comes with the scheduler's reason when its status listing has
        none and the scheduler can tell (Grid Engine's ``qstat -j``)."""
        scheduler = self.scheduler
        try:
            connection = await self.connect(where)
            output = await connection.run(
                scheduler.status_command(job_id), timeout=self.command_timeout
            )
            status = read_output(scheduler.parse_status_output, output, job_id)
            parse_reason = {
                JobState.ERROR: getattr(scheduler, "parse_error_reason", None),
                JobState.PENDING: getattr(scheduler, "parse_pending_reason", None),
            }.get(status.state)
            if parse_reason and not status.reason:
                detail = await connection.run(
                    scheduler.detail_command(job_id), timeout=self.command_timeout
                )
                status = dataclasses.replace(status, reason=parse_reason(detail))
        except ClusterUnreachable as error:
            return JobStatus(JobState.UNKNOWN, reason=str(error))
        return status

    async def explain_end(self, job_id: str, status: JobStatus) -> str:
        """Why the job ended, for people. Schedulers that forget ended jobs at once (Grid
        Engine) are asked their accounting; if that has nothing, the status has to do."""
        scheduler = self.scheduler
        if status.state is not JobState.DONE or not hasattr(scheduler, "end_reason_command"):
            return scheduler.explain_end(status)
        try:
            connection = await self.connect(None)
            for _ in range(4):  # accounting is flushed a moment after the job ends
                output = await connection.run(
                    scheduler.end_reason_command(job_id), timeout=self.command_timeout
                )
                reason = scheduler.parse_end_reason(output)
                if reason:
                    return reason
                await asyncio.sleep(1)
        except ClusterUnreachable as error:
            self.log.warning("%s: cannot ask why the job ended: %s", self.log_name, error)
        return (
            f"{scheduler.explain_end(status)}; its accounting has no record yet "
            f"(`{scheduler.end_reason_command(job_id)}` on the login node will say why)"
        )

    async def output(self, path: str) -> str:
        """The job's output file as it is now; ``""`` (logged) when it cannot be read."""
        try:
            connection = await self.connect(None)
            return await connection.read_file(path) or ""
        except (ClusterUnreachable, OSError) as error:
            self.log.warning("%s: cannot read job output: %s", self.log_name, error)
            return ""

    async def queue_place(self, job_id: str, submitted_at: float = 0.0) -> QueuePlace | None:
        """The pending job's place in its queue and estimated start, where the scheduler
        tells (Slurm); ``None`` otherwise or when it cannot be asked. Read from the listing
        all waiting spawns of the cluster share (``QueueListings``)."""
        scheduler = self.scheduler
        if not hasattr(scheduler, "pending_queue_command"):
            return None
        listings = self.queue_listings or QueueListings()
        try:
            target = await self.target(None)
        except ClusterUnreachable:
            return None

        async def fetch() -> Any:
            connection = await self.connect(None)
            return await connection.run(scheduler.pending_queue_command(),
                                        timeout=self.command_timeout)

        cluster = ("pending", scheduler.NAME, target.host, target.port)
        listed_by, output = await listings.get(cluster, target.username, fetch, submitted_at)
        place = None if output is None else scheduler.parse_pending_queue(output, job_id)
        if place is None and listed_by != target.username:
            # Another user's listing may not show this job (PrivateData), or it failed (that
            # user's key, say): the user's own.
            _, output = await listings.get((*cluster, target.username), target.username, fetch,
                                           submitted_at)
            place = None if output is None else scheduler.parse_pending_queue(output, job_id)
        return place

    def pending_message(self, job_id: str, reason: str, place: QueuePlace | None,
                        waited: float) -> str:
        """``Job 12 is waiting in the queue: waiting for free cores (Slurm: Resources); 2nd
        of 3 waiting in its partition; Slurm expects it to start around 14:05``."""
        scheduler = self.scheduler
        parts = [scheduler.explain_pending(reason)]
        if place is not None:
            parts.append(f"{ordinal(place.position)} of {place.waiting} waiting in its "
                         f"{scheduler.QUEUE_LABEL.lower()}")
            if place.estimated_start:
                parts.append(f"{scheduler.DISPLAY_NAME} expects it to start around "
                             f"{readable_start(place.estimated_start)}")
        text = "; ".join(part for part in parts if part)
        head = f"Job {job_id} is waiting in the queue"
        if waited >= 60:
            head = f"Job {job_id} is still waiting in the queue ({int(waited // 60)} min)"
        return f"{head}: {text}" if text else head

    async def cancel(self, cleanup: Cleanup, timeout: float) -> str:
        """Send ``cleanup``'s cancel and deletions once, within ``timeout``; ``""`` if the
        scheduler took the cancel, else what went wrong (the job is then the reconciler's)."""
        try:
            target = await self.target(cleanup.where)
            command = cleanup.shell_command(self.scheduler, target.username)

            async def send() -> Any:
                connection = await self.connect(cleanup.where)
                return await connection.run(command, timeout=timeout)

            output = await asyncio.wait_for(send(), timeout)
        except Exception as error:
            return str(error) or f"no answer within {timeout:g} s"
        if output.exit_status == 0:
            return ""
        return ((output.stderr.strip() or output.stdout.strip())[-300:]
                or f"exit status {output.exit_status}")

    async def wait_until_gone(self, job_id: str, where: Where, within: float) -> None:
        """Wait up to ``within`` seconds for the scheduler to stop listing a cancelled job;
        what stays is logged (the reconciler cancels it again until no listing shows it)."""
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            status = await self.status(job_id, where)
            if status.state is JobState.DONE:
                return
            if status.state is JobState.UNKNOWN:
                self.log.warning("%s: cannot see whether job %s has ended (%s); the reconciler "
                                 "makes sure it does", self.log_name, job_id, status.reason)
                return
            await asyncio.sleep(0.5)
        self.log.warning(
            "%s: job %s still listed %.0f s after cancelling; the reconciler cancels it again "
            "until no listing shows it", self.log_name, job_id, within,
        )


@dataclasses.dataclass
class ReadyWait:
    """Following one submitted job until its server's ready line, saying on the spawn page
    what it does meanwhile (``emit(progress, message)``).

    Rules: the job's output is followed as it grows (``follower``), so its first line (the job
    runs) and its ready line wake the loop at once; the scheduler is asked on each wake-up and
    every ``interval`` (growing to ``max_interval``), without a follower the output file is
    read on each check instead. A job that ends or is in an error state first fails the spawn
    with the scheduler's reason and the job's last output. The server's address is the node
    the scheduler names (never a name in the job's output, which the user controls) and the
    ready line's port or socket.
    """

    calls: JobCalls
    job_id: str
    output_path: str
    socket_mode: bool  # server_transport == "socket"
    interval: float
    max_interval: float
    emit: Callable[[int, str], None]
    on_running: Callable[[], None]  # each time the job is seen running
    keep_paths: Callable[[], Awaitable[Any]] | None = None  # while it runs: the hub API path
    follow_output: bool = True  # False: only the checks (the benchmark's reference)
    submitted_at: float = 0.0  # wall clock: a queue listing older than that cannot show it
    _pending_said: int = 0
    _no_node_logged: bool = False

    async def run(self) -> ReadyLine:
        """``follow``, with the job's output followed over the owner's connection (without,
        when it cannot be opened: the output is then read at each check)."""
        try:
            follower = await (await self.calls.connect(None)).follow_file(
                self.output_path) if self.follow_output else None
        except ClusterUnreachable as error:
            self.calls.log.warning("%s: cannot follow the job's output: %s",
                                   self.calls.log_name, error)
            follower = None
        try:
            return await self.follow(follower)
        finally:
            if follower is not None:
                follower.close()

    async def follow(self, follower: FileFollower | None) -> ReadyLine:
        interval = self.interval
        reported: Any = None
        pending_since, last_said = 0.0, 0.0
        while True:
            status = await self.calls.status(self.job_id)
            if status.state is JobState.ERROR:
                raise JobEndedEarly(
                    f"Job {self.job_id} cannot run: {self.calls.scheduler.explain_end(status)}. "
                    "It is being deleted; fix the cause (or ask an administrator) and start again."
                )
            if status.ended:
                tail = last_lines(await self.calls.output(self.output_path))
                raise JobEndedEarly(
                    f"Job {self.job_id} ended before the server was ready: "
                    f"{await self.calls.explain_end(self.job_id, status)}."
                    + (f" Last output of the job:\n{tail}" if tail else " It printed nothing.")
                )
            if status.state is JobState.PENDING:
                pending_since = pending_since or time.monotonic()
                waited = time.monotonic() - pending_since
                place = await self.calls.queue_place(self.job_id, self.submitted_at)
                if place is not None and status.estimated_start:
                    # The job's own status is fresher than the shared listing (a minute).
                    place = dataclasses.replace(place, estimated_start=status.estimated_start)
                said = (status.reason, place)
                if reported != ("pending", said) or waited - last_said >= 60:
                    reported, last_said = ("pending", said), waited
                    # The bar creeps from 30 to 45 while the job waits, a step per message.
                    self.emit(min(30 + self._pending_said, 45), self.calls.pending_message(
                        self.job_id, status.reason, place, waited))
                    self._pending_said += 1
            elif status.state is JobState.RUNNING:
                self.on_running()
                if self.keep_paths is not None:  # the starting server needs the hub's API
                    await self.keep_paths()
                if reported != ("running", status.node):
                    reported = ("running", status.node)
                    self.emit(50, f"Job {self.job_id} is running on {status.node}; starting "
                                  "the server")
                ready = await self.read_ready_line(status.node, follower)
                if ready is not None:
                    return ready
            elif status.state is JobState.UNKNOWN:
                self.calls.log.warning("%s: status of job %s unknown: %s", self.calls.log_name,
                                       self.job_id, status.reason)
            if follower is None or follower.ended:
                if status.state is JobState.RUNNING:
                    interval = self.interval  # the server is starting: look often
                else:
                    interval = min(interval * 1.5, self.max_interval)
                await asyncio.sleep(interval)
            else:
                # Output wakes us (the job's first line, its ready line); the scheduler is
                # asked in between only to see a job that ends or waits without a word.
                interval = min(interval * 1.5, self.max_interval)
                await follower.wait(interval)

    async def read_ready_line(self, scheduled_node: str,
                              follower: FileFollower | None = None) -> ReadyLine | None:
        """The server's address once the job's output has its ready line; ``None`` while
        there is none, or the scheduler names no node yet. The output is what ``follower``
        has, or else read from the file."""
        name = self.calls.scheduler.DISPLAY_NAME
        if not scheduled_node:
            if not self._no_node_logged:
                self._no_node_logged = True
                self.calls.log.warning("%s: %s reports job %s running but names no node yet; "
                                       "waiting for it", self.calls.log_name, name, self.job_id)
            return None
        try:
            # What the follower has (a ready line it got stays good after it ended: e.g. a
            # line too long for it came later), else the file's tail.
            ready = parse_ready_line(follower.text) if follower is not None else None
            if ready is None and (follower is None or follower.ended):
                ready = parse_ready_line(await self.calls.output(self.output_path))
        except ValueError as error:
            raise BadReadyLine(f"Job {self.job_id} reported an unusable address: {error}") from None
        if ready is None:
            return None
        if bool(ready.socket) != self.socket_mode:
            wanted, transport = ("a Unix socket", "socket") if self.socket_mode else (
                "a TCP port", "tcp")
            raise BadReadyLine(
                f"Job {self.job_id} reported its server on {ready.socket or ready.port}, but "
                f"server_transport is {transport!r}, which wants {wanted}; is "
                "job_script_template an old copy?"
            )
        try:
            return server_address(ready, scheduled_node)
        except ValueError as error:
            raise BadReadyLine(
                f"Not connecting to job {self.job_id}: {error} ({name}). If that node's own "
                f"host name differs from {name}'s name for it (e.g. a domain added), tell an "
                "administrator: the two must be the same."
            ) from None


@dataclasses.dataclass
class JobFiles:
    """A user's job files on the login node, under ``remote_state_dir`` (layout and retention
    rules: ``jobfiles``): the job's own fresh directory, the server's certificates, and the
    removal of old job directories."""

    connection: LoginConnection
    remote_state_dir: str  # relative to the user's home, or absolute
    command_timeout: float
    log: logging.Logger
    log_name: str

    async def state_dir(self) -> str:
        """``remote_state_dir`` as an absolute, checked path (made 0700 if missing)."""
        try:
            path = jobfiles.check_remote_path(
                posixpath.join(await self.connection.home(), self.remote_state_dir))
        except ValueError as error:
            raise SpawnError(str(error)) from None
        await self.connection.make_private_dir(path)
        return path

    async def make_job_dir(self, job_name: str) -> tuple[jobfiles.JobPaths, str,
                                                        jobfiles.RemoteEntry]:
        """The job's paths, made in a fresh directory of its own (refused if it exists: no file
        in it can be one somebody prepared); also the state directory and the new entry."""
        state_dir = await self.state_dir()
        try:
            paths = jobfiles.job_paths(state_dir, job_name)
        except ValueError as error:
            raise SpawnError(str(error)) from None
        return paths, state_dir, await self.connection.make_new_private_dir(paths.directory)

    async def remove_old(self, state_dir: str, current: jobfiles.RemoteEntry, keep: int,
                         min_age: float) -> None:
        """Delete the job directories beyond the newest ``keep`` that are older than
        ``min_age`` seconds; a failure is logged, never raised (the spawn goes on)."""
        try:
            entries = await self.connection.list_dir(state_dir)
            names = jobfiles.expired_entries(entries, keep, current, min_age)
            command = jobfiles.remove_command(state_dir, names)
            if not command:
                return
            output = await self.connection.run(command, timeout=self.command_timeout)
        except (ClusterUnreachable, ValueError) as error:
            self.log.warning("%s: could not remove old job files in %s: %s", self.log_name,
                             state_dir, error)
            return
        if output.exit_status:
            self.log.warning("%s: removing old job files in %s failed: %s", self.log_name,
                             state_dir, output.stderr.strip()[-300:])
        else:
            self.log.info("%s: removed %d old job file(s) in %s (job_files_keep = %d)",
                          self.log_name, len(names), state_dir, keep)

    async def put_certs(self, name: str, paths: dict[str, str]) -> tuple[str, dict[str, str]]:
        """Copy the server's TLS files (``keyfile``, ``certfile``, ``cafile``) into a fresh
        0700 directory ``name`` (plus a random suffix) as 0600 files; its path and theirs."""
        directory = posixpath.join(await self.state_dir(), f"{name}-{secrets.token_hex(4)}")
        await self.connection.make_new_private_dir(directory)  # fresh: files are created in it
        remote = {}
        for kind in ("keyfile", "certfile", "cafile"):
            remote[kind] = posixpath.join(directory, kind + ".pem")
            with open(paths[kind]) as local:
                await self.connection.write_private_file(remote[kind], local.read())
        return directory, remote


def ordinal(number: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ``11th``, ``21st``."""
    if 10 <= number % 100 <= 20:
        return f"{number}th"
    return f"{number}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(number % 10, 'th') }"


def readable_start(text: str) -> str:
    """A scheduler's ``2026-12-05T14:05:00`` (the cluster's local time) as ``14:05`` when it
    is today there and ``2026-12-05 14:05`` otherwise; anything else as it is."""
    try:
        when = time.strptime(text, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return text
    today = time.localtime()
    if (when.tm_year, when.tm_yday) == (today.tm_year, today.tm_yday):
        return time.strftime("%H:%M", when)
    return time.strftime("%Y-%m-%d %H:%M", when)


def iso_time(seconds: float) -> str:
    """``2026-12-04T21:30:00Z``, or ``""`` for 0."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds else ""


def parse_iso_time(text: Any) -> float:
    """A time written by ``iso_time``; 0 when missing or unreadable."""
    if not isinstance(text, str) or not text:
        return 0.0
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return 0.0
