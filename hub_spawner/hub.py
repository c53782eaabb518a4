"""What one hub process shares between its spawners, reached through one place: ``hub_of()``.

Requirements:
- one ``Hub`` per event loop (a hub process has one; tests make their own), never module
  globals scattered over the package;
- it knows every spawner of this package the process has made (weakly: JupyterHub owns
  them) and, once a spawner or the hub's start-up gave them, the hub's database and its user
  wrappers;
- the reconciler's two questions are answered here: which job names the hub wants (every
  spawner's state in the database, and every spawner in memory: a spawn saves its job name
  before it submits), and how to connect as a job's owner (through a spawner of a hub user
  whose state names that cluster user: its key template, ``auth_state`` key or certificate);
- at the hub's start, every server whose state names a cluster of ours gets its spawner, so
  each such cluster's watch and reconciler run even when no server is running.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import weakref
from typing import Any

from . import metrics
from .errors import ClusterUnreachable
from .job import QueueListings
from .reconciler import CannotActAsOwner, Reconciler
from .ssh import ConnectionPool, SSHTarget
from .tunnels.client import TunnelClient, TunnelError
from .watch import Watch

log = logging.getLogger("hub_spawner.hub")

ClusterKey = tuple[str, str, int]  # scheduler name, login host, login port
#: The named server ``python -m hub_spawner check`` uses: its forwards are its own to close.
CHECK_SERVER = "hub-spawner-check"
#: A server's forwards are named ``user/server`` and ``user/server/hub-api``.
API_FORWARD_SUFFIX = "/hub-api"


class Hub:
    """The spawners, database and reconcilers of one hub process."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.spawners: weakref.WeakSet[Any] = weakref.WeakSet()
        self.db: Any = None
        self.users: Any = None  # JupyterHub's UserDict
        self.reconcilers: dict[ClusterKey, Reconciler] = {}
        self.background_tasks: set[asyncio.Future] = set()  # cleanups kept until done
        self.released: dict[str, float] = {}  # job names let go of (Reconciler.released)
        self.watches: dict[tuple, Watch] = {}  # watch.watch_for: one per cluster
        self.loads: dict[tuple, Any] = {}  # watch.load_for: the form's load, per cluster
        self.queue_listings = QueueListings()  # waiting jobs' places, per cluster
        self.form_retries: dict[str, tuple[dict[str, str], Exception]] = {}  # refused forms
        self.tunnel_clients: dict[tuple[str, str, str, str, bool], TunnelClient] = {}
        self.pool = ConnectionPool()  # every SSH connection of this hub's spawners
        self._started_from_database = False
        self._told: set[str] = set()
        self.log: logging.Logger | logging.LoggerAdapter = log  # the hub's own, once known
        self._forwards_at = 0.0
        self._unowned_forwards: set[tuple[int, str]] = set()  # (client, forward) seen unowned

    def tunnel_client(self, directory: str, python: str, address: str = "",
                      token: str = "", start: bool = True) -> TunnelClient:
        """The one client per tunnel service (shared by all spawners of this hub)."""
        key = (os.path.abspath(directory), python, address, token, start)
        if key not in self.tunnel_clients:
            self.tunnel_clients[key] = TunnelClient(key[0], python, address, token, start)
        return self.tunnel_clients[key]

    def register(self, spawner: Any) -> None:
        """A spawner of ours exists; its user gives the hub's database and user wrappers."""
        self.spawners.add(spawner)
        if self.log is log and isinstance(getattr(spawner, "log", None),
                                          (logging.Logger, logging.LoggerAdapter)):
            self.log = spawner.log
        user = getattr(spawner, "user", None)
        if self.db is None and getattr(user, "db", None) is not None:
            self.db = user.db
        settings = getattr(user, "settings", None) or {}
        if self.users is None and settings.get("users") is not None:
            self.users = settings["users"]

    def start_from_database(self) -> None:
        """Give every server whose state names a cluster of ours its spawner, and start
        that cluster's watch (once per process)."""
        if self._started_from_database or self.db is None or self.users is None:
            return
        self._started_from_database = True
        started: set[ClusterKey] = set()
        for row in self._our_rows():
            key = _cluster_key(row.state)
            if key in started:
                continue
            spawner = self._spawner_of(row)
            if spawner is None:
                continue
            started.add(key)
            self.log.info("reconciling the jobs on %s at %s:%d (servers on record)", *key)
            self.keep(asyncio.ensure_future(spawner.watch_cluster()))

    def release(self, job_name: str) -> None:
        """A spawner has let go of this job (its server is stopped or forgotten): if it still
        exists, the reconciler cancels it at its next listing, without the grace."""
        if job_name:
            self.released[job_name] = time.monotonic()

    def keep(self, task: asyncio.Future) -> None:
        """Keep a background task referenced until it is done."""
        self.background_tasks.add(task)
        task.add_done_callback(self.background_tasks.discard)

    def reconcile(self, watch: Watch, key: ClusterKey, settings: dict[str, Any]) -> None:
        """Make ``watch`` feed this cluster's reconciler (made on first use; ``settings``:
        hub_id, mode, grace, command_timeout, log, as the spawners' config says)."""
        reconciler = self.reconcilers.get(key)
        if reconciler is None:
            reconciler = self.reconcilers[key] = Reconciler(
                watch.scheduler, watch.pool, settings["hub_id"], wanted=self.wanted_job_names,
                owner_target=lambda username: self.owner_target(key, username),
                released=self.released,
            )
        reconciler.hub_id = settings["hub_id"]
        reconciler.mode = settings["mode"]
        reconciler.grace = settings["grace"]
        reconciler.command_timeout = settings["command_timeout"]
        reconciler.state_dir = settings.get("state_dir", reconciler.state_dir)
        reconciler.log = settings.get("log") or log
        if watch.after_cycle is None:
            watch.after_cycle = self._after_cycle(key)

    def _after_cycle(self, key: ClusterKey) -> Any:
        async def after_cycle(watch: Watch) -> None:
            for step, work in (("reconciling the jobs", lambda: self.reconcilers[key](watch)),
                               ("finding the users to list", lambda: self._relist(key, watch)),
                               ("reconciling the forwards",
                                lambda: self.reconcile_forwards(watch.interval))):
                try:  # each step on its own: one failing must not stop the others
                    await work()
                except Exception as error:
                    self.log.error("%s: %s failed unexpectedly: %s", watch.name, step, error,
                                   exc_info=True)
        return after_cycle

    async def _relist(self, key: ClusterKey, watch: Watch) -> None:
        watch.list_users(await self.users_to_list(key, watch))

    async def reconcile_forwards(self, interval: float) -> None:
        """Each tunnel service's table against the servers the hub wants (at most once per
        ``interval``, whichever cluster's cycle asks): a forward that no running or starting
        server owns in two listings in a row is closed. A service that is not running is
        started only when ssh masters it started are left (it adopts those a forward uses and
        ends the others); when the database cannot be read nothing is closed."""
        now = time.monotonic()
        if now - self._forwards_at < interval * 0.9:
            return
        self._forwards_at = now
        clients = {}
        for spawner in list(self.spawners):
            try:
                client = spawner.server_path.tunnels
            except Exception:  # noqa: S112 - a spawner that cannot say has no forwards
                continue
            clients[id(client)] = client
        for client in clients.values():
            try:
                table = await self._forward_table(client)
            except Exception:  # noqa: S112 - not running (nothing to close) or unreachable
                continue
            up = sum(1 for entry in table.values() if entry.get("up"))
            metrics.FORWARDS.labels("up").set(up)
            metrics.FORWARDS.labels("down").set(len(table) - up)
            owners = self.wanted_servers()
            if owners is None:
                return
            seen = set()
            for name in table:
                owner = name.removesuffix(API_FORWARD_SUFFIX)
                if owner in owners or owner.endswith("/" + CHECK_SERVER):
                    continue
                seen.add((id(client), name))
                if (id(client), name) not in self._unowned_forwards:
                    continue  # first listing without an owner: close at the next
                self.log.warning("closing the tunnel service's forward %s: no running or "
                                 "starting server of this hub owns it", name)
                try:
                    await client.close(name)
                except Exception as error:
                    self.log.warning("cannot close the forward %s (tried again next cycle): "
                                     "%s", name, error)
                client.forget_listing()
            self._unowned_forwards = {
                item for item in self._unowned_forwards if item[0] != id(client)} | seen

    async def _forward_table(self, client: TunnelClient) -> dict[str, dict]:
        try:
            return (await client.request({"op": "list"}, start=False))["forwards"]
        except TunnelError:
            left = client.masters_left()
            if not left or not client.start:
                raise
        # A killed service's masters outlive it (so that its users' connections do); with no
        # server running nothing else would start it again, and an unused one stays logged in.
        self.log.warning("the tunnel service (%s) is not running and %d ssh master(s) it "
                         "started are left; starting it, to adopt those that forwards use and "
                         "end the others", client.directory, len(left))
        return (await client.request({"op": "list"}))["forwards"]

    def wanted_servers(self) -> set[str] | None:
        """``user/server`` of every server that is running or starting (a job on record, in
        the database or in a spawner in memory); ``None`` when the database cannot be read."""
        owners = {s.server_path.name for s in list(self.spawners)
                  if getattr(s, "job_id", "") or getattr(s, "job_name", "")
                  or getattr(s, "_starting", False)}  # a spawn opens hub-api before it submits
        if self.db is None:
            return None
        try:
            for row in self._our_rows():
                if row.state.get("job_id") or row.state.get("job_name"):
                    owners.add(f"{row.user.name}/{row.name}")
        except Exception as error:
            self.log.warning("cannot read the servers the hub wants from its database (%s); "
                             "closing no forward this cycle", error)
            return None
        return owners

    def wanted_job_names(self) -> set[str] | None:
        """Every job name a spawner's state holds, in the database and in memory; ``None``
        when the database cannot be read (then nothing may be cancelled)."""
        names = {s.job_name for s in list(self.spawners) if getattr(s, "job_name", "")}
        if self.db is None:
            return None
        try:
            for row in self._our_rows():
                name = row.state.get("job_name")
                if isinstance(name, str) and name:
                    names.add(name)
        except Exception as error:
            self.log.warning("cannot read the servers the hub wants from its database (%s); "
                        "cancelling nothing this cycle", error)
            return None
        return names

    async def owner_target(self, key: ClusterKey, username: str) -> SSHTarget:
        """How to connect to this cluster as ``username``, through a spawner that has it on
        record; ``CannotActAsOwner`` with why and what to do otherwise."""
        spawners = [s for s in list(self.spawners) if s.cluster_record() == (*key, username)]
        if not spawners and self.users is not None:
            for row in self._our_rows():
                if _cluster_key(row.state) == key and row.state.get("cluster_username") == username:
                    spawner = self._spawner_of(row)
                    if spawner is not None:
                        spawners.append(spawner)
                        break
        if not spawners:
            raise CannotActAsOwner(
                f"no user of this hub has cluster user {username!r} on record (the hub user "
                "was deleted, or the job was submitted by hand with this hub's job name)")
        try:
            return await spawners[0].ssh_target((key[1], key[2], username))
        except ClusterUnreachable as error:
            raise CannotActAsOwner(str(error)) from None

    async def users_to_list(self, key: ClusterKey, watch: Watch) -> dict[str, SSHTarget]:
        """The cluster users on record for this cluster, with the connection to list each
        one's jobs: the status identity's while it can log in, else the user's own."""
        usernames = {s.cluster_record()[3] for s in list(self.spawners)
                     if s.cluster_record()[:3] == key}
        try:
            usernames |= {row.state.get("cluster_username") for row in self._our_rows()
                          if _cluster_key(row.state) == key}
        except Exception as error:
            self.log.warning("cannot read the cluster users from the hub's database: %s", error)
        usernames.discard(None)
        usernames.discard("")
        users: dict[str, SSHTarget] = {}
        status = watch.usable_status_target()
        for username in sorted(usernames):
            if status is not None:
                users[username] = status
                continue
            try:
                users[username] = await self.owner_target(key, username)
            except CannotActAsOwner as error:
                if username not in self._told:
                    self._told.add(username)
                    self.log.warning("%s: cannot list the jobs of cluster user %s: %s", watch.name,
                                username, error)
        return users

    def _our_rows(self) -> list[Any]:
        from jupyterhub import orm

        return [row for row in self.db.query(orm.Spawner).filter(orm.Spawner.state.isnot(None))
                if isinstance(row.state, dict) and row.state.get("hub_spawner_version")]

    def _spawner_of(self, row: Any) -> Any:
        try:
            spawner = self.users[row.user_id].spawners[row.name]
        except Exception as error:
            self.log.warning("cannot load the spawner of server %r of user %s: %s", row.name,
                        row.user_id, error)
            return None
        return spawner if hasattr(spawner, "cluster_record") else None


def _cluster_key(state: dict[str, Any]) -> ClusterKey:
    return (str(state.get("scheduler") or ""), str(state.get("login_host") or ""),
            int(state.get("login_port") or 0))


_hubs: dict[int, Hub] = {}


def hub_of(loop: asyncio.AbstractEventLoop | None = None) -> Hub:
    """The ``Hub`` of this event loop (the running one by default; made on first use)."""
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    key = id(loop)
    found = _hubs.get(key)
    if found is None or found.loop is not loop:
        found = _hubs[key] = Hub(loop)
    return found


def start_with_the_hub() -> None:
    """Once a JupyterHub that runs one of our spawners has started, give its servers on
    record their spawners, so the clusters are reconciled even when no server runs (after a
    restart, JupyterHub makes spawners only for running servers).

    JupyterHub has no start-up hook for a spawner class, and it imports ours while it builds
    its application object, before its loop runs; so ``JupyterHub.start`` is wrapped, once,
    to do this after it returns. A hub with another spawner class is left alone."""
    try:
        from jupyterhub.app import JupyterHub
    except ImportError:
        return
    if getattr(JupyterHub.start, "hub_spawner_wrapped", False):
        return
    original = JupyterHub.start

    @functools.wraps(original)
    async def start(app: Any, *args: Any, **kwargs: Any) -> Any:
        result = await original(app, *args, **kwargs)
        if getattr(app, "db", None) is None:  # it only did a chore (``--generate-certs``)
            return result
        try:
            if hasattr(app.spawner_class, "cluster_record"):
                hub = hub_of()
                hub.log = app.log
                hub.db = hub.db or app.db
                hub.users = hub.users or app.users
                hub.start_from_database()
        except Exception as error:
            app.log.error("hub_spawner: cannot start reconciling the clusters on record: %s",
                          error, exc_info=True)
        return result

    start.hub_spawner_wrapped = True  # type: ignore[attr-defined]
    JupyterHub.start = start
