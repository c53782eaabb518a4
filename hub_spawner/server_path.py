"""The path between the hub and one running server: its two forwards in the tunnel service
(hub port -> the server on its node, and the hub API's reverse forward on the login node).

Rules this part owns:
- the forwards are named ``<user>/<server>`` and ``<user>/<server>/hub-api`` (what the tunnel
  service's table and the hub's forward reconciler know them by);
- a re-open (a poll's, or the background retry's) and a close never interleave: both hold one
  lock, and a re-open finds a released server (no job id) and opens nothing, so no forward of a
  stopped server comes back after its close;
- the hub API's reverse forward comes back only on its old login-node port (the server's
  ``JUPYTERHUB_API_URL`` names it); the hub-side forward moves to a free port when another
  process took the old one, and the route and stored state follow;
- what a poll could not re-open is retried in the background (1 s, doubling up to
  ``poll_interval``) until both are up or the job is no longer the spawner's.

A ``ServerPath`` reads the job's address and the spawner's options at each call (a spawner's
options follow the cluster it uses); it keeps only the lock, the retry and which forwards are
down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from jupyterhub.utils import url_path_join

from .hub import hub_of
from .ssh import SSHTarget, client_identity
from .tunnels.client import TunnelClient, TunnelError
from .tunnels.forwards import Login

if TYPE_CHECKING:
    from .spawner import SSHBatchSpawner


class ServerPath:
    """One spawner's forwards in the hub's tunnel service."""

    def __init__(self, spawner: SSHBatchSpawner) -> None:
        self.spawner = spawner
        self._lock = asyncio.Lock()
        self._retry: asyncio.Future | None = None
        self._down: set[str] = set()
        self._warming: asyncio.Future | None = None

    # --- names and addresses -----------------------------------------------------------------

    @property
    def name(self) -> str:
        """The hub-side forward's name in the tunnel service's table."""
        return f"{self.spawner.user.name}/{self.spawner.name}"

    @property
    def api_name(self) -> str:
        """The hub API reverse forward's name."""
        return f"{self.name}/hub-api"

    @property
    def connect_ip(self) -> str:
        """Where the proxy reaches the hub-side forward."""
        spawner = self.spawner
        if spawner.tunnel_connect_host:
            return spawner.tunnel_connect_host
        return "127.0.0.1" if spawner.tunnel_bind_ip in ("0.0.0.0", "") else spawner.tunnel_bind_ip

    @property
    def destination(self) -> str:
        """Where the job's server listens, for messages."""
        return f"{self.spawner.job_host}:{self.spawner.remote_socket or self.spawner.remote_port}"

    @property
    def tunnels(self) -> TunnelClient:
        """The hub's client of its tunnel service (one per hub process and service)."""
        spawner = self.spawner
        return hub_of().tunnel_client(
            spawner.tunnel_service_dir,
            spawner.tunnel_service_python,
            spawner.tunnel_service_address,
            spawner.tunnel_service_token,
            spawner.tunnel_service_start,
        )

    async def login(self, target: SSHTarget | None = None, hub_api: bool = False) -> Login:
        """The tunnel service's view of the spawner's SSH target (or of ``target``): on the
        login node the job went through for the hub API's path (the job was told that
        node's address), else on the first of the cluster's nodes that answers lately."""
        target = target or await self.spawner._ssh_target()
        pinned = self.spawner.job_submit_host or self.spawner.job_login_host  # older state
        if hub_api and pinned:
            host = pinned
        else:
            host = hub_of().pool.order(target)[0]
        try:
            jump = None
            if target.jump is not None:  # the bastion: its master carries the login node's
                jump = Login(target.jump.host, target.jump.port, target.jump.username,
                             await self._key_path(target.jump),
                             os.path.abspath(target.jump.known_hosts_path))
            return Login(host, target.port, target.username,
                         await self._key_path(dataclasses.replace(target, host=host)),
                         os.path.abspath(target.known_hosts_path), jump=jump)
        except ValueError as error:
            raise TunnelError(f"Cannot ask for a tunnel: {error}") from None

    async def _key_path(self, target: SSHTarget) -> str:
        """The key file the service logs in to ``target`` with: the configured one, or one
        from auth_state, or a fresh certificate, handed to the service, which writes them as
        private files for its OpenSSH (in OpenSSH's own key format)."""
        if not (target.key_text or target.ca_key_path):
            return os.path.abspath(target.key_path)
        found = client_identity(target)
        key, certificate = found if isinstance(found, tuple) else (found, None)
        return await self.tunnels.store_identity(
            target.host, target.port, target.username, key.export_private_key().decode(),
            certificate.export_certificate().decode() if certificate else "",
        )

    # --- opening -----------------------------------------------------------------------------

    def warm_up(self, connect: Callable[[], Awaitable[Any]]) -> None:
        """While the user looks at the spawn form: open the SSH connection (``connect``) and
        have the tunnel service start its master, so that Start waits for neither (~0.2 s).
        Best effort, in the background."""
        if self._warming is not None and not self._warming.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # rendered outside the hub (the config reference, tests)
        spawner = self.spawner

        async def warm() -> None:
            try:
                await connect()
                if not spawner.hub_connect_url:
                    await self.tunnels.warm(await self.login())
            except Exception as error:  # the spawn will say what is wrong, and how to fix it
                spawner.log.debug("%s: warming up for the spawn form: %s", spawner._log_name,
                                  error)

        self._warming = loop.create_task(warm())

    async def open_hub_api(self) -> str:
        """The hub API URL as compute nodes will use it: ``hub_connect_url`` if set, else a
        reverse forward through the login node (on its old port, if it had one)."""
        spawner = self.spawner
        hub_api = urlparse(spawner.hub.api_url)
        if spawner.hub_connect_url:
            return url_path_join(spawner.hub_connect_url, hub_api.path)
        login = await self.login(hub_api=True)
        listen_host = spawner.cluster.hub_api_host(login.host) or "127.0.0.1"
        try:
            spawner.api_tunnel_port = await self.tunnels.ensure_reverse(
                self.api_name,
                login,
                listen_host,
                hub_api.hostname or "127.0.0.1",
                hub_api.port or 80,
                listen_port=spawner.api_tunnel_port,
            )
        except TunnelError as error:
            _node_down(login, error)
            raise
        return f"{hub_api.scheme}://{listen_host}:{spawner.api_tunnel_port}{hub_api.path}"

    def close_late_api_path(self, api_path: asyncio.Future) -> None:
        """Done-callback for a hub API path asked for by a spawn that was cancelled."""
        if not api_path.cancelled() and api_path.exception() is None:
            asyncio.ensure_future(self.tunnels.close(self.api_name))

    async def open_server(self, listen_port: int = 0) -> int:
        """Ask for the forward to the job's server (on ``listen_port``, or any port): through
        the login node to NODE:PORT, or, in socket mode, through a second SSH hop (login node
        -> node) to the node's Unix socket. Returns the hub-side port. A login node that does
        not answer is marked down and the next of the cluster's nodes is tried once."""
        login = await self.login()
        try:
            return await self._open_server(login, listen_port)
        except TunnelError as error:
            if not _node_down(login, error):
                raise
            again = await self.login()
            if again.host == login.host:
                raise
            self.spawner.log.warning("%s: login node %s does not answer; opening the tunnel "
                                     "through %s", self.spawner._log_name, login.host,
                                     again.host)
            return await self._open_server(again, listen_port)

    async def _open_server(self, login: Login, listen_port: int) -> int:
        spawner = self.spawner
        if not spawner.remote_socket:
            return await self.tunnels.ensure_local(
                self.name, login, spawner.tunnel_bind_ip, spawner.job_host,
                spawner.remote_port, listen_port=listen_port,
            )
        try:
            node = Login(spawner.job_host, spawner.cluster.node_ssh_port, login.username,
                         login.key_path, login.known_hosts_path, jump=login)
        except ValueError as error:
            raise TunnelError(f"Cannot ask for a tunnel: {error}") from None
        return await self.tunnels.ensure_local(
            self.name, node, spawner.tunnel_bind_ip, "127.0.0.1", 0,
            listen_port=listen_port, dest_socket=spawner.remote_socket,
        )

    # --- keeping them up ---------------------------------------------------------------------

    def retry_soon(self) -> None:
        """Start (once) a background retry of what a poll could not re-open.

        JupyterHub polls again only after it has seen the server answer (at hub start-up it
        waits up to ``http_timeout`` for that, then stops the server), so waiting for the next
        poll would turn a passing fault into a cancelled job. The retry starts after 1 s and
        backs off to ``poll_interval``; it logs only its success (each poll logs the failure)
        and ends when both forwards are up or the job is no longer the spawner's.
        """
        if self._retry is None or self._retry.done():
            self._retry = asyncio.ensure_future(self._retry_until_up(self.spawner.job_id))

    async def _retry_until_up(self, job_id: str) -> None:
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            if self.spawner.job_id != job_id:
                return
            try:
                if await self.reopen(quiet=True):
                    return
            except Exception:  # never expected: reopen logs its failures itself
                self.spawner.log.exception("%s: retrying the tunnels failed",
                                           self.spawner._log_name)
            delay = min(2 * delay, max(float(self.spawner.poll_interval), 1.0))

    def stop_retry(self) -> None:
        if self._retry is not None and not self._retry.done():
            self._retry.cancel()
        self._retry = None

    async def reopen(self, quiet: bool = False) -> bool:
        """Make sure both forwards are up in the tunnel service; True if they are. Never
        raises.

        Normally the service kept them (across hub restarts and SSH drops) and this is one
        idempotent request each; if they are gone (the service lost its table), they are
        asked for again on their old ports (see the module's rules). ``quiet`` (the
        background retry) logs failures at debug level only.
        """
        async with self._lock:
            if not self.spawner.job_id:  # released: its forwards stay closed
                return False
            if not quiet and not self._down and await self.listed_up():
                return True
            self.tunnels.forget_listing()
            level = logging.DEBUG if quiet else logging.ERROR
            api_up = await self._ensure_api(level)
            return await self._ensure_server(level) and api_up

    async def keep_hub_api(self) -> None:
        """While a spawn waits for its server's ready line: if the service's recent listing
        lacks the hub API forward (the service lost its master, e.g. the login node was down
        longer than a certificate lives), ask for it again with a fresh identity. Quiet (debug
        level); never raises."""
        spawner = self.spawner
        if not spawner.api_tunnel_port or spawner.hub_connect_url:
            return
        try:
            listing = await self.tunnels.recent_forwards(max(spawner.cluster.status_interval, 1))
        except Exception:  # noqa: S110 - the spawn's own steps say what is wrong
            listing = {}
        entry = listing.get(self.api_name) or {}
        if entry.get("up") and entry.get("port") == spawner.api_tunnel_port:
            return
        async with self._lock:
            if spawner.job_id:
                self.tunnels.forget_listing()
                await self._ensure_api(logging.DEBUG)

    async def listed_up(self) -> bool:
        """Whether the service's recent listing (shared by all spawners, at most
        ``poll_interval / 2`` old) has both forwards up on their ports; any doubt is False."""
        spawner = self.spawner
        try:
            listing = await self.tunnels.recent_forwards(max(spawner.poll_interval / 2, 1))
        except Exception:  # the ensure path says what is wrong
            return False
        wanted = {self.name: spawner.tunnel_port}
        if spawner.api_tunnel_port and not spawner.hub_connect_url:
            wanted[self.api_name] = spawner.api_tunnel_port
        entries = [(listing.get(name) or {}, port) for name, port in wanted.items()]
        return all(entry.get("up") and entry.get("port") == port for entry, port in entries)

    async def _ensure_api(self, failure_level: int) -> bool:
        spawner = self.spawner
        if not spawner.api_tunnel_port or spawner.hub_connect_url:
            return True
        try:
            await self.open_hub_api()
        except Exception as error:
            self._down.add(self.api_name)
            spawner.log.log(
                failure_level,
                "%s: cannot re-open the hub API tunnel of job %s on login port %d: %s. The "
                "server cannot reach the hub until this succeeds; retrying in the background "
                "and at every poll (every %s s).",
                spawner._log_name, spawner.job_id, spawner.api_tunnel_port, error,
                spawner.poll_interval,
            )
            return False
        if self.api_name in self._down:
            self._down.discard(self.api_name)
            spawner.log.info("%s: re-opened the hub API tunnel on login port %d",
                             spawner._log_name, spawner.api_tunnel_port)
        return True

    async def _ensure_server(self, failure_level: int) -> bool:
        spawner = self.spawner
        old_port = spawner.tunnel_port
        try:
            await self.open_server(listen_port=old_port)
        except Exception as error:
            if await self._service_holds(old_port) or not port_taken(spawner.tunnel_bind_ip,
                                                                     old_port):
                self._down.add(self.name)
                spawner.log.log(
                    failure_level,
                    "%s: cannot re-open the tunnel of job %s (hub port %d -> %s): %s; "
                    "retrying in the background and at every poll (every %s s).",
                    spawner._log_name, spawner.job_id, old_port, self.destination, error,
                    spawner.poll_interval,
                )
                return False
            return await self._move_server(failure_level)
        if self.name in self._down:
            self._down.discard(self.name)
            spawner.log.info("%s: re-opened the tunnel: hub port %d -> %s", spawner._log_name,
                             old_port, self.destination)
        return True

    async def _service_holds(self, port: int) -> bool:
        """Whether the tunnel service has our forward up on ``port`` (then nobody else
        holds it)."""
        try:
            entry = (await self.tunnels.forwards()).get(self.name, {})
        except Exception:
            return False
        return entry.get("port") == port and bool(entry.get("up"))

    async def _move_server(self, failure_level: int) -> bool:
        spawner = self.spawner
        old_port = spawner.tunnel_port
        try:
            await self.tunnels.close(self.name)
            new_port = await self.open_server()
        except Exception as error:
            self._down.add(self.name)
            spawner.log.log(
                failure_level,
                "%s: hub port %d of job %s is taken by another process and no other port could "
                "be opened: %s; retrying in the background and at every poll (every %s s).",
                spawner._log_name, old_port, spawner.job_id, error, spawner.poll_interval,
            )
            return False
        self._down.discard(self.name)
        spawner.tunnel_port = new_port
        await self._move_route(new_port)
        spawner.log.warning(
            "%s: hub port %d is taken by another process; the tunnel of job %s moved to hub port "
            "%d -> %s (route and stored state updated)",
            spawner._log_name, old_port, spawner.job_id, new_port, self.destination,
        )
        return True

    async def _move_route(self, port: int) -> None:
        """Point the server's stored address and the proxy's route at a new hub port."""
        spawner = self.spawner
        if spawner.server is not None:
            spawner.server.port = port  # written through to the database row
        if spawner.orm_spawner is not None:
            spawner.orm_spawner.state = spawner.get_state()
        db = getattr(spawner.user, "db", None)
        if db is not None:
            db.commit()
        proxy = getattr(spawner.user, "settings", {}).get("proxy")
        if proxy is None or spawner.server is None or spawner.pending not in (None, "spawn"):
            return  # at hub start-up, JupyterHub's route check uses the stored address
        try:
            await proxy.add_user(spawner.user, spawner.name)
        except Exception as error:
            spawner.log.warning("%s: could not update the proxy's route yet (%s); JupyterHub's "
                                "route check will use the stored address", spawner._log_name,
                                error)

    # --- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Ask the tunnel service to drop both forwards; a failure is logged, never raised.

        Under the re-open lock: a re-open already under way ends first, and one that starts
        later finds the job released, so no forward of a stopped server comes back."""
        async with self._lock:
            for name in (self.name, self.api_name):
                try:
                    await self.tunnels.close(name)
                except Exception as error:
                    self.spawner.log.warning("%s: could not close tunnel %s: %s",
                                             self.spawner._log_name, name, error)


#: What OpenSSH (the tunnel service's master) says when the login node itself does not answer:
#: its own connect, or (behind a bastion) the bastion's forward to it.
_NODE_DOWN = re.compile(r"ssh: connect to host (?P<host>\S+) port \d+: (Connection refused|"
                        r"Connection timed out|No route to host|Network is unreachable)|"
                        r"open failed: connect failed: (?P<via>Connection refused|Connection "
                        r"timed out|No route to host|Network is unreachable)")


def _node_down(login: Login, error: Exception) -> bool:
    """Whether the service could not make a forward because ``login``'s node does not answer;
    if so, that node is marked down in the hub's pool: the next try (and every user's next
    command) goes to another of the cluster's login nodes."""
    text = str(error)
    if not text.startswith(f"cannot connect to {login.describe()}:"):
        return False  # another master's (a node hop's) failure, not this node's
    found = _NODE_DOWN.search(text)
    if found is None or (found["host"] or "") not in ("", login.host) or (
            found["via"] and login.jump is None):
        return False
    hub_of().pool.mark_down(login.host, login.port, f"the tunnel service: {text}")
    return True


def port_taken(ip: str, port: int) -> bool:
    """Whether another process listens on ``ip:port`` here (a bind test; False if free)."""
    probe = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    try:
        probe.bind((ip or "0.0.0.0", port))
    except OSError as error:
        return error.errno == errno.EADDRINUSE
    finally:
        probe.close()
    return False
