"""One scheduler listing per cluster per cycle, shared by every spawner (kubespawner's
reflector, for batch jobs); and the cluster's live load for the spawn form, cached the same way.

Requirements:
- while it tracks jobs or knows cluster users, a watch runs, every ``interval`` seconds, one
  listing of every job of those users (the scheduler module's ``list_command``): through one
  connection of the status identity when one is configured, else one per cluster user, on the
  pooled connections; after each cycle it hands what it saw to ``after_cycle`` (the
  reconciler, ``hub_spawner.reconciler``);
- ``status()`` answers from memory, with no SSH round trip; a job that no listing has covered
  yet waits for the next completed cycle (bounded), then is ``UNKNOWN`` if that failed. An
  entry older than ``stale_after`` is ``UNKNOWN``, never "gone": only the scheduler saying so
  ends a job;
- with a status identity, a job its listing calls ended is confirmed over its owner's own
  connection before anyone hears "ended" (a site may hide other users' jobs);
- a listing that fails keeps the old entries (they go stale) and backs off (the interval
  doubles): up to ``max_interval`` when the scheduler answered with an error (an overloaded
  controller is not pressed), only up to ``unreachable_max_interval`` when the login node
  could not even be reached (a refused connection costs the cluster nothing, and the
  reconciler must converge soon after the node is back); each listing's cost (seconds,
  bytes, jobs) is logged at debug level, a change between working and failing at
  warning/info.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType

from . import metrics
from .errors import ClusterUnreachable
from .schedulers import (
    JobState,
    JobStatus,
    ListedJob,
    QueueLoad,
    SchedulerUnavailable,
    read_output,
    statuses_of,
)
from .ssh import ConnectionPool, LoginRefused, SSHTarget

log = logging.getLogger("hub_spawner.watch")

#: How long a status identity that could not log in is left aside (users list their own).
STATUS_RETRY_SECONDS = 300.0


@dataclass
class _Entry:
    status: JobStatus
    at: float  # time.monotonic() of the listing


@dataclass
class Listing:
    """The jobs of one cluster user as the last listing that answered showed them."""

    at: float  # time.monotonic() of that listing
    jobs: list[ListedJob]


@dataclass
class Watch:
    """The job statuses of one cluster (scheduler + login node + status identity)."""

    scheduler: ModuleType
    pool: ConnectionPool
    interval: float = 10.0
    max_interval: float = 120.0
    unreachable_max_interval: float = 30.0
    stale_after: float = 35.0
    command_timeout: float = 60.0
    status_target: SSHTarget | None = None
    owners: dict[str, SSHTarget] = field(default_factory=dict)  # job id -> its user's target
    users: dict[str, SSHTarget] = field(default_factory=dict)  # more users to list (reconciler)
    entries: dict[str, _Entry] = field(default_factory=dict)
    listed: dict[str, Listing] = field(default_factory=dict)  # cluster user -> their jobs
    listings: int = 0  # scheduler commands run, for tests and benchmarks
    failing: str = ""
    cycles: int = 0  # completed listing cycles
    cycle_started: float = 0.0  # time.monotonic() when the last completed cycle began
    after_cycle: Callable[[Watch], Awaitable[None]] | None = None  # the reconciler
    loop: asyncio.AbstractEventLoop | None = None
    log: logging.Logger = log
    _task: asyncio.Task | None = None
    _users_failing: dict[str, str] = field(default_factory=dict)  # said once per user
    _scheduler_failed: bool = False  # this cycle, a server's listing reached the scheduler
    #: Until then the status identity is not used: it could not log in (listed per user).
    status_refused_until: float = 0.0
    _status_refused: str = ""  # why, said once

    def track(self, job_id: str, owner: SSHTarget) -> None:
        """List ``job_id`` from now on (``owner``: the connection to use when there is no
        status identity; the latest one given is used). Raises ``ValueError`` for an owner
        the scheduler's commands refuse, which would otherwise spoil every listing."""
        self.scheduler.quote_job_id(job_id)
        self.scheduler.list_command([owner.username])
        self.owners[job_id] = owner
        self.start()

    def seed(self, job_id: str, known: JobStatus) -> None:
        """What the spawner itself has just seen of a tracked job (running, at the end of its
        start), until a listing covers it: a poll right after a start (JupyterHub's, before
        a stop) answers at once, not after the next cycle."""
        if job_id in self.owners and job_id not in self.entries:
            self.entries[job_id] = _Entry(known, time.monotonic())

    def untrack(self, job_id: str) -> None:
        self.owners.pop(job_id, None)
        self.entries.pop(job_id, None)

    def list_users(self, users: dict[str, SSHTarget]) -> None:
        """List these cluster users' jobs too, every cycle, whether or not a server of theirs
        is tracked (the reconciler's view); replaces the previous set."""
        for username in users:
            self.scheduler.list_command([username])
        self.users = dict(users)
        if users:
            self.start()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def status(self, job_id: str, wait: float | None = None) -> JobStatus:
        """The job's last listed status; ``UNKNOWN`` (with why) when that is older than
        ``stale_after``, or when no listing has covered it within ``wait`` seconds."""
        if job_id not in self.owners:
            raise KeyError(f"job {job_id} is not tracked")
        wait = self.command_timeout + 1 if wait is None else wait
        deadline = time.monotonic() + wait
        # The cycle running now may have started before the job was tracked: wait for the next.
        start = self.cycles
        # A cycle that failed meanwhile ends the wait: the next one is backed off.
        while (job_id not in self.entries and self.cycles < start + 2
               and not (self.failing and self.cycles > start)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        entry = self.entries.get(job_id)
        if entry is None:
            why = f": {self.failing}" if self.failing else ""
            return JobStatus(JobState.UNKNOWN, reason=f"no scheduler listing yet{why}")
        age = time.monotonic() - entry.at
        if age > self.stale_after:
            why = f" ({self.failing})" if self.failing else ""
            return JobStatus(
                JobState.UNKNOWN,
                reason=f"the last scheduler listing is {age:.0f} s old{why}",
            )
        return entry.status

    async def _run(self) -> None:
        delay = self.interval
        while self.owners or self.users:
            try:
                ok = await self.list_once()
            except Exception as error:  # never let the watch die: poll() depends on it
                self.log.error("%s: listing failed unexpectedly: %s", self.name, error,
                               exc_info=True)
                ok = False
            if self.after_cycle is not None:
                try:
                    await self.after_cycle(self)
                except Exception as error:  # the reconciler must not stop the listings
                    self.log.error("%s: reconciling failed unexpectedly: %s", self.name, error,
                                   exc_info=True)
            delay = self.next_delay(delay, ok)
            await asyncio.sleep(delay)
        self._task = None

    def next_delay(self, delay: float, ok: bool) -> float:
        """Seconds to the next cycle after one that took ``delay`` and did (``ok``) or did not
        answer: see the module's requirements."""
        return self.interval if ok else min(delay * 2, self._back_off_cap)

    @property
    def _back_off_cap(self) -> float:
        if self._scheduler_failed:
            return self.max_interval
        return min(self.max_interval, self.unreachable_max_interval)

    async def list_once(self) -> bool:
        """One cycle: one listing per connection group (every user of the group at once).
        True if every listing answered."""
        started = time.monotonic()
        self._scheduler_failed = False
        status = self.usable_status_target()
        groups: dict[str, tuple[SSHTarget, set[str], list[str]]] = {}
        for username, user_target in [
            *((owner.username, owner) for owner in self.owners.values()),
            *self.users.items(),
        ]:
            if status is None and user_target == self.status_target:
                continue  # given before it was refused: the hub gives their own next cycle
            target = status or user_target
            key = repr((target.host, target.port, target.username))
            groups.setdefault(key, (target, set(), []))[1].add(username)
        for job_id, owner in self.owners.items():
            target = status or owner
            groups[repr((target.host, target.port, target.username))][2].append(job_id)
        ok = True
        for target, usernames, job_ids in groups.values():
            # A group listed only for the reconciler (no server's job in it) that fails does
            # not back off the servers' listings: its users' jobs are just not reconciled.
            if not await self._list_group(target, sorted(usernames), job_ids) and job_ids:
                ok = False
            if status is not None and not self.usable_status_target():
                return await self.list_once()  # it could not log in: this cycle per user
        if ok and self.failing:
            self.log.info("%s: the scheduler answers again", self.name)
            self.failing = ""
        self.cycles += 1
        self.cycle_started = started
        return ok

    def usable_status_target(self) -> SSHTarget | None:
        """The status identity, unless it could not log in lately."""
        if self.status_target is None or time.monotonic() < self.status_refused_until:
            return None
        return self.status_target

    async def _list_group(self, target: SSHTarget, usernames: list[str],
                          job_ids: list[str]) -> bool:
        started = time.monotonic()
        connected = False
        try:
            command = self.scheduler.list_command(usernames)
            try:
                connection = await self.pool.get(target)
            except ClusterUnreachable as error:
                if target == self.status_target and isinstance(error, LoginRefused):
                    self._refuse_status(str(error))
                raise
            connected = True
            output = await connection.run(command, timeout=self.command_timeout)
            jobs = read_output(self.scheduler.parse_list_output, output)
        except (ClusterUnreachable, SchedulerUnavailable, ValueError) as error:
            metrics.LISTING_FAILURES.labels(
                self.cluster_label, "scheduler" if connected else "unreachable").inc()
            if job_ids:
                self._scheduler_failed = self._scheduler_failed or connected
                self._failed(str(error))
            elif self._users_failing.get(target.username) != str(error):
                self._users_failing[target.username] = str(error)
                self.log.warning("%s: cannot list the jobs of %s (no server of theirs runs; "
                                 "their jobs are not reconciled until it works): %s",
                                 self.name, target.username, error)
            return False
        self._users_failing.pop(target.username, None)
        self.listings += 1
        metrics.LISTING_SECONDS.labels(self.cluster_label).observe(time.monotonic() - started)
        self.log.debug(
            "%s: %s for %d user(s), %d job(s) of ours, as %s: %.3f s, %d bytes, %d jobs",
            self.name, command.split()[0], len(usernames), len(job_ids), target.username,
            time.monotonic() - started, len(output.stdout) + len(output.stderr), len(jobs),
        )
        gone = f"{self.scheduler.DISPLAY_NAME} no longer lists the job"
        statuses = statuses_of(jobs, job_ids, self.scheduler.job_key, gone)
        await self._confirm_ends(statuses)
        now = time.monotonic()
        for job_id, job_status in statuses.items():
            if job_id in self.owners:
                self.entries[job_id] = _Entry(job_status, now)
        for username in usernames:
            self.listed[username] = Listing(now, [j for j in jobs if j.owner == username])
        return True

    def _refuse_status(self, why: str) -> None:
        """The status identity cannot log in (no key, refused, host key): list each user's
        jobs over their own connection for ``STATUS_RETRY_SECONDS``, and say so once."""
        self.status_refused_until = time.monotonic() + STATUS_RETRY_SECONDS
        if why != self._status_refused:
            self._status_refused = why
            self.log.warning(
                "%s: the status identity %s cannot log in (%s); listing each user's jobs over "
                "their own connection instead (one listing per user per cycle; trying it again "
                "in %.0f s). Check status_cluster_username and its key or certificate.",
                self.name, self.status_target.username if self.status_target else "?", why,
                STATUS_RETRY_SECONDS)

    async def _confirm_ends(self, statuses: dict[str, JobStatus]) -> None:
        """A job the status identity's listing calls ended is asked about once more over its
        owner's own connection: a site that hides other users' jobs (Slurm
        ``PrivateData=jobs``) must not make every other user's server look ended."""
        if self.status_target is None:
            return
        for job_id, job_status in list(statuses.items()):
            owner = self.owners.get(job_id)
            if job_status.state is not JobState.DONE or owner is None or (
                    owner.username == self.status_target.username):
                continue
            try:
                connection = await self.pool.get(owner)
                output = await connection.run(self.scheduler.status_command(job_id),
                                              timeout=self.command_timeout)
            except ClusterUnreachable as error:
                statuses[job_id] = JobStatus(JobState.UNKNOWN, reason=str(error))
                continue
            confirmed = read_output(self.scheduler.parse_status_output, output, job_id)
            if confirmed.state is not JobState.DONE:
                self.log.warning(
                    "%s: %s's job %s is missing from the listing as %s, but %s still sees it "
                    "(%s): the status identity cannot see other users' jobs here; unset "
                    "status_cluster_username", self.name, owner.username, job_id,
                    self.status_target.username, owner.username, confirmed.state.value,
                )
            statuses[job_id] = confirmed

    def _failed(self, why: str) -> None:
        if why != self.failing:
            self.log.warning(
                "%s: cannot list the hub's jobs: %s; servers keep running, their state is "
                "unknown until a listing succeeds (retrying, backing off to %.0f s)",
                self.name, why, self._back_off_cap,
            )
        self.failing = why

    @property
    def name(self) -> str:
        return f"{self.scheduler.DISPLAY_NAME} at {self._where(with_port=True)}"

    @property
    def cluster_label(self) -> str:
        """The metrics' ``cluster``: ``<scheduler>@<login host>``."""
        return metrics.cluster_label(self.scheduler.NAME, self._where(with_port=False))

    def _where(self, with_port: bool) -> str:
        target = (self.status_target or next(iter(self.owners.values()), None)
                  or next(iter(self.users.values()), None))
        if target is None:
            return "?"
        return f"{target.host}:{target.port}" if with_port else target.host


def watch_for(
    watches: dict[tuple, Watch],
    scheduler: ModuleType,
    host: str,
    port: int,
    status_target: SSHTarget | None,
    pool: ConnectionPool,
    interval: float,
    command_timeout: float,
    logger: logging.Logger | None = None,
) -> Watch:
    """The shared watch of this cluster in ``watches`` (the hub's: ``Hub.watches``; made on
    first use; settings follow the latest caller, as every spawner of one cluster has the
    same config)."""
    key = (scheduler.NAME, host, port, status_target.username if status_target else "")
    found = watches.get(key)
    if found is None:
        found = watches[key] = Watch(scheduler, pool, loop=asyncio.get_running_loop())
        if status_target is None:
            (logger or log).warning(
                "%s at %s:%d: no status identity (status_cluster_username): every %.0f s, one "
                "scheduler listing per cluster user with a server or a job on record, over that "
                "user's own connection, so listings and login-node sessions grow with users. "
                "Set status_cluster_username to an account that may see every user's jobs for "
                "one listing per cycle.", scheduler.DISPLAY_NAME, host, port, interval)
    found.interval = interval
    found.stale_after = 3 * interval + 1
    found.command_timeout = command_timeout
    found.status_target = status_target
    if logger is not None:
        found.log = logger
    return found


@dataclass(frozen=True)
class LoadReading:
    """The free/total cores per partition (``loads``), or ``None`` with ``error`` saying why."""

    loads: list[QueueLoad] | None
    fetched_at: float  # time.time() of the answer
    error: str = ""


@dataclass
class _LoadEntry:
    reading: LoadReading | None = None
    at: float = 0.0  # time.monotonic() of the reading
    task: asyncio.Task | None = None
    loop: asyncio.AbstractEventLoop | None = None
    calls: int = 0  # scheduler commands run, for tests


async def load_for(
    loads: dict[tuple, _LoadEntry],
    scheduler: ModuleType,
    target: SSHTarget,
    pool: ConnectionPool,
    interval: float,
    command_timeout: float,
    wait: float = 2.0,
    logger: logging.Logger | None = None,
) -> LoadReading:
    """The cluster's load as of at most ``interval`` seconds ago, shared by every user (in
    ``loads``, the hub's: ``Hub.loads``): one
    scheduler command per cluster per interval, however many forms are shown (one at a time;
    callers meanwhile wait for it). Waits at most ``wait`` seconds for a fresh answer, then
    says it is still being fetched; a failure is remembered for the interval too. Never raises.
    """
    key = (scheduler.NAME, target.host, target.port)
    loop = asyncio.get_running_loop()
    entry = loads.get(key)
    if entry is None:
        entry = loads[key] = _LoadEntry(loop=loop)
    if entry.reading is not None and time.monotonic() - entry.at < interval:
        return entry.reading
    if entry.task is None or entry.task.done():
        entry.task = loop.create_task(_fetch_load(entry, scheduler, target, pool,
                                                  command_timeout, logger or log))
    try:
        await asyncio.wait_for(asyncio.shield(entry.task), wait)
    except asyncio.TimeoutError:
        pass
    if entry.reading is not None and time.monotonic() - entry.at < interval + wait:
        return entry.reading
    return LoadReading(None, time.time(), "still being fetched; reload the page in a moment")


def load_calls(loads: dict[tuple, _LoadEntry], scheduler: ModuleType, host: str,
               port: int) -> int:
    """How many load commands ran for this cluster (tests, benchmarks)."""
    entry = loads.get((scheduler.NAME, host, port))
    return entry.calls if entry else 0


async def _fetch_load(
    entry: _LoadEntry,
    scheduler: ModuleType,
    target: SSHTarget,
    pool: ConnectionPool,
    command_timeout: float,
    logger: logging.Logger,
) -> None:
    started = time.monotonic()
    try:
        entry.calls += 1
        connection = await pool.get(target)
        output = await connection.run(scheduler.load_command(), timeout=command_timeout)
        reading = LoadReading(read_output(scheduler.parse_load_output, output), time.time())
        logger.debug("%s load at %s: %d rows in %.3f s", scheduler.DISPLAY_NAME, target.host,
                     len(reading.loads or ()), time.monotonic() - started)
    except (ClusterUnreachable, SchedulerUnavailable, ValueError) as error:
        reading = LoadReading(None, time.time(), str(error))
        logger.warning("%s at %s: cannot read the free cores for the spawn form: %s",
                       scheduler.DISPLAY_NAME, target.host, error)
    except Exception as error:  # the form must work whatever happens here
        reading = LoadReading(None, time.time(), f"unexpected error ({error})")
        logger.error("%s at %s: reading the free cores failed", scheduler.DISPLAY_NAME,
                     target.host, exc_info=True)
    entry.reading, entry.at = reading, time.monotonic()
