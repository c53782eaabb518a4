"""No job outlives the hub's wish for it: each cycle, per cluster, the jobs of this hub that
exist against the servers the hub wants, and converge (level-triggered, as Kubernetes
controllers are).

Requirements:
- fed by the cluster's status watch (``hub_spawner.watch.Watch``): after each cycle it reads
  the jobs of every cluster user the watch listed *in that cycle*; a user whose listing failed
  is left alone until one answers (an unanswered listing never means "gone");
- a job is this hub's when its name starts with ``jupyterhub-<hub id>-``: another hub's jobs
  and a user's own batch jobs are never touched, nor the test job of ``hub_spawner check``;
  a job id listed twice (a forged line in a text listing) is never touched, and where the
  scheduler can, the cancel itself names the job's name and owner, so the scheduler checks
  them again (``cancel_listed_command``);
- a job of this hub that no running or starting server wants (``wanted()``: the job names the
  hub's database and its spawners hold; ``None`` when that cannot be read, and then nothing
  is done) is cancelled after ``grace`` seconds, as its owner; a cancel counts as done only
  when a later listing of its owner no longer shows the job, or shows it ended, never on a
  command's exit status; until then it is sent again with back-off, each try logged with why;
- no grace for a job a spawner of this hub has just let go of (``released``): it is known to be
  unowned, so a stop whose cancel failed is converged on in the next cycle;
- ``mode = "log"`` cancels nothing and logs each job it would cancel, once;
- where it cannot act as the owner (``owner_target`` raises ``CannotActAsOwner``), it says so
  once per job with what an admin can do, and acts as soon as it can;
- it keeps no list that must survive a restart: the next hub sees the same job and the same
  absent owner.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType

from . import jobfiles, metrics
from .errors import ClusterUnreachable
from .schedulers import JobState, ListedJob
from .ssh import ConnectionPool, SSHTarget
from .watch import Watch

log = logging.getLogger("hub_spawner.reconciler")

MODES = ("cancel", "log")


class CannotActAsOwner(Exception):
    """The hub cannot connect as the job's owner now; the message says why and what to do."""


def job_name_prefix(hub_id: str) -> str:
    """The start of the name of every job this hub submits (see ``spawner.job_name``)."""
    return f"jupyterhub-{hub_id}-"


#: ``python -m hub_spawner check`` names its test job for the server ``hub-spawner-check``:
#: that job is the check's to cancel (it may run beside the hub, with the hub's config).
CHECK_JOB_MARK = "-hub-spawner-check-"


def secrets_file(state_dir: str, job_name: str) -> str:
    """The job's secrets file as a quoted shell word (``remote_state_dir`` relative to the
    owner's home unless absolute); ``ValueError`` for a name or directory not ours."""
    if not jobfiles.JOB_NAME.fullmatch(job_name) or ".." in job_name:
        raise ValueError(f"not a job name of this hub: {job_name!r}")
    path = posixpath.join(state_dir, job_name, jobfiles.SECRETS_NAME)
    jobfiles.check_remote_path(path if path.startswith("/") else "/" + path)
    return shlex.quote(path) if path.startswith("/") else f'"$HOME"/{shlex.quote(path)}'


@dataclass
class _Unwanted:
    owner: str
    name: str
    since: float  # time.monotonic() when a listing first showed it with no server wanting it
    tries: int = 0  # cancels sent
    next_try: float = 0.0  # time.monotonic() of the next one


@dataclass
class Reconciler:
    """The jobs of one cluster against the servers the hub wants (one per status watch)."""

    scheduler: ModuleType
    pool: ConnectionPool
    hub_id: str
    wanted: Callable[[], set[str] | None]
    owner_target: Callable[[str], Awaitable[SSHTarget]]
    mode: str = "cancel"
    grace: float = 30.0
    max_backoff: float = 300.0
    state_dir: str = ".hub-spawner"  # the spawners' remote_state_dir (job files)
    command_timeout: float = 60.0
    log: logging.Logger = log
    #: Job names a spawner of this hub has let go of (a stop, a failed or interrupted
    #: spawn, a server the hub forgot), with when: no grace for those, they are known
    #: to be unowned. Shared with the ``Hub``; kept an hour at most.
    released: dict[str, float] = field(default_factory=dict)
    unwanted: dict[str, _Unwanted] = field(default_factory=dict)  # job id -> what we know
    told: set[tuple[str, str]] = field(default_factory=set)  # (job id, what) logged once
    cancels_sent: int = 0  # for tests and benchmarks
    cancels_confirmed: int = 0

    async def __call__(self, watch: Watch) -> None:
        """One cycle, after the watch's listing (its ``after_cycle``)."""
        listed = {user: listing for user, listing in watch.listed.items()
                  if listing.at >= watch.cycle_started}
        if not listed:
            return
        wanted = self.wanted()
        if wanted is None:
            return
        prefix = job_name_prefix(self.hub_id)
        now = time.monotonic()
        for name, at in list(self.released.items()):
            if now - at > 3600:
                del self.released[name]
        present: set[str] = set()
        seen = [job.job_id for listing in listed.values() for job in listing.jobs]
        ambiguous = {job_id for job_id in seen if seen.count(job_id) > 1}
        for owner, listing in listed.items():
            for job in listing.jobs:
                if not job.name.startswith(prefix) or CHECK_JOB_MARK in job.name:
                    continue
                if job.job_id in ambiguous:  # a forged line, or a listing we misread
                    present.add(job.job_id)
                    self._once(job.job_id, "ambiguous", logging.WARNING,
                               "job %s is listed more than once (owners or names differ): "
                               "not touched", job.job_id)
                    continue
                if job.status.state in (JobState.DONE, JobState.ENDING):
                    continue
                present.add(job.job_id)
                if job.name in wanted:
                    self._forget(job.job_id)
                    continue
                found = self.unwanted.setdefault(job.job_id, _Unwanted(owner, job.name, now))
                if job.name in self.released or now - found.since >= self.grace:
                    await self._act(job, found, watch.interval, now)
        for job_id, found in list(self.unwanted.items()):
            if job_id in present or found.owner not in listed:
                continue
            if found.tries:
                self.cancels_confirmed += 1
                self.log.info(
                    "%s: job %s (%s) of %s is gone: no listing shows it after %d cancel(s)",
                    watch.name, job_id, found.name, found.owner, found.tries,
                )
                self.released.pop(found.name, None)
            self._forget(job_id)

    async def _act(self, job: ListedJob, found: _Unwanted, interval: float, now: float) -> None:
        why = "no running or starting server of this hub owns it"
        if self.mode == "log":
            self._once(job.job_id, "log", logging.WARNING,
                       "reconcile = 'log': would cancel job %s (%s) of %s, %s: %s",
                       job.job_id, job.name, job.owner, job.status.state.value, why)
            return
        if now < found.next_try:
            return
        try:
            target = await self.owner_target(job.owner)
        except CannotActAsOwner as error:
            self._once(job.job_id, "owner", logging.WARNING,
                       "cannot cancel job %s (%s) of %s yet (%s): %s. It is cancelled as soon "
                       "as the hub can act as %s; or cancel it on the cluster by hand.",
                       job.job_id, job.name, job.owner, why, error, job.owner)
            return
        found.tries += 1
        found.next_try = now + min(interval * 2 ** min(found.tries - 1, 30), self.max_backoff)
        self.cancels_sent += 1
        metrics.RECONCILER_CANCELS.labels(metrics.cluster_label(self.scheduler.NAME,
                                                                target.host)).inc()
        self.log.warning("cancelling job %s (%s) of %s, %s: %s (try %d)", job.job_id, job.name,
                         job.owner, job.status.state.value, why, found.tries)
        try:
            connection = await self.pool.get(target)
            cancel = getattr(self.scheduler, "cancel_listed_command", None)
            command = (cancel(job.job_id, job.name, job.owner) if cancel
                       else self.scheduler.cancel_command(job.job_id))
            # A job cancelled before it ran never read (and deleted) its secrets file.
            command = (f"{command}; hub_spawner_cancel=$?; rm -f -- "
                       f"{secrets_file(self.state_dir, job.name)}; exit $hub_spawner_cancel")
            output = await connection.run(command, timeout=self.command_timeout)
        except (ClusterUnreachable, ValueError, asyncio.TimeoutError) as error:
            said = str(error)
        else:
            said = "" if output.exit_status == 0 else (
                (output.stderr.strip() or output.stdout.strip())[-300:]
                or f"exit status {output.exit_status}")
        if said:
            self.log.warning(
                "the cancel of job %s (%s) of %s did not get through: %s; sent again in "
                "%.0f s until a listing no longer shows the job", job.job_id, job.name,
                job.owner, said, found.next_try - now,
            )

    def _forget(self, job_id: str) -> None:
        self.unwanted.pop(job_id, None)
        self.told = {(j, what) for j, what in self.told if j != job_id}

    def _once(self, job_id: str, what: str, level: int, message: str, *args: object) -> None:
        if (job_id, what) not in self.told:
            self.told.add((job_id, what))
            self.log.log(level, message, *args)
